"""`preference_loss`: the per-pair loss of a batch from summed completion log-probs, as TRL 1.16.

It checks the options (`losses.options`), turns the log-probs into the per-pair terms (log-ratios
and their f-divergence scores), sums the chosen loss functions (`losses.functions`) with their
weights, and applies WPO's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_anatomy.losses.functions import LENGTH_USERS, LOSS_FUNCTIONS, LossParams, LossTerms
from lightning_anatomy.losses.options import TRL_DISCOPOP_TAU, loss_mixture, validate_loss_options
from lightning_anatomy.losses.token_weights import TRL_F_ALPHA_DIVERGENCE_COEF, f_divergence_scores


@dataclass(frozen=True)
class PreferenceLossOutput:
    """Per-pair results; reduce (weights, mean) in the caller.

    `losses` [B] fp32 with grad: Σ_k loss_weights[k]·loss_k (× the WPO weights), so its mean is
    TRL's loss; `chosen_rewards` / `rejected_rewards` [B] = β·(policy − ref), detached, as TRL logs
    them (never length-normalised, never f-transformed); `logits` [B] = β·Δ + margin_offset, the margin
    the first listed loss is a function of (Δ length-normalised for ipo and sigmoid_norm), detached.
    For `aot` / `aot_unpaired` (which sort the batch) and `sft` (a batch-level token mean, the same
    value on every pair) `losses[i]` is not pair i's own loss; only its mean is TRL's.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    logits: Tensor



def _as_pair_vector(name: str, value: object, size: int | None) -> Tensor:
    """Check a per-pair argument is a [B] tensor (B matching the others) and cast it to fp32."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [B], got {type(value).__name__}")
    if value.dim() != 1 or value.numel() == 0:
        raise ValueError(
            f"{name} must have shape [B] with B >= 1 (one value per pair), got {tuple(value.shape)}"
        )
    if size is not None and value.numel() != size:
        raise ValueError(
            f"{name} has {value.numel()} values but policy_chosen_logps has {size}: pass one value per pair"
        )
    if value.dtype == torch.bool or value.is_complex():
        raise ValueError(f"{name} must be a real-valued tensor, got dtype {value.dtype}")
    return value.float()


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    margin_offset: Tensor | None = None,
    discopop_tau: float = TRL_DISCOPOP_TAU,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = TRL_F_ALPHA_DIVERGENCE_COEF,
    wpo_weights: Tensor | None = None,
    sft_chosen_logps: Tensor | None = None,
) -> PreferenceLossOutput:
    """Per-pair preference loss from summed completion log-probs (all `[B]`), as TRL 1.16's `DPOTrainer`.

    Args:
        policy_chosen_logps: summed log-probs of the chosen completions under the policy (LD-weighted
            with `ld_token_weights` under LD-DPO; likewise the other three).
        policy_rejected_logps: the same for the rejected completions.
        ref_chosen_logps: the same under the reference.
        ref_rejected_logps: the same under the reference.
        loss_type: one of `LOSS_TYPES`, or a list of them (a mixture, summed with `loss_weights`).
        loss_weights: one weight per loss type; None weighs each 1.0.
        beta: β.
        label_smoothing: ε (see `validate_loss_options`).
        chosen_lengths: completion token counts `[B]`, needed by ipo and sigmoid_norm (clamped to ≥ 1 like
            TRL) and sft (its token mean).
        rejected_lengths: the same for the rejected completions.
        margin_offset: `[B]` added to β·Δ before the sigmoid (reward shaping, Bergen et al. 2026:
            −log σ(β·Δθ + λ·ΔA)); `sigmoid` only (also inside a mixture with `sft`).
        discopop_tau: DiscoPOP's τ.
        f_divergence_type: the f-divergence whose f' turns log-ratios into scores (`f_divergence_scores`).
        f_alpha_divergence_coef: α of `alpha_divergence`.
        wpo_weights: `[B]` WPO per-pair weights (`wpo_weights`), multiplied into every loss term (TRL's
            `use_weighting=True`); None: unweighted.
        sft_chosen_logps: summed chosen log-probs *without* LD weighting, for `sft` under LD-DPO (TRL's
            sft reads the raw token log-probs); None: `policy_chosen_logps`.

    Returns:
        `PreferenceLossOutput`; `losses.mean()` is TRL's loss.

    Raises:
        ValueError: an illegal option combination (`validate_loss_options`) or a malformed tensor.
    """
    validate_loss_options(
        loss_type,
        beta,
        label_smoothing,
        loss_weights=loss_weights,
        discopop_tau=discopop_tau,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        use_weighting=wpo_weights is not None,
        has_lengths=chosen_lengths is not None and rejected_lengths is not None,
        has_margin_offset=margin_offset is not None,
    )
    types, weights = loss_mixture(loss_type, loss_weights)
    pol_c = _as_pair_vector("policy_chosen_logps", policy_chosen_logps, None)
    size = pol_c.numel()
    pol_r = _as_pair_vector("policy_rejected_logps", policy_rejected_logps, size)
    ref_c = _as_pair_vector("ref_chosen_logps", ref_chosen_logps, size)
    ref_r = _as_pair_vector("ref_rejected_logps", ref_rejected_logps, size)

    len_c = len_r = None
    if set(types) & set(LENGTH_USERS):
        len_c = _as_pair_vector("chosen_lengths", chosen_lengths, size)
        len_r = _as_pair_vector("rejected_lengths", rejected_lengths, size)
        for name, lengths in (("chosen_lengths", len_c), ("rejected_lengths", len_r)):
            if bool((lengths < 0).any()):
                bad = int(torch.nonzero(lengths < 0)[0, 0])
                raise ValueError(
                    f"{name}[{bad}] = {lengths[bad].item():g} is negative; pass completion token counts"
                )
    offset = None if margin_offset is None else _as_pair_vector("margin_offset", margin_offset, size)
    sft_c = pol_c if sft_chosen_logps is None else _as_pair_vector("sft_chosen_logps", sft_chosen_logps, size)
    wpo = None if wpo_weights is None else _as_pair_vector("wpo_weights", wpo_weights, size)

    chosen, rejected = pol_c - ref_c, pol_r - ref_r
    alpha = float(f_alpha_divergence_coef)
    terms = LossTerms(
        chosen=chosen,
        rejected=rejected,
        chosen_score=f_divergence_scores(chosen, f_divergence_type, alpha),
        rejected_score=f_divergence_scores(rejected, f_divergence_type, alpha),
        policy_chosen=pol_c,
        policy_rejected=pol_r,
        ref_chosen=ref_c,
        ref_rejected=ref_r,
        chosen_lengths=None if len_c is None else len_c.clamp(min=1.0),
        rejected_lengths=None if len_r is None else len_r.clamp(min=1.0),
        raw_chosen_lengths=len_c,
        sft_chosen=sft_c,
        offset=offset,
    )
    options = LossParams(
        beta=float(beta), label_smoothing=float(label_smoothing), discopop_tau=float(discopop_tau)
    )
    losses = sum(weight * LOSS_FUNCTIONS[k](terms, options) for k, weight in zip(types, weights))
    if wpo is not None:
        losses = losses * wpo
    margin = terms.normalised_delta if types[0] in ("ipo", "sigmoid_norm") else terms.delta
    logits = beta * margin if offset is None else beta * margin + offset
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
        logits=logits.detach(),
    )


__all__ = ["PreferenceLossOutput", "preference_loss"]
