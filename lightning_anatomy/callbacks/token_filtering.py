"""`TokenFiltering`: remove the completion tokens that carry a concept from DPO's log-probs.

Bergen et al. §3.3 (after Rathi & Radford 2026): for style traits that sit in short spans, the
tokens carrying the trait are taken out of the training signal. In DPO that is a mask on the
completion tokens that enter the sequence log-probs, for the policy and the reference alike, so
neither the log-ratio nor the sigmoid weight sees them.

The masks are computed once, at fit start, with the initial model (one measurement pass for
SAE / ConceptSet scores; patterns need only the tokenizer), kept per row id (and in checkpoints,
so a resumed run does not measure its trained model), optionally cached on disk under a
fingerprint of what they depend on (as reward-shaping scores are), and written into the
DataModule's pairs (`TokenizedPair.chosen_keep` / `rejected_keep`): `collate_pairs` then adds the
batch key `loss_mask`, which DPOModule scores instead of `completion_mask` in every reference
mode, and a precomputed reference table is keyed on the masks (its fingerprint hashes the pairs).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import Strategy

from lightning_anatomy.callbacks.sae_specs import build_pending_saes, load_saes
from lightning_anatomy.callbacks.strategies import (
    DATA_PARALLEL,
    SHARDED,
    check_strategy,
    restores_after_fit_start,
)
from lightning_anatomy.concepts.concept_set import ConceptSet
from lightning_anatomy.concepts.lens import ConceptLens
from lightning_anatomy.data.tokenize import TokenizedPair
from lightning_anatomy.digests import (
    callable_digest,
    combined_digest,
    full_model_digest,
    model_digest,
    pairs_digest,
    tensor_digest,
)
from lightning_anatomy.interventions.token_filter import (
    FILTER_SIDES,
    UNITS,
    ActivationScore,
    Quantile,
    callable_scores,
    compile_patterns,
    direction_score,
    load_token_masks,
    measure_token_scores,
    pattern_hits,
    resolve_threshold,
    sae_feature_score,
    save_token_masks,
    widen_token_hits,
)
from lightning_anatomy.model_access import find_causal_lm
from lightning_anatomy.sharding import has_fsdp1_units

if TYPE_CHECKING:
    from sae_lens import SAE

log = logging.getLogger(__name__)

METRIC = "concepts/token_filter/dropped_fraction"
Masks = dict[int, tuple[tuple[bool, ...], tuple[bool, ...]]]


def _metric_name(concept: str) -> str:
    return f"{METRIC}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', concept).strip('_') or 'concept'}"


class TokenFiltering(Callback):
    """Remove the completion tokens flagged by patterns or concept scores from DPO's log-probs.

    Args:
        patterns: strings searched as regular expressions in each decoded completion
            (`re.escape` a string to match it literally); a token is flagged where its text
            overlaps a match. `TokenFiltering(patterns=["SURE"])` drops every token of "SURE".
        concepts: measured concepts: `{name: (hook, feature)}` SAE features (with `saes`), a
            `ConceptSet` (its `suppress` concepts, scored by projection on their unit
            directions), or a callable `fn(row_id, side, completion_ids) -> one score per token`
            (or `{name: callable}`), e.g. a ground-truth oracle.
        saes: `{hook: SAE or SAE spec}` or a `ConceptLens`, for `(hook, feature)` concepts.
        threshold: a token is flagged where its score is above it: one value or `Quantile(q)`
            for every concept, or `{name: value | Quantile}`; a fitted one comes from
            `interventions.fit_threshold(scores, labels)`. Default: 0 for SAE features and
            callables (the feature fires / the callable says so); a ConceptSet needs one.
        unit: `"token"` (the flagged tokens) or `"word"` (every token of a flagged token's
            whitespace-delimited word; the paper's unit).
        sides: filter `"both"` completions, only `"chosen"` or only `"rejected"`.
        batch_size: pairs per forward of the measurement pass.
        cache_dir: a folder where the masks (with the per-concept counts and the report) are
            cached as `token-masks-<fingerprint>.json`; a run that finds its file skips the
            measurement pass. The fingerprint covers the model's weights (only when SAE or
            ConceptSet concepts need the model), the pairs' token ids, the tokenizer's vocabulary
            (patterns, `unit="word"`), the patterns, the concepts (SAE weights and feature,
            ConceptSet vectors, a callable by its name, code and closure: `digests.callable_digest`),
            the thresholds, `unit` and `sides`. Rank zero reads and
            writes it. None: no cache.
        allow_untested_strategy: run under strategies other than single-device, DDP and FSDP.

    The tokenizer is the DataModule's (`trainer.datamodule.tokenizer`), and the pairs are its
    `pairs` / `train_pairs` / `val_pairs`, which keep the masks after fit. Logs
    `concepts/token_filter/dropped_fraction` (share of the batch's completion tokens removed)
    and `concepts/token_filter/dropped_fraction/<concept>` every training step.

    Strategies (`supported_strategies`): SingleDeviceStrategy, DDPStrategy, FSDPStrategy (FSDP1)
    and ModelParallelStrategy (FSDP2); every rank measures (an FSDP forward is a collective) and
    rank zero's masks (and counts) are broadcast. A resumed run takes the masks from the
    checkpoint and never measures its trained model: where the strategy loads the checkpoint
    after `on_fit_start` (FSDP), the masks measured there on the freshly built (initial) weights
    are replaced by the checkpoint's when it loads, before any batch; with `cache_dir` that
    measurement is a cache hit.

    Raises:
        ValueError: at construction for invalid options (a bad regular expression is named); at
            fit start when no pair has a completion left, for a cache file that is not a
            token-mask file (named), or for a resume from a checkpoint without this filter's
            masks when its concepts would have to be measured on the trained model.
    """

    supported_strategies: ClassVar[tuple[type[Strategy], ...]] = (*DATA_PARALLEL, *SHARDED)

    def __init__(
        self,
        patterns: Sequence[str] | None = None,
        *,
        concepts: (ConceptSet | Mapping[str, tuple[str, int] | Callable[[int, str, list[int]], Sequence[float]]]
                   | Callable[[int, str, list[int]], Sequence[float]] | None) = None,
        saes: Mapping[str, SAE | str | Mapping[str, str]] | ConceptLens | None = None,
        threshold: float | Quantile | Mapping[str, float | Quantile] | None = None,
        unit: str = "token",
        sides: str = "both",
        batch_size: int = 8,
        cache_dir: str | None = None,
        allow_untested_strategy: bool = False,
    ) -> None:
        super().__init__()
        if patterns is None and concepts is None:
            raise ValueError("TokenFiltering: pass patterns=[...] (text to filter) and/or concepts= (measured concepts)")
        if unit not in UNITS:
            raise ValueError(f"TokenFiltering: unit={unit!r} is not one of {UNITS}")
        if sides not in FILTER_SIDES:
            raise ValueError(f"TokenFiltering: sides={sides!r} is not one of {FILTER_SIDES}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"TokenFiltering: batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(patterns, str):
            patterns = [patterns]
        self.patterns = compile_patterns(patterns) if patterns is not None else []
        if patterns is not None and not self.patterns:
            raise ValueError("TokenFiltering: patterns is empty; pass at least one pattern or leave it None")
        self.unit, self.sides, self.batch_size = unit, sides, batch_size
        if cache_dir is not None and not isinstance(cache_dir, str | os.PathLike):
            raise ValueError(f"TokenFiltering: cache_dir must be a folder path or None, got {cache_dir!r}")
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.allow_untested_strategy = bool(allow_untested_strategy)
        self._saes: dict[str, Any] = {}
        if saes is not None:
            self._saes, _ = load_saes(saes, "TokenFiltering")
        self._concepts = self._plan(concepts)  # name -> ("sae", hook, feature) | ("direction", hook, v) | ("fn", fn)
        names = [p.pattern for p in self.patterns] + list(self._concepts)
        if len(set(names)) != len(names):
            raise ValueError(f"TokenFiltering: concept names must be unique, got {names}")
        self.thresholds = self._check_thresholds(threshold)
        self.masks: Masks | None = None
        self.concept_drops: dict[str, dict[int, int]] = {}
        self.report: dict[str, Any] = {}
        self._datamodule: Any = None  # during a fit: re-masked when a checkpoint loads after on_fit_start
        self._masked: list[list[TokenizedPair]] = []  # every pair list masked in this fit (a loader may hold one)

    # ------------------------------------------------------------------ options
    def _plan(self, concepts: object) -> dict[str, tuple]:
        if concepts is None:
            return {}
        if isinstance(concepts, ConceptSet):
            chosen = concepts.select(action="suppress")
            if not len(list(chosen)):
                raise ValueError("TokenFiltering: the ConceptSet has no 'suppress' concept to filter; set actions "
                                 "with ConceptSet.with_actions")
            return {c.name: ("direction", c.hook, c.vector) for c in chosen}
        if callable(concepts):
            return {getattr(concepts, "__name__", "callable"): ("fn", concepts)}
        if not isinstance(concepts, Mapping) or not concepts:
            raise ValueError("TokenFiltering: concepts must be a ConceptSet, a callable, or a non-empty dict "
                             f"{{name: (hook, feature) | callable}}; got {type(concepts).__name__}")
        plan: dict[str, tuple] = {}
        for name, spec in concepts.items():
            if callable(spec):
                plan[str(name)] = ("fn", spec)
                continue
            if not (isinstance(spec, tuple | list) and len(spec) == 2 and isinstance(spec[0], str)):
                raise ValueError(f"TokenFiltering: concepts[{name!r}] must be (hook, feature) or a callable, got {spec!r}")
            hook, feature = spec
            if hook not in self._saes:
                raise ValueError(f"TokenFiltering: concepts[{name!r}] reads hook {hook!r}, but saes= has no SAE there "
                                 f"(hooks: {sorted(self._saes)}); pass saes={{{hook!r}: SAE}}")
            plan[str(name)] = ("sae", hook, feature)
        return plan

    def _check_thresholds(self, threshold: object) -> dict[str, float | Quantile | None]:
        names = list(self._concepts)
        if isinstance(threshold, Mapping):
            unknown = [k for k in threshold if k not in names]
            if unknown:
                raise ValueError(f"TokenFiltering: threshold names {unknown}, which are not concepts ({names})")
            out = {n: threshold.get(n) for n in names}
        else:
            out = {n: threshold for n in names}
        for name, value in out.items():
            if value is not None and not isinstance(value, Quantile):
                resolve_threshold(name, value, (), None)  # type and finiteness, named
            if value is None and self._concepts[name][0] == "direction":
                resolve_threshold(name, None, (), None)  # a ConceptSet needs one
        return out

    @property
    def state_key(self) -> str:
        return self._generate_state_key(patterns=tuple(p.pattern for p in self.patterns),
                                        concepts=tuple(self._concepts), unit=self.unit, sides=self.sides)

    # ------------------------------------------------------------------ masks
    def compute_masks(self, pairs: Sequence[TokenizedPair], tokenizer: object, model: torch.nn.Module | None,
                      pad_token_id: int = 0) -> Masks:
        """`{row_id: (chosen keep, rejected keep)}` (False: removed) and the per-concept counts."""
        pairs = list(pairs)
        if not pairs:
            raise ValueError("TokenFiltering: no pairs to filter")
        sides = ("chosen", "rejected") if self.sides == "both" else (self.sides,)
        flags: dict[str, dict[int, dict[str, list[bool]]]] = {}
        needs_text = bool(self.patterns) or self.unit == "word"
        if needs_text and tokenizer is None:
            raise ValueError("TokenFiltering: patterns and unit='word' need the tokenizer: use a PreferenceDataModule "
                             "(its tokenizer) with the Trainer")
        if self.patterns:
            for pattern in self.patterns:
                flags[pattern.pattern] = {p.row_id: {} for p in pairs}
            for p in pairs:
                for s in sides:
                    hits = pattern_hits(tokenizer, getattr(p, f"{s}_ids"), self.patterns, self.unit)
                    for pattern, pattern_hit in zip(self.patterns, hits):
                        flags[pattern.pattern][p.row_id][s] = pattern_hit
        for name, scores in self._measure(pairs, model, pad_token_id).items():
            values = [v for per_side in scores.values() for i, s in enumerate(("chosen", "rejected")) if s in sides
                      for v in per_side[i]]
            default = 0.0 if self._concepts[name][0] in ("sae", "fn") else None
            cut = resolve_threshold(name, self.thresholds[name], values, default)
            per_row = {}
            for p in pairs:
                per_row[p.row_id] = {}
                for i, s in enumerate(("chosen", "rejected")):
                    if s not in sides:
                        continue
                    hits = [v > cut for v in scores[p.row_id][i]]
                    if self.unit == "word":
                        hits = widen_token_hits(tokenizer, getattr(p, f"{s}_ids"), hits)
                    per_row[p.row_id][s] = hits
            flags[name] = per_row
        masks: Masks = {}
        self.concept_drops = {name: {} for name in flags}
        for p in pairs:
            keep = {}
            for s in ("chosen", "rejected"):
                n = len(getattr(p, f"{s}_ids"))
                hit = [False] * n
                for name, per_row in flags.items():
                    concept_hits = per_row[p.row_id].get(s, [False] * n)
                    hit = [a or b for a, b in zip(hit, concept_hits)]
                    self.concept_drops[name][p.row_id] = self.concept_drops[name].get(p.row_id, 0) + sum(concept_hits)
                keep[s] = tuple(not h for h in hit)
            masks[p.row_id] = (keep["chosen"], keep["rejected"])
        self._check_masks(pairs, masks)
        return masks

    def _measure(self, pairs: list[TokenizedPair], model: torch.nn.Module | None, pad_token_id: int
                 ) -> dict[str, dict[int, tuple[list[float], list[float]]]]:
        scorers: dict[str, ActivationScore] = {}
        out: dict[str, dict[int, tuple[list[float], list[float]]]] = {}
        for name, spec in self._concepts.items():
            if spec[0] == "fn":
                out[name] = callable_scores(spec[1], name, pairs)
            elif spec[0] == "sae":
                scorers[name] = sae_feature_score(self._saes[spec[1]], spec[1], spec[2])
            else:
                scorers[name] = direction_score(spec[1], spec[2])
        if scorers:
            if model is None:
                raise ValueError("TokenFiltering: SAE and ConceptSet concepts are measured with the model; none given")
            out.update(measure_token_scores(model, pairs, scorers, pad_token_id=pad_token_id,
                                            batch_size=self.batch_size))
        return {name: out[name] for name in self._concepts}

    def _check_masks(self, pairs: list[TokenizedPair], masks: Masks) -> None:
        total = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        dropped = {name: sum(per_row.values()) for name, per_row in self.concept_drops.items()}
        for name, n in dropped.items():
            if n == 0:
                log.warning("TokenFiltering: %r flags no completion token of the %d pairs (0 %% dropped); check the "
                            "pattern or threshold", name, len(pairs))
        emptied = [rid for rid, (c, r) in masks.items() if not any(c) or not any(r)]
        removed = sum(c.count(False) + r.count(False) for c, r in masks.values())
        self.report = {"pairs": len(pairs), "dropped_tokens": removed, "completion_tokens": total,
                       "dropped_fraction": removed / max(total, 1), "per_concept": dropped, "emptied_pairs": emptied}
        if emptied and len(emptied) == len(pairs):
            raise ValueError(
                f"TokenFiltering removes every token of a completion in all {len(pairs)} pairs, so no pair has a "
                "preference left to learn; narrow the patterns, raise the threshold or use unit='token'"
            )
        if emptied:
            log.warning("TokenFiltering: %d of %d pairs lose every token of a completion (row ids %s%s); their emptied "
                        "side scores 0 log-prob", len(emptied), len(pairs), emptied[:10],
                        ", ..." if len(emptied) > 10 else "")

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer, self)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = getattr(trainer, "datamodule", None)
        pairs = getattr(dm, "pairs", None)
        if dm is None or pairs is None:
            raise ValueError("TokenFiltering needs a PreferenceDataModule passed to trainer.fit(datamodule=...): "
                             "it filters the DataModule's pairs with the DataModule's tokenizer")
        if self.masks is None:
            if trainer.ckpt_path and self._needs_model() and not restores_after_fit_start(trainer):
                raise ValueError(
                    f"TokenFiltering: the checkpoint {str(trainer.ckpt_path)!r} holds no masks for this filter "
                    f"(state key {self.state_key!r}), and its concepts {sorted(self._concepts)} would be measured "
                    "on the trained model; resume with the run's own TokenFiltering settings, or start a new run"
                )
            self._measure_or_load(trainer, pl_module, dm, pairs)
        self._datamodule = dm
        self._apply(dm)

    def _needs_model(self) -> bool:
        return any(spec[0] in ("sae", "direction") for spec in self._concepts.values())

    def _measure_or_load(self, trainer: Trainer, pl_module: LightningModule, dm: Any,
                         pairs: Sequence[TokenizedPair]) -> None:
        """Masks from the cache file (rank zero reads it), else measured on every rank; rank zero's
        are broadcast, and written to the cache by rank zero alone."""
        strategy = trainer.strategy
        tokenizer = getattr(dm, "tokenizer", None)
        model = find_causal_lm(pl_module) if self._concepts else None
        if model is not None and self._saes:
            self._saes = build_pending_saes(self._saes, model)
        path, meta = None, {}
        if self.cache_dir is not None:  # every rank: the weight digest is a collective under FSDP
            fingerprint, meta = self._fingerprint(pairs, tokenizer, model, trainer)
            path = Path(self.cache_dir) / f"token-masks-{fingerprint}.json"
        found, problem = None, None
        if path is not None and strategy.is_global_zero and path.is_file():
            try:
                found = load_token_masks(path)
                self._check_cached(path, pairs, *found)
            except (OSError, ValueError) as err:  # raised on every rank below, not only here
                found, problem = None, str(err)
        found, problem = strategy.broadcast((found, problem), src=0)
        if problem:
            raise ValueError(problem)
        if found is None:
            masks = self.compute_masks(pairs, tokenizer, model, getattr(dm, "pad_token_id", 0))
            self.masks, self.concept_drops, self.report = strategy.broadcast(
                (masks, self.concept_drops, self.report), src=0)
            if path is not None and strategy.is_global_zero:
                try:
                    save_token_masks(path, self.masks, self.concept_drops, report=self.report, meta=meta)
                except OSError as err:  # a cache only saves time: training goes on without it
                    log.warning("TokenFiltering: could not write the mask cache %s (%s)", path, err)
        else:
            self.masks, self.concept_drops = found
            self._check_masks(list(pairs), self.masks)  # the report (and its warnings), as when measured

    def _check_cached(self, path: Path, pairs: Sequence[TokenizedPair], masks: Masks,
                      drops: Mapping[str, Mapping[int, int]]) -> None:
        names = [p.pattern for p in self.patterns] + list(self._concepts)
        bad = [p.row_id for p in pairs if p.row_id not in masks
               or (len(masks[p.row_id][0]), len(masks[p.row_id][1])) != (len(p.chosen_ids), len(p.rejected_ids))]
        if bad or sorted(drops) != sorted(names):
            raise ValueError(f"{path} does not fit this data and these concepts (row ids {bad[:5]}, concepts "
                             f"{sorted(drops)}); delete it (it is a cache) to recompute the masks")

    def _fingerprint(self, pairs: Sequence[TokenizedPair], tokenizer: object, model: torch.nn.Module | None,
                     trainer: Trainer) -> tuple[str, dict[str, Any]]:
        """The cache key: everything the masks depend on (see `cache_dir`), and the readable settings."""
        concepts: dict[str, list] = {}
        for name, spec in self._concepts.items():
            if spec[0] == "sae":
                concepts[name] = ["sae", spec[1], int(spec[2]), _module_digest(self._saes[spec[1]])]
            elif spec[0] == "direction":
                concepts[name] = ["direction", spec[1], tensor_digest(spec[2])]
            else:
                concepts[name] = ["callable", callable_digest(spec[1])]
        settings = {
            "patterns": [[p.pattern, int(p.flags)] for p in self.patterns], "concepts": concepts,
            "thresholds": {n: {"quantile": t.q} if isinstance(t, Quantile) else t for n, t in self.thresholds.items()},
            "unit": self.unit, "sides": self.sides,
        }
        weights = None
        if self._needs_model() and model is not None:
            root = trainer.model  # FSDP1: the unit owning the root weights
            weights = full_model_digest(model, fsdp_root=root if root is not None and has_fsdp1_units(root) else None)
        text = _tokenizer_digest(tokenizer) if (self.patterns or self.unit == "word") else None
        bare = [dataclasses.replace(p, ref_prompt_ids=None, chosen_keep=None, rejected_keep=None) for p in pairs]
        fingerprint = combined_digest("token-masks", weights, pairs_digest(bare), text, settings)
        return fingerprint, {"fingerprint": fingerprint, **settings}

    def _apply(self, dm: Any) -> None:
        """Write the masks into the DataModule's pairs, in place, and into every list masked before in
        this fit: a loader built already (Lightning builds the training one to count the steps for
        the schedule, before a late checkpoint load replaces the DataModule's lists) sees them."""
        assert self.masks is not None
        missing = [p.row_id for p in dm.pairs if p.row_id not in self.masks]
        if missing:
            raise ValueError(f"TokenFiltering: the checkpoint's masks lack row ids {missing[:5]} of this data; resume "
                             "with the same data")
        for group in (dm.pairs, dm.train_pairs, dm.val_pairs):
            if group is not None and not any(group is seen for seen in self._masked):
                self._masked.append(group)
        for group in self._masked:
            for i, p in enumerate(group):
                c, r = self.masks[p.row_id]
                group[i] = dataclasses.replace(p, chosen_keep=c, rejected_keep=r)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not isinstance(batch, dict) or "loss_mask" not in batch:
            return
        completion = batch["completion_mask"].bool()
        total = completion.sum().clamp_min(1).float()
        n = batch["row_ids"].numel()
        values = {METRIC: (completion & ~batch["loss_mask"].bool()).sum().float() / total}
        ids = batch["row_ids"].tolist()
        for name, per_row in self.concept_drops.items():
            values[_metric_name(name)] = torch.tensor(float(sum(per_row.get(i, 0) for i in ids))) / total.cpu()
        for key, value in values.items():
            pl_module.log(key, value.to(pl_module.device), on_step=True, on_epoch=False, batch_size=n)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._datamodule, self._masked = None, []  # after the fit (or its exception): a later load must not touch them

    def state_dict(self) -> dict[str, Any]:
        if self.masks is None:
            return {}
        return {"masks": {int(k): (list(c), list(r)) for k, (c, r) in self.masks.items()},
                "concept_drops": self.concept_drops, "report": self.report}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The checkpoint's masks. Loaded after `on_fit_start` (strategies that restore late, FSDP),
        they replace the masks measured there and the DataModule's pairs are masked again, before
        any loader reads them."""
        if "masks" in state_dict:
            self.masks = {int(k): (tuple(c), tuple(r)) for k, (c, r) in state_dict["masks"].items()}
            self.concept_drops = {k: {int(i): int(n) for i, n in v.items()}
                                  for k, v in state_dict.get("concept_drops", {}).items()}
            self.report = dict(state_dict.get("report", {}))
            if self._datamodule is not None:
                self._apply(self._datamodule)


def _module_digest(sae: object) -> str:
    if isinstance(sae, torch.nn.Module):
        return f"{type(sae).__name__}:{model_digest(sae)}"
    return f"{type(sae).__name__}:{tensor_digest(sae.W_dec)}"  # type: ignore[attr-defined]


def _tokenizer_digest(tokenizer: object) -> str | None:
    """The tokenizer's class and vocabulary: pattern masks read the decoded text."""
    if tokenizer is None:
        return None
    vocab = getattr(tokenizer, "get_vocab", None)
    items = sorted(vocab().items()) if callable(vocab) else None
    return combined_digest(type(tokenizer).__name__, items, length=32)


__all__ = ["METRIC", "TokenFiltering"]
