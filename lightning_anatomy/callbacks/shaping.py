"""`RewardShaping` and `ConceptSteering`: the two other published ways to keep a concept out.

`RewardShaping` (Bergen et al. 2026) adds λ·ΔA to each pair's margin inside the loss, with ΔA
precomputed by `interventions.reward_shaping.compute_concept_scores`; it needs a LightningModule
that honours `batch["margin_offset"]` (DPOModule does). `ConceptSteering` (persona vectors,
Chen et al. 2025) adds α·v at each concept's hook while training, on the chosen and/or rejected
half of the `[chosen; rejected]` batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_anatomy.callbacks._hooked import HookedCallback
from lightning_anatomy.callbacks._logging import check_strategy
from lightning_anatomy.interventions.ablation import register_activation_edit
from lightning_anatomy.interventions.reward_shaping import load_scores, validate_scores
from lightning_anatomy.interventions.steering import SIDES, signed_vectors, steering_edit
from lightning_anatomy.model_access import find_causal_lm, hidden_size_at, resolve_hook


class RewardShaping(Callback):
    """Set `batch["margin_offset"] = lam · scores[row_id]` before every training step.

    Args:
        scores: `{row_id: ΔA}` or the path of a JSON file written by `compute_concept_scores`
            / `save_scores`.
        lam: λ, the weight of the concept score in the margin (any finite number; positive
            dampens learning of `suppress` concepts).

    An offset already in the batch (another shaping callback) is added to, not replaced.
    """

    def __init__(self, scores: Mapping[int, float] | str | os.PathLike, lam: float) -> None:
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam):
            raise ValueError(f"RewardShaping: lam must be a finite number, got {lam!r}")
        if isinstance(scores, str | os.PathLike):
            self.source = str(scores)
            self.scores = load_scores(scores)
        elif isinstance(scores, Mapping):
            self.source = "dict"
            self.scores = validate_scores(scores, "RewardShaping: scores")
        else:
            raise ValueError(
                f"RewardShaping: scores must be a dict {{row_id: score}} or a JSON path, got {type(scores).__name__}"
            )
        if not self.scores:
            raise ValueError("RewardShaping: scores is empty; compute them with compute_concept_scores")
        self.lam = float(lam)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(lam=self.lam, source=self.source)

    def offsets(self, row_ids: torch.Tensor) -> torch.Tensor:
        """`lam · scores[row_ids]` as fp32 on the device of `row_ids`."""
        ids = row_ids.tolist()
        missing = [i for i in ids if i not in self.scores]
        if missing:
            raise KeyError(
                f"RewardShaping: no concept score for row_id {missing[0]}"
                + (f" (and {len(missing) - 1} more in this batch)" if len(missing) > 1 else "")
                + "; compute scores for every training pair (compute_concept_scores over the train set)"
            )
        values = torch.tensor([self.scores[i] for i in ids], dtype=torch.float32)
        return (self.lam * values).to(row_ids.device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not isinstance(batch, dict) or "row_ids" not in batch:
            raise ValueError(
                "RewardShaping needs batches with 'row_ids' (the collate_pairs contract); "
                f"got {type(batch).__name__} with keys {sorted(batch) if isinstance(batch, dict) else '-'}"
            )
        offset = self.offsets(batch["row_ids"])
        existing = batch.get("margin_offset")
        batch["margin_offset"] = offset if existing is None else existing.to(offset.dtype) + offset


class ConceptSteering(HookedCallback):
    """Add α·v at each concept's hook while training (persona-vector preventative steering).

    Args:
        concepts: a `ConceptSet` (or a saved one's directory). At each hook, v is the sum of the
            concept vectors (raw, unnormalised: a mean-difference vector's norm is its natural
            scale), `suppress` ones added and `amplify` ones subtracted; `allow` ones are skipped.
        alpha: steering coefficient α (finite, non-zero).
        sides: `"both"`, `"chosen"` (rows 0..B-1 of the `[chosen; rejected]` batch) or
            `"rejected"` (rows B..2B-1).
        allow_untested_strategy: run under strategies other than single-device and DDP.

    Training forwards only (the Trainer's training stage, whatever the model's train/eval mode):
    validation, inference after fit and the reference forward are untouched.
    """

    def __init__(self, concepts: Any, alpha: float, sides: str = "both", allow_untested_strategy: bool = False) -> None:
        super().__init__()
        if isinstance(concepts, str | os.PathLike):
            from lightning_anatomy.concepts import ConceptSet

            concepts = ConceptSet.load(concepts)
        if not hasattr(concepts, "select") or not hasattr(concepts, "hooks"):
            raise ValueError(f"ConceptSteering: concepts must be a ConceptSet, got {type(concepts).__name__}")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha == 0:
            raise ValueError(f"ConceptSteering: alpha must be a finite non-zero number, got {alpha!r}")
        if sides not in SIDES:
            raise ValueError(f"ConceptSteering: sides={sides!r} is not one of {SIDES}")
        self.vectors: dict[str, torch.Tensor] = {}
        for hook in concepts.hooks:
            if any(c.action != "allow" for c in concepts.select(hook=hook)):
                self.vectors[hook] = signed_vectors(concepts, hook).sum(0)
        if not self.vectors:
            raise ValueError(
                "ConceptSteering: concepts has no concept with action 'suppress' or 'amplify'; "
                "set actions in concepts.yaml or with ConceptSet.with_actions"
            )
        self.alpha = float(alpha)
        self.sides = sides
        self.allow_untested_strategy = bool(allow_untested_strategy)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, sides=self.sides, hooks=tuple(self.vectors))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, "ConceptSteering", self.allow_untested_strategy)
        model = find_causal_lm(pl_module)
        for hook, vector in self.vectors.items():
            width = hidden_size_at(model, hook)
            if width != vector.numel():
                raise ValueError(
                    f"ConceptSteering: concepts at {hook!r} have d={vector.numel()} but the model's activation "
                    f"there has width {width}; the concept set was built for another model"
                )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.remove_hooks()
        model = find_causal_lm(pl_module)
        shared = trainer.strategy.broadcast(self.vectors, src=0)
        for hook, vector in shared.items():
            edit = steering_edit(vector, self.alpha, self.sides, active=lambda: trainer.training)
            self._handles.append(register_activation_edit(resolve_hook(model, hook), edit))



__all__ = ["ConceptSteering", "RewardShaping"]
