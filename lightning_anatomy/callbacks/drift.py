"""`ConceptDriftMonitor`: how far training has moved every SAE concept from where it started.

At step 0 and every M optimizer steps a fixed probe set goes through a `ConceptLens` built on the
policy itself (current weights, no second copy), in eval mode and without grad. Per feature the
mean activation over the probe's completion tokens (all tokens of all probe sequences pooled) is
compared with the step-0 mean; the difference is the drift. A resumed run keeps the original
step-0 baseline (it is part of the callback state), so drift is always measured from the start
of training, never from the resume point.

When the audit's predictions are supplied (feature → predicted shift, e.g. the `predicted_shift`
column of `audit_dataset`), R² is the squared Pearson correlation between predicted shift and
observed drift over those features: 1 when drift is an exact positive *or negative* linear
function of the prediction, blind to scale and offset (the paper's agreement measure). It is
undefined, and not logged, while every observed drift is equal (as at step 0).

Given the audit's feature clusters (`clusters=`, e.g. a `method="paper"` audit), the monitor also
measures what `check_prediction` measures, live: per greedy rollout each cluster's mean over
members of 1{firing frequency > τ} (`audit.rollouts`), its change from step 0, and the R² of
those changes against the clusters' predicted shifts (`concepts/drift_cluster_r2`).

The measurements themselves (probe batches, feature means, rollouts) are in `drift_probe.py`; reading
the audit's `predicted` / `clusters` in `drift_predictions.py`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import Strategy
from torch import Tensor

from lightning_anatomy.audit.agreement import r_squared
from lightning_anatomy.callbacks.concept_refs import (
    ConceptRefSpec,
    parse_labels,
    parse_track,
)
from lightning_anatomy.callbacks.drift_predictions import parse_clusters, parse_predicted
from lightning_anatomy.callbacks.drift_probe import ProbeBatch, feature_means, probe_batches, rollout_batches
from lightning_anatomy.callbacks.logging import log_scalars, log_wandb, wandb_table
from lightning_anatomy.callbacks.options import check_every, renamed_option
from lightning_anatomy.callbacks.sae_specs import build_pending_saes, check_resumed_widths, load_saes
from lightning_anatomy.callbacks.strategies import (
    DATA_PARALLEL,
    SHARDED,
    check_strategy,
    measures_on_every_rank,
)
from lightning_anatomy.concepts.lens import ConceptLens
from lightning_anatomy.data.tokenize import TokenizedPair
from lightning_anatomy.model_access import find_causal_lm, measurement_pass

if TYPE_CHECKING:
    from sae_lens import SAE

    from lightning_anatomy.audit.result import AuditResult
    from lightning_anatomy.data.datamodule import PreferenceDataModule

RESPONSES = ("chosen", "rejected", "both")
TABLE_COLUMNS = ("rank", "hook", "feature", "label", "baseline", "current", "drift", "predicted")



class ConceptDriftMonitor(Callback):
    """Log the drift of SAE feature means on a fixed probe set, from step 0, while training.

    Args:
        saes: `{hook_name: SAE | directory | registry spec}` or a `ConceptLens` (rebuilt on the
            policy if it wraps another model); required.
        probe: the fixed probe set (required): a list of `TokenizedPair`, a collated batch dict
            (contract keys), an object with `val_pairs` (a `PreferenceDataModule`), or `"val"` for
            the trainer's datamodule's `val_pairs`. Teacher-forced on `responses`.
        every_n_steps: evaluate at step 0 (fit start) and after every this many optimizer steps.
        track: concepts with a scalar series (as for `ConceptAttribution`).
        top_k: rows of the W&B table `concepts/drift_top` (largest |drift|).
        predicted: `{(hook, feature): predicted shift}` or the audit DataFrame
            (`hook`, `feature`, `predicted_shift`); enables `concepts/drift_r2` and the scatter.
        rollouts: greedy-decode this many probe prompts (the first ones) at each evaluation and
            measure drift on the generated tokens too (0: teacher-forced only).
        rollout_max_new_tokens: length limit of each rollout (cut after the first eos).
        clusters: the audit's feature clusters and their predicted shifts (an `AuditResult` or
            its saved directory); needs `rollouts > 0`; enables `concepts/drift_cluster_r2`.
        cluster_tau: activity threshold of the cluster measure (None: the audit's τ, else 0.01).
        labels: `{(hook, feature) | "hook:feature": label}` for the tables.
        responses: which completions are teacher-forced: "chosen", "rejected" or "both".
        batch_size: probe sequences per forward.
        evaluate_on_train_end: one more evaluation at the end of training if the last step
            was not an evaluation step.
        allow_untested_strategy: run under strategies other than `supported_strategies` anyway.
        lens_or_saes: deprecated name of `saes` (accepted for one release, with a
            DeprecationWarning).
        predictor: which prediction of the clusters the cluster R² tests: None (the audit's
            own), "paper" (each cluster's mean disparity) or "tilt" (the joint Bradley–Terry
            reward tilted over the audit's pairs, `audit.tilt`); needs `clusters`.

    Strategies (`supported_strategies`): SingleDeviceStrategy, DDPStrategy, FSDPStrategy and
    ModelParallelStrategy (FSDP2, without tensor parallelism); others are refused at setup.

    Logged at the number of optimizer steps taken: `concepts/drift/<name>` per tracked concept,
    `concepts/drift_r2` (when `predicted` is set and R² is defined), with rollouts also
    `concepts/drift_rollout/<name>` and `concepts/drift_rollout_r2`, with `clusters` also
    `concepts/drift_cluster_r2` (cluster firing on rollouts vs the audit's cluster predictions);
    W&B only:
    `concepts/drift_hist` (all features' drift), and after step 0 `concepts/drift_top` and
    `concepts/drift_scatter` (predicted vs observed). Runs on global rank zero only (no
    collective calls, so other ranks never wait on it beyond the step it takes); with sharded
    weights (FSDP) on every rank, since each probe forward is a collective, logged from rank zero.
    """

    supported_strategies: ClassVar[tuple[type[Strategy], ...]] = DATA_PARALLEL + SHARDED

    def __init__(
        self,
        saes: Mapping[str, SAE | str | Mapping[str, str]] | ConceptLens | None = None,
        probe: (Sequence[TokenizedPair] | Mapping[str, torch.Tensor] | PreferenceDataModule | Literal["val"]
                | None) = None,
        every_n_steps: int = 50,
        track: Mapping[str, ConceptRefSpec] | Sequence[ConceptRefSpec] | None = None,
        top_k: int = 20,
        predicted: Mapping[ConceptRefSpec, float] | pd.DataFrame | None = None,
        rollouts: int = 0,
        rollout_max_new_tokens: int = 32,
        labels: Mapping[ConceptRefSpec, str] | None = None,
        clusters: AuditResult | str | os.PathLike | None = None,
        cluster_tau: float | None = None,
        responses: str = "chosen",
        batch_size: int = 8,
        evaluate_on_train_end: bool = True,
        allow_untested_strategy: bool = False,
        *,
        lens_or_saes: Mapping[str, SAE | str | Mapping[str, str]] | ConceptLens | None = None,
        predictor: str | None = None,
    ) -> None:
        saes = renamed_option("ConceptDriftMonitor", "saes", saes, "lens_or_saes", lens_or_saes)
        if saes is None:
            raise ValueError("ConceptDriftMonitor: saes is required: {hook_name: SAE or SAE spec} or a ConceptLens")
        if probe is None:
            raise ValueError("ConceptDriftMonitor: probe is required: a list of TokenizedPair, a collated batch dict, "
                             "a PreferenceDataModule or 'val'")
        self._given_lens = saes if hasattr(saes, "encode") and hasattr(saes, "model") else None
        self.saes, self.widths = load_saes(saes, "ConceptDriftMonitor")
        self.every_n_steps = check_every(every_n_steps, "every_n_steps")
        self.top_k = check_every(top_k, "top_k")
        self.batch_size = check_every(batch_size, "batch_size")
        self.rollout_max_new_tokens = check_every(rollout_max_new_tokens, "rollout_max_new_tokens")
        if isinstance(rollouts, bool) or not isinstance(rollouts, int) or rollouts < 0:
            raise ValueError(f"rollouts must be an integer >= 0 (number of probe prompts to roll out), got {rollouts!r}")
        self.rollouts = rollouts
        if responses not in RESPONSES:
            raise ValueError(f"responses={responses!r} is not one of {RESPONSES}")
        self.responses = responses
        if not (probe == "val" if isinstance(probe, str) else
                isinstance(probe, Mapping | list | tuple) or hasattr(probe, "val_pairs")):
            raise ValueError(
                "probe must be a list of TokenizedPair, a collated batch dict, a PreferenceDataModule "
                f"(its val_pairs) or 'val'; got {type(probe).__name__}"
            )
        if isinstance(probe, list | tuple) and not probe:
            raise ValueError("probe is empty: pass at least one TokenizedPair")
        self.probe = probe
        self.track = parse_track(track, self.widths)
        self.predicted, predicted_labels = parse_predicted(predicted, self.widths)
        self.labels = {**predicted_labels, **parse_labels(labels, self.widths)}
        self.evaluate_on_train_end = bool(evaluate_on_train_end)
        self.allow_untested_strategy = bool(allow_untested_strategy)
        self.cluster_reader = None
        self.cluster_predictions: pd.DataFrame | None = None
        self.cluster_threshold = 0.0
        if predictor is not None:
            from lightning_anatomy.audit.tilt import check_predictor

            check_predictor(predictor)
            if clusters is None:
                raise ValueError("predictor= chooses the prediction of the audit's clusters; pass clusters=<AuditResult>")
        if clusters is not None:
            from lightning_anatomy.audit.rollouts import ClusterReader

            if not self.rollouts:
                raise ValueError("clusters= measures cluster firing on the model's own rollouts; pass rollouts=N (> 0)")
            assign, self.cluster_predictions, audit_options = parse_clusters(clusters, self.widths)
            if predictor is not None:
                from lightning_anatomy.audit.tilt import predictions_for

                self.cluster_predictions = predictions_for(clusters, predictor)
            tau = float(audit_options.get("tau", 0.01) if cluster_tau is None else cluster_tau)
            if not 0 <= tau < 1:
                raise ValueError(f"cluster_tau={cluster_tau!r} is invalid: the activity threshold must be in [0, 1)")
            self.cluster_threshold = float(audit_options.get("threshold", 0.0))
            self.cluster_reader = ClusterReader(assign, self.widths, self.cluster_predictions["cluster"].to_numpy(),
                                                tau=tau)
        elif cluster_tau is not None:
            raise ValueError("cluster_tau only applies with clusters=<AuditResult>; pass clusters or drop cluster_tau")

        # State that survives a resume.
        self.baseline: dict[str, Tensor] | None = None
        self.baseline_rollout: dict[str, Tensor] | None = None
        self.last_evaluated_step = -1
        # Results of the latest evaluation (rank zero), for programmatic use.
        self.last_means: dict[str, Tensor] = {}
        self.last_drift: dict[str, Tensor] = {}
        self.last_rollout_drift: dict[str, Tensor] = {}
        self.last_r2: float | None = None
        self.baseline_cluster: np.ndarray | None = None
        self.last_cluster_drift: np.ndarray | None = None
        self.last_cluster_r2: float | None = None

        self._lens: Any = None
        self._batches: list[ProbeBatch] | None = None
        self._prompts: list[list[int]] | None = None

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        extra = {} if self.cluster_reader is None else {
            "clusters": [int(c) for c in self.cluster_reader.clusters], "cluster_tau": self.cluster_reader.tau}
        return self._generate_state_key(
            hooks=sorted(self.widths.items()), every_n_steps=self.every_n_steps, responses=self.responses,
            rollouts=self.rollouts, rollout_max_new_tokens=self.rollout_max_new_tokens, **extra,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "widths": dict(self.widths),
            "baseline": None if self.baseline is None else {h: t.clone() for h, t in self.baseline.items()},
            "baseline_rollout": None if self.baseline_rollout is None
            else {h: t.clone() for h, t in self.baseline_rollout.items()},
            "last_evaluated_step": self.last_evaluated_step,
            "baseline_cluster": None if self.baseline_cluster is None else torch.from_numpy(self.baseline_cluster.copy()),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_resumed_widths(state_dict["widths"], self.widths, "ConceptDriftMonitor")
        self.baseline = _cpu(state_dict["baseline"])
        self.baseline_rollout = _cpu(state_dict["baseline_rollout"])
        self.last_evaluated_step = int(state_dict["last_evaluated_step"])
        cluster = state_dict.get("baseline_cluster")
        self.baseline_cluster = None if cluster is None else cluster.double().numpy().copy()

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, self)
        policy = find_causal_lm(pl_module)
        self.saes = build_pending_saes(self.saes, policy)
        lens = self._given_lens
        if lens is not None and lens.model is policy:
            self._lens = lens
        else:
            fidelity = getattr(lens, "min_fve", 0.5)
            self._lens = ConceptLens(policy, self.saes, stop_at_deepest=getattr(lens, "stop_at_deepest", True),
                                     fidelity_check=False if fidelity is None else fidelity)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for sae in self.saes.values():
            sae.to(pl_module.device)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.baseline is None:
            self._evaluate(trainer, trainer.global_step, first=True)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self.last_evaluated_step:
            self._evaluate(trainer, step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.evaluate_on_train_end and trainer.global_step != self.last_evaluated_step:
            self._evaluate(trainer, trainer.global_step)

    # ------------------------------------------------------------------ the probe
    def _probe_pairs(self, trainer: Trainer) -> list[Any] | None:
        probe = self.probe
        if isinstance(probe, str):
            probe = getattr(trainer, "datamodule", None)
            if probe is None or not getattr(probe, "val_pairs", None):
                raise ValueError("probe='val' needs a datamodule with val_pairs (a PreferenceDataModule with val_fraction > 0)")
        if hasattr(probe, "val_pairs"):
            if not probe.val_pairs:
                raise ValueError("the probe datamodule has no val_pairs; set a validation split or pass pairs")
            return list(probe.val_pairs)
        return None if isinstance(probe, Mapping) else list(probe)

    def _pad_id(self, trainer: Trainer) -> int:
        for source in (getattr(trainer, "datamodule", None), getattr(self.probe, "tokenizer", None)):
            pad = getattr(source, "pad_token_id", None)
            if isinstance(pad, int):
                return pad
        config = getattr(self._lens.model, "config", None)
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return 0

    def _prepare(self, trainer: Trainer) -> None:
        """Probe mini-batches (and rollout prompts) built once, on CPU."""
        from lightning_anatomy.data import collate_pairs

        pairs = self._probe_pairs(trainer)
        if pairs is not None:
            pad = self._pad_id(trainer)
            collated = [collate_pairs(pairs[i:i + self.batch_size], pad) for i in range(0, len(pairs), self.batch_size)]
            self._prompts = [list(p.prompt_ids) for p in pairs[: self.rollouts]]
        else:
            collated = [self.probe]
            self._prompts = None
        self._batches = probe_batches(collated, self.responses, self.batch_size)
        if self._prompts is None and self.rollouts:
            batch = self.probe
            if "prompt_mask" not in batch:
                raise ValueError("rollouts from a batch-dict probe need its prompt_mask; pass TokenizedPairs instead")
            n = batch["input_ids"].shape[0] // 2
            self._prompts = [batch["input_ids"][r][batch["prompt_mask"][r].bool()].tolist()
                             for r in range(min(n, self.rollouts))]
        if sum(int(m.sum()) for _, _, m in self._batches) == 0:
            raise ValueError("the probe has no completion tokens to measure (completion_mask is all False)")

    # ------------------------------------------------------------------ measuring
    def _feature_means(self, batches: list[ProbeBatch], clusters: bool = False
                       ) -> tuple[dict[str, Tensor], np.ndarray | None]:
        """Mean SAE activation per feature over `batches` and, with `clusters`, the cluster measure
        (`drift_probe.feature_means`)."""
        reader = self.cluster_reader if clusters else None
        return feature_means(self._lens, batches, self.widths, reader, self.cluster_threshold)

    def _rollout_batches(self) -> list[ProbeBatch]:
        """Greedy continuations of the rollout prompts, as teacher-forcing batches over the new tokens."""
        return rollout_batches(self._lens.model, self._prompts or [], self.rollout_max_new_tokens, self.batch_size)

    def _evaluate(self, trainer: Trainer, step: int, first: bool = False) -> None:
        if not trainer.is_global_zero and not measures_on_every_rank(trainer):
            self.last_evaluated_step = step
            return
        if self._batches is None:
            self._prepare(trainer)
        model = self._lens.model
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad(), measurement_pass():
                if first:
                    ids, attn, _ = self._batches[0]
                    self._lens.attach_check(ids, attn)
                means, _ = self._feature_means(self._batches)
                rollout, cluster = (self._feature_means(self._rollout_batches(), clusters=True) if self.rollouts
                                    else (None, None))
        finally:
            for module, mode in modes.items():
                module.training = mode
        if self.baseline is None:
            self.baseline, self.baseline_rollout = means, rollout
        if cluster is not None and self.baseline_cluster is None:
            self.baseline_cluster = cluster
        self.last_cluster_drift = None if cluster is None or self.baseline_cluster is None else (
            cluster - self.baseline_cluster)
        self.last_means = means
        self.last_drift = {h: means[h] - self.baseline[h] for h in self.widths}
        self.last_rollout_drift = {} if rollout is None or self.baseline_rollout is None else {
            h: rollout[h] - self.baseline_rollout[h] for h in self.widths}
        self.last_evaluated_step = step
        self._log(trainer, step)

    # ------------------------------------------------------------------ logging
    def _r2(self, drift: Mapping[str, Tensor]) -> float | None:
        if not self.predicted or not drift:
            return None
        refs = list(self.predicted)
        return r_squared([self.predicted[r] for r in refs], [float(drift[h][f]) for h, f in refs])

    def _log(self, trainer: Trainer, step: int) -> None:
        scalars: dict[str, float] = {}
        for name, (hook, feat) in self.track.items():
            scalars[f"concepts/drift/{name}"] = float(self.last_drift[hook][feat])
            if self.last_rollout_drift:
                scalars[f"concepts/drift_rollout/{name}"] = float(self.last_rollout_drift[hook][feat])
        self.last_r2 = self._r2(self.last_drift)
        if self.last_r2 is not None:
            scalars["concepts/drift_r2"] = self.last_r2
        rollout_r2 = self._r2(self.last_rollout_drift)
        if rollout_r2 is not None:
            scalars["concepts/drift_rollout_r2"] = rollout_r2
        self.last_cluster_r2 = None
        if self.last_cluster_drift is not None and self.cluster_predictions is not None:
            self.last_cluster_r2 = r_squared(self.cluster_predictions["predicted_shift"].to_numpy(np.float64),
                                             self.last_cluster_drift)
            if self.last_cluster_r2 is not None:
                scalars["concepts/drift_cluster_r2"] = self.last_cluster_r2
        log_scalars(trainer, scalars, step)
        log_wandb(trainer, lambda wandb: self._wandb_payload(wandb, step), step)

    def _wandb_payload(self, wandb: Any, step: int) -> dict[str, Any]:
        all_drift = torch.cat([self.last_drift[h] for h in self.widths]).numpy()
        payload: dict[str, Any] = {"concepts/drift_hist": wandb.Histogram(all_drift)}
        if step == 0 or not np.any(all_drift):
            return payload
        payload["concepts/drift_top"] = wandb_table(wandb, TABLE_COLUMNS, self.top_rows())
        if self.predicted:
            rows = [[h, f, self.labels.get((h, f), ""), p, float(self.last_drift[h][f])]
                    for (h, f), p in self.predicted.items()]
            table = wandb_table(wandb, ("hook", "feature", "label", "predicted", "observed"), rows)
            r2 = "n/a" if self.last_r2 is None else f"{self.last_r2:.3f}"
            payload["concepts/drift_scatter"] = wandb.plot.scatter(
                table, "predicted", "observed", title=f"predicted shift vs observed drift (R²={r2})")
        if self.last_cluster_drift is not None and self.cluster_predictions is not None:
            rows = [[h, int(c), float(p), float(o)] for (h, c, p), o in zip(
                self.cluster_predictions[["hook", "cluster", "predicted_shift"]].itertuples(index=False),
                self.last_cluster_drift)]
            table = wandb_table(wandb, ("hook", "cluster", "predicted", "observed"), rows)
            r2 = "n/a" if self.last_cluster_r2 is None else f"{self.last_cluster_r2:.3f}"
            payload["concepts/drift_cluster_scatter"] = wandb.plot.scatter(
                table, "predicted", "observed", title=f"cluster predicted shift vs rollout change (R²={r2})")
        return payload

    def top_rows(self) -> list[list[Any]]:
        """The top-k concepts by |drift| at the latest evaluation (rows of TABLE_COLUMNS)."""
        hooks = list(self.widths)
        drift = torch.cat([self.last_drift[h] for h in hooks])
        offsets = [0]
        for h in hooks:
            offsets.append(offsets[-1] + self.widths[h])
        top = torch.topk(drift.abs(), min(self.top_k, drift.numel())).indices.tolist()
        rows = []
        for rank, idx in enumerate(top, start=1):
            which = max(i for i, off in enumerate(offsets[:-1]) if off <= idx)
            hook, feat = hooks[which], idx - offsets[which]
            assert self.baseline is not None
            rows.append([rank, hook, feat, self.labels.get((hook, feat), ""), float(self.baseline[hook][feat]),
                         float(self.last_means[hook][feat]), float(drift[idx]), self.predicted.get((hook, feat))])
        return rows


def _cpu(tensors: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
    return None if tensors is None else {h: t.detach().cpu().to(torch.float64).clone() for h, t in tensors.items()}


__all__ = ["ConceptDriftMonitor", "r_squared", "parse_clusters", "parse_predicted", "TABLE_COLUMNS"]
