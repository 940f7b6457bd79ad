"""Per-token statistics of the next-token distribution that TRL 1.16's DPOTrainer logs or weighs by.

From a chunk of logits (fp32, `[N, V]`) and the tokens that follow (`[N]`): the token's log-prob,
the distribution's entropy (`entropy` metric), log Σ_v p_v² (WPO's alignment term) and whether the
token is the argmax (`mean_token_accuracy`; ties go to the lowest index, like TRL's kernel and
`torch.argmax`). Only the log-prob carries a gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class TokenStats(NamedTuple):
    """`[N]` each: log p(token) (with grad), entropy, log Σ p², is-top-1 (bool); the last three detached."""

    logps: Tensor
    entropy: Tensor
    log_sum_sq_probs: Tensor
    is_top1: Tensor


def token_stats(logits: Tensor, labels: Tensor) -> TokenStats:
    """Statistics of each row's next-token distribution, as TRL 1.16's fused LM head computes them.

    Args:
        logits: `[N, V]` logits (computed in fp32 here whatever their dtype).
        labels: `[N]` the token that follows each row.

    Returns:
        `TokenStats`.
    """
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    logps = picked - log_z
    with torch.no_grad():
        log_probs = logits.detach() - log_z.detach().unsqueeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        log_sum_sq = torch.logsumexp(2 * log_probs, dim=-1)
        is_top1 = logits.detach().argmax(dim=-1) == labels
    return TokenStats(logps, entropy, log_sum_sq, is_top1)


__all__ = ["TokenStats", "token_stats"]
