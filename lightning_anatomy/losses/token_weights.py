"""Per-token and per-score helpers of the loss family, applied where the token log-probs are.

f-DPO's scores of the log-ratios (`f_divergence_scores`, used inside `preference_loss`), and what
the caller computes from per-token log-probs before the loss: LD-DPO's token weights
(`ld_token_weights`) and WPO's per-pair weights (`wpo_weights`), as TRL 1.16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

TRL_F_ALPHA_DIVERGENCE_COEF = 0.5  # TRL 1.16 DPOConfig.f_alpha_divergence_coef default
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_scores(
    logratios: Tensor, f_divergence_type: str = "reverse_kl", alpha: float = TRL_F_ALPHA_DIVERGENCE_COEF
) -> Tensor:
    """f'(t) at t = π/π_ref, from the log-ratio u = log t (f-DPO, Wang et al. 2023), as TRL 1.16.

    reverse_kl: u (plain DPO); forward_kl: 1 − e^(−u); js_divergence: log 2 + log σ(u);
    alpha_divergence: (e^((α−1)·u) − 1)/(α−1), the exponent clamped at 80 (fp32), and u itself when
    |α − 1| < 1e-6 (its limit).
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        exponent = torch.clamp((alpha - 1.0) * logratios, max=80.0)
        return (torch.exp(exponent) - 1.0) / (alpha - 1.0)
    raise ValueError(
        f"unknown f_divergence_type={f_divergence_type!r}; valid values: {list(F_DIVERGENCE_TYPES)}"
    )


def ld_token_weights(completion_mask: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO (Liu et al. 2024) token weights for a `[chosen; rejected]` batch, as TRL 1.16.

    Per pair the shared length is min(|y_w|, |y_l|); a completion token at completion position
    ≤ shared length weighs 1, one beyond it (the longer response's excess, its "verbose" part) weighs
    `ld_alpha`, a non-completion position 0. Summing token log-probs with these weights gives the
    sequence log-probs LD-DPO puts into the loss (policy and reference alike).

    Args:
        completion_mask: [2B, T] 0/1, chosen rows first, aligned with the token log-probs it will weigh
            (for next-token log-probs, the mask shifted by one like TRL's `completion_mask[:, 1:]`).
        ld_alpha: α in [0, 1].

    Returns:
        [2B, T] fp32 weights.
    """
    if completion_mask.dim() != 2 or completion_mask.shape[0] % 2:
        raise ValueError(
            f"completion_mask must have shape [2B, T] (chosen rows, then rejected), got {tuple(completion_mask.shape)}"
        )
    mask = completion_mask.to(torch.float32)
    position = mask.cumsum(dim=1)
    lengths = mask.sum(dim=1)
    chosen, rejected = lengths.chunk(2, dim=0)
    shared = torch.minimum(chosen, rejected).repeat(2).unsqueeze(1)
    in_shared = (position > 0) & (position <= shared) & (mask > 0)
    in_tail = (position > shared) & (mask > 0)
    return in_shared.float() + ld_alpha * in_tail.float()


def wpo_weights(token_logps: Tensor, token_log_sum_sq_probs: Tensor, completion_mask: Tensor) -> Tensor:
    """WPO (Zhou et al. 2024, Eq. 2) per-pair weights for a `[chosen; rejected]` batch, as TRL 1.16.

    A sequence's weight is exp of the mean over its completion tokens of log p(y_t) − log Σ_v p_v²
    (its probability under the policy, aligned by the distribution's own sharpness); a pair's weight
    is the chosen weight times the rejected weight. Detached: the weights rescale, they are not trained.

    Args:
        token_logps: [2B, T] log-prob of each next token (un-weighted, also under LD-DPO).
        token_log_sum_sq_probs: [2B, T] log Σ_v p_v² of the same positions' next-token distribution.
        completion_mask: [2B, T] 0/1, aligned with both.

    Returns:
        [B] fp32 weights.
    """
    with torch.no_grad():
        mask = completion_mask.to(torch.float32)
        aligned = (token_logps.float() - token_log_sum_sq_probs.float()) * mask
        weights = torch.exp(aligned.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0))
        chosen, rejected = weights.chunk(2, dim=0)
        return chosen * rejected


__all__ = [
    "F_DIVERGENCE_TYPES", "TRL_F_ALPHA_DIVERGENCE_COEF", "f_divergence_scores", "ld_token_weights", "wpo_weights",
]
