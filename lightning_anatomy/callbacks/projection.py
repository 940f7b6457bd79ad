"""`ConceptProjection`: keep training from moving the model along chosen concept directions.

Forward hooks on the policy's hook points wrap the activation h in `GradientProjection`
(identity forward, backward (I − QQᵀ)g: nothing upstream of the hook learns through the concept
subspace) and/or replace it by h − QQᵀh while training (CAFT ablation: the layers downstream
never see the concept either, and the model is untouched at inference). `ablation="mean"`
replaces the component by its mean over reference tokens instead, h − QQᵀh + Qμ: the residual
stream has no preferred origin, so moving every activation to Qᵀh = 0 acts as a steering vector
(Persona vectors, App. J.1). Amplified concepts get `GradientAmplification` instead. Because the
edit sits on the activation path and is linear in the gradient, AMP loss scaling, gradient
accumulation, DDP averaging and activation checkpointing need no special handling; the bases
(and the means) are broadcast from rank 0 so every rank edits identically. Under FSDP the means'
forwards run on every rank (each is a collective), each rank measuring its share of the pairs;
sums and counts are all-reduced (the measurement: `interventions/mean_ablation.py`).

Logged (every `trainer.log_every_n_steps` optimizer steps, rank 0):
`concepts/projection/<hook>/grad_fraction` — the share of the squared gradient norm arriving at
the hook that lies in the suppressed subspace (what the projection removes), summed over the
step's micro-batches.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import Strategy
from torch import Tensor

from lightning_anatomy.callbacks._hooked import HookedCallback
from lightning_anatomy.callbacks.logging import log_scalars
from lightning_anatomy.callbacks.options import renamed_option
from lightning_anatomy.callbacks.strategies import (
    DATA_PARALLEL,
    SHARDED,
    check_strategy,
    measures_on_every_rank,
    restores_after_fit_start,
)
from lightning_anatomy.concepts.concept_set import ConceptSet
from lightning_anatomy.interventions.activation_edits import (
    mean_ablate,
    orthonormal_union,
    project_out,
    register_activation_edit,
)
from lightning_anatomy.interventions.basis import same_subspace
from lightning_anatomy.interventions.mean_ablation import reference_means
from lightning_anatomy.interventions.projection import GradientAmplification, GradientProjection
from lightning_anatomy.model_access import (
    HookPoint,
    find_blocks,
    find_causal_lm,
    hidden_size_at,
    resolve_hook,
)

MODES = ("gradient", "ablate", "both")
LAYER_MODES = ("own", "all_later")
ACTIONS = ("suppress", "amplify")
ABLATIONS = ("zero", "mean")
DEFAULT_MEAN_PAIRS = 64
DEFAULT_STRENGTH = 2.0


@dataclass
class _Target:
    """One hooked activation and what is done to it."""

    point: HookPoint
    suppress: Tensor | None = None  # [d, k] fp32 CPU
    amplify: Tensor | None = None
    mean: Tensor | None = None  # [k] fp32 CPU: mean of Qᵀh over the reference tokens (ablation="mean")
    on_device: dict[tuple[str, torch.device], Tensor] = field(default_factory=dict)
    grad_in_span: Tensor | None = None  # Σ ||g·Q||² over the current optimizer step
    grad_total: Tensor | None = None  # Σ ||g||²

    def basis(self, action: str, device: torch.device) -> Tensor:
        key = (action, device)
        q = self.on_device.get(key)
        if q is None:
            q = self.on_device[key] = getattr(self, action).to(device=device, dtype=torch.float32)
        return q


class ConceptProjection(HookedCallback):
    """Project (or ablate) suppressed concepts and amplify amplified ones, on any HF causal LM.

    Args:
        concepts: a `ConceptSet` (or the directory of a saved one). Concepts with action
            `suppress` are removed, `amplify` ones are amplified, `allow` ones ignored.
        mode: `"gradient"` (edit gradients only; forward unchanged), `"ablate"` (CAFT: the
            forward replaces h by h − QQᵀh in the Trainer's training stage, never in validation
            or after fit; its backward projects the gradient too) or `"both"`.
        layers: `"own"` (each concept at its own hook), `"all_later"` (also at the `resid_post`
            of every later block) or an explicit list of hook names / block indices (an int i
            means `blocks.{i}.hook_resid_post`), where the union of all the set's bases of the
            matching width is applied.
        strength: the gradient factor (> 1) along amplified concepts (suppressed ones are
            removed whatever it is).
        ablation: what the ablated component is replaced by: `"zero"` (CAFT, h − QQᵀh) or
            `"mean"` (h − QQᵀh + Qμ, μ the mean of Qᵀh over the completion tokens of the first
            `mean_pairs` training pairs, measured at fit start (FSDP: train start) with the initial weights in a
            `measurement_pass()`; broadcast from rank 0 and kept in checkpoints, so a resumed run
            uses the same μ). Needs `mode="ablate"` or `"both"` and a datamodule with
            `train_pairs` (`PreferenceDataModule`).
        mean_pairs: how many training pairs μ is measured on.
        allow_untested_strategy: run under strategies other than `supported_strategies`.
        amplify_factor: deprecated name of `strength` (accepted for one release, with a
            DeprecationWarning).

    Strategies (`supported_strategies`): SingleDeviceStrategy, DDPStrategy, FSDPStrategy and
    ModelParallelStrategy (FSDP2, without tensor parallelism); others are refused at setup.
    """

    supported_strategies: ClassVar[tuple[type[Strategy], ...]] = DATA_PARALLEL + SHARDED

    def __init__(
        self,
        concepts: ConceptSet | str | os.PathLike,
        mode: str = "gradient",
        layers: str | Sequence[str | int] = "own",
        strength: float = DEFAULT_STRENGTH,
        ablation: str = "zero",
        mean_pairs: int = DEFAULT_MEAN_PAIRS,
        allow_untested_strategy: bool = False,
        *,
        amplify_factor: float | None = None,
    ) -> None:
        super().__init__()
        strength = renamed_option("ConceptProjection", "strength", strength, "amplify_factor", amplify_factor,
                                  default=DEFAULT_STRENGTH)
        if isinstance(concepts, str | os.PathLike):
            concepts = ConceptSet.load(concepts)
        if mode not in MODES:
            raise ValueError(f"ConceptProjection: mode={mode!r} is not one of {MODES}")
        self.layers = _check_layers(layers)
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not (
            math.isfinite(strength) and strength > 1
        ):
            raise ValueError(f"ConceptProjection: strength (the amplify factor) must be a finite number > 1, "
                             f"got {strength!r}")
        if ablation not in ABLATIONS:
            raise ValueError(f"ConceptProjection: ablation={ablation!r} is not one of {ABLATIONS}")
        if ablation == "mean" and mode == "gradient":
            raise ValueError(
                "ConceptProjection: ablation='mean' replaces the ablated component of the activation, but "
                "mode='gradient' ablates nothing; use mode='ablate' or 'both' with it"
            )
        if isinstance(mean_pairs, bool) or not isinstance(mean_pairs, int) or mean_pairs < 1:
            raise ValueError(f"ConceptProjection: mean_pairs must be an integer >= 1, got {mean_pairs!r}")
        self.mode = mode
        self.ablation = ablation
        self.mean_pairs = mean_pairs
        self.strength = float(strength)
        self.allow_untested_strategy = bool(allow_untested_strategy)
        self.concepts = concepts
        self.sources = _source_bases(concepts)
        self._targets: dict[str, _Target] = {}
        self._resumed_means: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ identity and resume
    @property
    def state_key(self) -> str:
        layers = self.layers if isinstance(self.layers, str) else tuple(self.layers)
        # the mean-ablation settings only enter when used: zero-ablation checkpoints keep their key
        extra = {"ablation": self.ablation, "mean_pairs": self.mean_pairs} if self.ablation == "mean" else {}
        # "amplify_factor" stays the name in the key and the saved settings: checkpoints written
        # before `strength` was its name resume unchanged
        return self._generate_state_key(mode=self.mode, layers=layers, amplify_factor=self.strength, **extra)

    @property
    def amplify_factor(self) -> float:
        """Deprecated name of `strength`."""
        return self.strength

    def _settings(self) -> dict[str, Any]:
        settings = {"mode": self.mode, "layers": self.layers, "amplify_factor": self.strength,
                    "ablation": self.ablation}
        if self.ablation == "mean":
            settings["mean_pairs"] = self.mean_pairs
        return settings

    @property
    def means(self) -> dict[str, Tensor]:
        """`{target hook: μ [k]}` of the mean ablation (empty before fit start or with ablation="zero")."""
        return {name: t.mean.clone() for name, t in self._targets.items() if t.mean is not None}

    @property
    def fingerprint(self) -> str:
        """A short hash of the hooks, actions and subspaces of the concept set (for messages and logs).

        Each subspace enters as its projector applied to a fixed random probe, rounded: the same
        for any orthonormal basis of the same span, and O(d·k) even for wide models.
        """
        import hashlib

        digest = hashlib.sha256()
        for (hook, action), q in sorted(self.sources.items()):
            probe = torch.randn(q.shape[0], 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            projected = q.double() @ (q.double().T @ probe)
            digest.update(f"{hook}|{action}|{q.shape[1]}".encode())
            digest.update(projected.mul(1e3).round().to(torch.int64).numpy().tobytes())
        return digest.hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        state = {
            "fingerprint": self.fingerprint,
            "settings": self._settings(),
            "bases": {f"{hook}|{action}": q.clone() for (hook, action), q in self.sources.items()},
        }
        if self.ablation == "mean":
            state["means"] = self.means or dict(self._resumed_means or {})
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume a run that projected a different concept set (or with other settings)."""
        saved = {tuple(k.split("|", 1)): q for k, q in state_dict.get("bases", {}).items()}
        mine = self.sources
        differs = set(saved) != set(mine) or any(not same_subspace(saved[key], mine[key]) for key in mine)
        if differs:
            raise ValueError(
                f"ConceptProjection: the checkpoint was trained with a different concept set (fingerprint "
                f"{state_dict.get('fingerprint')!r}, bases {sorted('|'.join(k) for k in saved)}) than this callback's "
                f"(fingerprint {self.fingerprint!r}, bases {sorted('|'.join(k) for k in mine)}); resume with the "
                "same ConceptSet, or start a new run instead of resuming"
            )
        # checkpoints from before mean ablation existed carry no ablation settings: zero-ablation
        settings = {"ablation": "zero", **state_dict.get("settings", {})}
        mine_settings = self._settings()
        if state_dict.get("settings") and settings != mine_settings:
            raise ValueError(
                f"ConceptProjection: the checkpoint used settings {settings} but this callback has {mine_settings}; "
                "resume with the same settings"
            )
        if self.ablation == "mean":
            means = state_dict.get("means")
            if not means:
                raise ValueError(
                    "ConceptProjection: the checkpoint holds no ablation means (ablation='mean'); they must be the "
                    "ones measured with the run's initial weights, which a resumed run no longer has. Resume with "
                    "the run's own checkpoint, or start a new run"
                )
            self._resumed_means = {name: torch.as_tensor(mu).detach().float().cpu().clone()
                                   for name, mu in means.items()}

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, self)
        self._targets = self._plan(find_causal_lm(pl_module))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._targets:  # fit without setup (a Trainer subclass skipping it): plan now
            check_strategy(trainer, self)
            self._targets = self._plan(find_causal_lm(pl_module))
        self.remove_hooks()  # before measuring the means: none of this callback's edits may act
        means = {} if restores_after_fit_start(trainer) else self._ablation_means(trainer, pl_module)
        shared = trainer.strategy.broadcast(
            {name: (t.suppress, t.amplify, means.get(name)) for name, t in self._targets.items()}, src=0
        )
        for name, (suppress, amplify, mean) in shared.items():
            target = self._targets[name]
            target.suppress, target.amplify, target.mean = suppress, amplify, mean
            target.on_device.clear()
        for target in self._targets.values():
            self._handles.append(register_activation_edit(target.point, self._edit_for(target, trainer)))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The ablation means under strategies that restore a checkpoint after on_fit_start (FSDP):
        here they come from the checkpoint, and a forward before the restore would run on weights
        about to be replaced. Ablation acts only while training, so the edits wait for nothing;
        the hooks skip this measurement pass."""
        if self.ablation != "mean" or not restores_after_fit_start(trainer):
            return
        shared = trainer.strategy.broadcast(self._ablation_means(trainer, pl_module), src=0)
        for name, mean in shared.items():
            self._targets[name].mean = mean
            self._targets[name].on_device.clear()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        every = max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1)
        log_now = trainer.global_step % every == 0
        metrics = {}
        for name, target in self._targets.items():
            if target.grad_total is None:
                continue
            if log_now:
                total = float(target.grad_total)
                metrics[f"concepts/projection/{name}/grad_fraction"] = (
                    float(target.grad_in_span) / total if total > 0 else 0.0
                )
            target.grad_in_span = target.grad_total = None
        if metrics:
            log_scalars(trainer, metrics, step=trainer.global_step)


    # ------------------------------------------------------------------ mean ablation
    def _ablation_means(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Tensor]:
        """μ per suppressed target: from the checkpoint on resume, else measured on rank 0 (other
        ranks get it by broadcast), or under FSDP on every rank, each on its share of the pairs."""
        if self.ablation != "mean":
            return {}
        wanted = sorted(name for name, t in self._targets.items() if t.suppress is not None)
        if self._resumed_means is not None:
            return self._checked_resumed_means()
        datamodule = getattr(trainer, "datamodule", None)
        pairs = list(getattr(datamodule, "train_pairs", None) or [])[: self.mean_pairs]
        if not pairs:
            raise ValueError(
                "ConceptProjection: ablation='mean' measures the mean component on the datamodule's train_pairs, but "
                f"{type(datamodule).__name__ if datamodule is not None else 'the trainer'} has none; fit with a "
                "PreferenceDataModule (trainer.fit(module, datamodule=...)) or use ablation='zero'"
            )
        every_rank = measures_on_every_rank(trainer)
        if not trainer.is_global_zero and not every_rank:
            return {}
        pad = getattr(datamodule, "pad_token_id", None)
        split = {}
        if every_rank:
            strategy = trainer.strategy
            split = {"rank": trainer.global_rank, "world": trainer.world_size,
                     "all_reduce": lambda t: strategy.reduce(t, reduce_op="sum")}
        return reference_means(find_causal_lm(pl_module), {n: self._targets[n] for n in wanted}, pairs,
                               pad_token_id=0 if pad is None else int(pad), **split)

    def _checked_resumed_means(self) -> dict[str, Tensor]:
        """The checkpoint's means, once (a later fit measures anew), if they fit this callback's targets."""
        means, self._resumed_means = dict(self._resumed_means or {}), None
        wanted = sorted(name for name, t in self._targets.items() if t.suppress is not None)
        if sorted(means) != wanted or any(means[n].shape != (self._targets[n].suppress.shape[1],) for n in wanted):
            raise ValueError(
                f"ConceptProjection: the checkpoint's ablation means are for hooks {sorted(means)}, "
                f"this callback ablates at {wanted}; resume with the same concepts and layers"
            )
        return means

    @property
    def hooked(self) -> list[str]:
        """Names of the hook points currently hooked (empty outside fit)."""
        return list(self._targets) if self._handles else []

    # ------------------------------------------------------------------ planning
    def _plan(self, model: torch.nn.Module) -> dict[str, _Target]:
        """Resolve every target hook, check widths, and union the bases landing on one module."""
        pending: dict[tuple[int, str], tuple[HookPoint, dict[str, list[Tensor]]]] = {}
        for (hook, action), q in self.sources.items():
            for point in self._target_points(model, hook):
                width = hidden_size_at(model, point)
                if isinstance(self.layers, list) and width != q.shape[0]:
                    continue  # explicit layers: bases apply where their width fits
                if width != q.shape[0]:
                    raise ValueError(
                        f"ConceptProjection: concepts at {hook!r} have d={q.shape[0]} but the model's activation at "
                        f"{point.name!r} has width {width}; the concept set was built for another model"
                    )
                key = (id(point.module), point.kind)
                entry = pending.setdefault(key, (point, {a: [] for a in ACTIONS}))
                entry[1][action].append(q)
        if isinstance(self.layers, list):
            widths = {q.shape[0] for q in self.sources.values()}
            for point in self._explicit_points(model):
                if (id(point.module), point.kind) not in pending:
                    raise ValueError(
                        f"ConceptProjection: layers entry {point.name!r} has width {hidden_size_at(model, point)}, "
                        f"but the concept set's vectors have d in {sorted(widths)}; list hooks of that width"
                    )
        targets = {}
        for point, per_action in pending.values():
            target = _Target(point)
            for action, bases in per_action.items():
                if bases:
                    setattr(target, action, bases[0] if len(bases) == 1 else orthonormal_union(bases))
            targets[point.name] = target
        return targets

    def _explicit_points(self, model: torch.nn.Module) -> list[HookPoint]:
        points = []
        for i, entry in enumerate(self.layers):
            name = f"blocks.{entry}.hook_resid_post" if isinstance(entry, int) else entry
            try:
                points.append(resolve_hook(model, name))
            except ValueError as err:
                raise ValueError(f"ConceptProjection: layers[{i}]={entry!r}: {err}") from None
        return points

    def _target_points(self, model: torch.nn.Module, hook: str) -> list[HookPoint]:
        if isinstance(self.layers, list):
            return self._explicit_points(model)
        try:
            point = resolve_hook(model, hook)
        except ValueError as err:
            raise ValueError(f"ConceptProjection: concept hook {hook!r} does not fit the model: {err}") from None
        if self.layers == "own":
            return [point]
        _, blocks = find_blocks(model)
        n = len(blocks)
        is_block_output = point.kind == "output" and 0 <= point.layer < n and point.module is blocks[point.layer]
        first_later = point.layer + 1 if is_block_output else max(point.layer, 0)
        later = [resolve_hook(model, f"blocks.{i}.hook_resid_post") for i in range(first_later, n)]
        return [point, *later]

    # ------------------------------------------------------------------ the hook
    def _edit_for(self, target: _Target, trainer: Trainer):
        """The edit at one target. Ablation follows the Trainer's training stage, not the module's
        train/eval mode (Lightning trains a model built in eval mode in eval mode); it must not
        depend on grad mode either, or reentrant checkpointing would recompute a different forward."""
        mode, factor = self.mode, self.strength

        def edit(hidden: Tensor, module: torch.nn.Module) -> Tensor | None:
            out = hidden
            tracking = torch.is_grad_enabled() and hidden.requires_grad
            if target.amplify is not None and tracking:
                out = GradientAmplification.apply(out, target.basis("amplify", hidden.device), factor)
            if target.suppress is not None:
                q = target.basis("suppress", hidden.device)
                ablate = mode in ("ablate", "both") and trainer.training
                project = mode in ("gradient", "both") and tracking
                if ablate:
                    if target.mean is not None:
                        out = mean_ablate(out, q, target.basis("mean", hidden.device))
                    else:
                        out = project_out(out, q)
                if project:
                    out = GradientProjection.apply(out, q)
                if tracking and (ablate or project):
                    # The gradient arriving here is the one before the edit. Registered on this
                    # forward's output only: a checkpoint recompute builds a graph that is never
                    # backpropagated, so each backward is counted exactly once.
                    out.register_hook(_grad_counter(target, q))
            return None if out is hidden else out

        return edit


def _grad_counter(target: _Target, q: Tensor):
    def count(grad: Tensor) -> None:
        g = grad.detach().float()
        in_span = (g @ q).square().sum()
        total = g.square().sum()
        target.grad_in_span = in_span if target.grad_in_span is None else target.grad_in_span + in_span
        target.grad_total = total if target.grad_total is None else target.grad_total + total

    return count


def _check_layers(layers: Any) -> str | list[str | int]:
    if isinstance(layers, str):
        if layers not in LAYER_MODES:
            raise ValueError(
                f"ConceptProjection: layers={layers!r} is not one of {LAYER_MODES} or a list of hook names / block indices"
            )
        return layers
    if not isinstance(layers, Sequence) or not layers:
        raise ValueError(f"ConceptProjection: layers must be 'own', 'all_later' or a non-empty list, got {layers!r}")
    out: list[str | int] = []
    for i, entry in enumerate(layers):
        valid_int = isinstance(entry, int) and not isinstance(entry, bool) and entry >= 0
        if not (valid_int or (isinstance(entry, str) and entry)):
            raise ValueError(
                f"ConceptProjection: layers[{i}]={entry!r} is neither a hook name nor a block index (int >= 0)"
            )
        out.append(entry)
    return out


def _source_bases(concepts: Any) -> dict[tuple[str, str], Tensor]:
    """`{(hook, action): basis [d, k]}` for every hook with suppressed / amplified concepts."""
    if not hasattr(concepts, "select") or not hasattr(concepts, "basis"):
        raise ValueError(
            f"ConceptProjection: concepts must be a ConceptSet (or the directory of a saved one), "
            f"got {type(concepts).__name__}"
        )
    sources = {}
    for action in ACTIONS:
        for hook in concepts.select(action=action).hooks:
            sources[(hook, action)] = concepts.basis(hook, action).float().cpu().contiguous()
    if not sources:
        raise ValueError(
            "ConceptProjection: concepts has no concept with action 'suppress' or 'amplify' "
            f"({len(concepts)} concepts, all 'allow'); set actions in concepts.yaml or with ConceptSet.with_actions"
        )
    return sources


__all__ = ["ConceptProjection", "MODES", "LAYER_MODES", "ABLATIONS", "reference_means"]
