"""`TokenFiltering`: remove the completion tokens that carry a concept from DPO's log-probs.

Bergen et al. §3.3 (after Rathi & Radford 2026): for style traits that sit in short spans, the
tokens carrying the trait are taken out of the training signal. In DPO that is a mask on the
completion tokens that enter the sequence log-probs, for the policy and the reference alike, so
neither the log-ratio nor the sigmoid weight sees them.

The masks are computed once, at fit start, with the initial model (one measurement pass for
SAE / ConceptSet scores; patterns need only the tokenizer), kept per row id (and in checkpoints,
so a resumed run does not measure its trained model), and written into the DataModule's pairs
(`TokenizedPair.chosen_keep` / `rejected_keep`): `collate_pairs` then adds the batch key
`loss_mask`, which DPOModule scores instead of `completion_mask` in every reference mode, and a
precomputed reference table is keyed on the masks (its fingerprint hashes the pairs).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import Strategy

from lightning_anatomy.callbacks.sae_specs import build_pending_saes, load_saes
from lightning_anatomy.callbacks.strategies import DATA_PARALLEL, SHARDED, check_strategy
from lightning_anatomy.concepts.concept_set import ConceptSet
from lightning_anatomy.concepts.lens import ConceptLens
from lightning_anatomy.data.tokenize import TokenizedPair
from lightning_anatomy.interventions.token_filter import (
    FILTER_SIDES,
    UNITS,
    ActivationScore,
    Quantile,
    callable_scores,
    compile_patterns,
    direction_score,
    measure_token_scores,
    pattern_hits,
    resolve_threshold,
    sae_feature_score,
    widen_token_hits,
)
from lightning_anatomy.model_access import find_causal_lm

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
        allow_untested_strategy: run under strategies other than single-device, DDP and FSDP.

    The tokenizer is the DataModule's (`trainer.datamodule.tokenizer`), and the pairs are its
    `pairs` / `train_pairs` / `val_pairs`, which keep the masks after fit. Logs
    `concepts/token_filter/dropped_fraction` (share of the batch's completion tokens removed)
    and `concepts/token_filter/dropped_fraction/<concept>` every training step.

    Strategies (`supported_strategies`): SingleDeviceStrategy, DDPStrategy, FSDPStrategy (FSDP1)
    and ModelParallelStrategy (FSDP2); every rank measures (an FSDP forward is a collective) and
    rank zero's masks are broadcast.
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
            model = find_causal_lm(pl_module) if self._concepts else None
            if model is not None and self._saes:
                self._saes = build_pending_saes(self._saes, model)
            masks = self.compute_masks(pairs, getattr(dm, "tokenizer", None), model, getattr(dm, "pad_token_id", 0))
            self.masks = trainer.strategy.broadcast(masks, src=0)
        missing = [p.row_id for p in pairs if p.row_id not in self.masks]
        if missing:
            raise ValueError(f"TokenFiltering: the checkpoint's masks lack row ids {missing[:5]} of this data; resume "
                             "with the same data")
        for group in (dm.pairs, dm.train_pairs, dm.val_pairs):
            for i, p in enumerate(group or []):  # in place: a loader built already sees the masked pairs
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

    def state_dict(self) -> dict[str, Any]:
        if self.masks is None:
            return {}
        return {"masks": {int(k): (list(c), list(r)) for k, (c, r) in self.masks.items()},
                "concept_drops": self.concept_drops}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "masks" in state_dict:
            self.masks = {int(k): (tuple(c), tuple(r)) for k, (c, r) in state_dict["masks"].items()}
            self.concept_drops = {k: {int(i): int(n) for i, n in v.items()}
                                  for k, v in state_dict.get("concept_drops", {}).items()}


__all__ = ["METRIC", "TokenFiltering"]
