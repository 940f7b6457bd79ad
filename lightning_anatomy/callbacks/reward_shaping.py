"""`RewardShaping`: add λ·ΔA to each pair's margin inside the loss (Bergen et al. 2026).

ΔA, the chosen−rejected concept score of each training pair, is precomputed by
`interventions.reward_shaping.compute_concept_scores`; the callback only puts
`lam · scores[row_id]` into the batch, so it needs a LightningModule that honours
`batch["margin_offset"]` (DPOModule does).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import Strategy

from lightning_anatomy.interventions.explain_away import explain_away_lambda
from lightning_anatomy.interventions.reward_shaping import load_scores, validate_scores


class RewardShaping(Callback):
    """Set `batch["margin_offset"] = lam · scores[row_id]` before every training step.

    Args:
        scores: `{row_id: ΔA}` or the path of a JSON file written by `compute_concept_scores`
            / `save_scores`.
        lam: λ, the weight of the concept score in the margin (any finite number; positive
            dampens learning of `suppress` concepts), or `"auto"`: the explain-away λ, the
            Bradley–Terry MLE of the scores on the preferences (`interventions.explain_away_lambda`;
            raises `ConfoundedConceptError` when the concept alone orders every pair).

    An offset already in the batch (another shaping callback) is added to, not replaced.

    Strategies: any `Strategy` (`supported_strategies = (Strategy,)`): it only adds a key to each
    rank's own batch, so it needs no strategy check.
    """

    supported_strategies: ClassVar[tuple[type[Strategy], ...]] = (Strategy,)

    def __init__(self, scores: Mapping[int, float] | str | os.PathLike, lam: float | Literal["auto"]) -> None:
        auto = lam == "auto"
        if not auto and (isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam)):
            raise ValueError(f"RewardShaping: lam must be a finite number or 'auto', got {lam!r}")
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
        self.lam = explain_away_lambda(self.scores) if auto else float(lam)

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


__all__ = ["RewardShaping"]
