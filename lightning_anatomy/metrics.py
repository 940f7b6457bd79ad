"""The training and validation metrics of `DPOModule`, under TRL DPOTrainer's names.

Means are accumulated over the micro-batches of an optimizer step (or a validation epoch),
weighted by their pairs (TRL's token means by their tokens), which keeps them right under gradient
accumulation; `TokenCount` keeps TRL's cumulative `num_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_anatomy.data.batch import PreferenceBatch
from lightning_anatomy.losses import PreferenceLossOutput

METRIC_NAMES = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy",
)


class PreferenceMetrics(nn.Module):
    """Pair-weighted means of the statistics `DPOModule.compute_loss` returns (`METRIC_NAMES`)."""

    def __init__(self) -> None:
        super().__init__()
        self.means = nn.ModuleDict({_key(n): MeanMetric() for n in METRIC_NAMES})

    def update(self, stats: Mapping[str, Tensor], pairs: int, weights: Mapping[str, Tensor] | None = None) -> None:
        """Add one micro-batch's statistics, weighted by its number of pairs, or by `weights[name]` where
        given (token counts for TRL's token means `entropy` and `mean_token_accuracy`)."""
        weights = weights or {}
        for name, value in stats.items():
            self.means[_key(name)].update(value, weight=weights.get(name, pairs))

    def compute_and_reset(self, prefix: str) -> dict[str, Tensor] | None:
        """`{prefix/name: mean}` since the last call, then start over; None when nothing was added."""
        if all(m.update_count == 0 for m in self.means.values()):
            return None
        values = {f"{prefix}/{name}": self.means[_key(name)].compute() for name in METRIC_NAMES}
        for m in self.means.values():
            m.reset()
        return values


def step_statistics(loss: Tensor, out: PreferenceLossOutput, pol: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The TRL-named statistics (`METRIC_NAMES`, detached) of one step: its `loss`, the loss
    function's `out` and the policy forward's `pol` (`logprobs.pair_logps(..., with_stats=True)`)."""
    return {
        "loss": loss.detach(),
        "rewards/chosen": out.chosen_rewards.mean(),
        "rewards/rejected": out.rejected_rewards.mean(),
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean(),
        "logps/chosen": pol["chosen_logps"].detach().mean(),
        "logps/rejected": pol["rejected_logps"].detach().mean(),
        "logits/chosen": pol["chosen_logits"],
        "logits/rejected": pol["rejected_logits"],
        # TRL's token means: entropy over every completion token, top-1 accuracy over the chosen ones
        "entropy": pol["entropy_sum"] / pol["tokens"].clamp_min(1),
        "mean_token_accuracy": pol["top1_correct"] / pol["chosen_tokens"].clamp_min(1),
    }


def token_weights(batch: PreferenceBatch) -> dict[str, Tensor]:
    """Token counts that weigh TRL's token means across micro-batches and ranks."""
    mask = batch.get("loss_mask", batch["completion_mask"])[:, 1:]  # the tokens scored (token filtering)
    return {"entropy": mask.sum(), "mean_token_accuracy": mask[: mask.shape[0] // 2].sum()}


class TokenCount:
    """TRL's `num_tokens`: attention-mask tokens of every rank's training batches so far.

    `add` counts this rank's micro-batches (no sync); `step` sums them over the ranks once per
    optimizer step and adds them to `total`, which checkpoints carry.
    """

    def __init__(self) -> None:
        self.total = 0
        self._step: Tensor | int = 0  # this rank's, since the last optimizer step

    def add(self, batch: PreferenceBatch) -> None:
        """Count one training micro-batch of this rank."""
        self._step = self._step + batch["attention_mask"].sum().detach()

    def step(self, device: torch.device, reduce: Callable[[Tensor], Tensor] | None = None) -> int:
        """Add this optimizer step's tokens, summed over the ranks by `reduce` (None: one process),
        to `total` and return it."""
        step_tokens = torch.as_tensor(self._step, dtype=torch.float64, device=device)
        if reduce is not None:
            step_tokens = reduce(step_tokens)
        self.total += int(step_tokens.item())
        self._step = 0
        return self.total


def _key(name: str) -> str:
    return name.replace("/", "__")


__all__ = ["METRIC_NAMES", "PreferenceMetrics", "TokenCount", "step_statistics", "token_weights"]
