"""The training and validation metrics of `DPOModule`, under TRL DPOTrainer's names.

Means are accumulated over the micro-batches of an optimizer step (or a validation epoch),
weighted by their pairs, which keeps them right under gradient accumulation.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torchmetrics import MeanMetric

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


def _key(name: str) -> str:
    return name.replace("/", "__")


__all__ = ["METRIC_NAMES", "PreferenceMetrics"]
