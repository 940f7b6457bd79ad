"""The option checks of the loss family: TRL 1.16's `DPOConfig` names, refusals and defaults.

`validate_loss_options` refuses an illegal combination before any heavy work; `loss_mixture`
turns `loss_type` / `loss_weights` into the (types, weights) `preference_loss` sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightning_anatomy.losses.functions import (
    F_DIVERGENCE_USERS,
    LENGTH_USERS,
    LOSS_FUNCTIONS,
    LOSS_TYPES,
    MARGIN_OFFSET_USERS,
    SMOOTHING_USERS,
    SORTING_LOSSES,
)
from lightning_anatomy.losses.token_weights import F_DIVERGENCE_TYPES, TRL_F_ALPHA_DIVERGENCE_COEF

TRL_DISCOPOP_TAU = 0.05  # TRL 1.16 DPOConfig.discopop_tau default, the DiscoPOP paper's value


def loss_mixture(
    loss_type: str | Sequence[str], loss_weights: Sequence[float] | None
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """(types, weights) from TRL's `loss_type` (a string or a list) and `loss_weights` (None: all 1.0)."""
    types = (loss_type,) if isinstance(loss_type, str) else loss_type
    if not isinstance(types, (list, tuple)) or not types or not all(isinstance(k, str) for k in types):
        raise ValueError(
            f"loss_type must be a string or a non-empty list of strings, got {loss_type!r}; "
            f"valid loss types: {list(LOSS_TYPES)}"
        )
    for k in types:
        if k not in LOSS_FUNCTIONS:
            raise ValueError(f"unknown loss_type={k!r}; valid loss types: {list(LOSS_TYPES)}")
    if loss_weights is None:
        return tuple(types), (1.0,) * len(types)
    if isinstance(loss_weights, (str, bytes)) or not isinstance(loss_weights, Sequence):
        raise ValueError(f"loss_weights must be a list of numbers (one per loss type), got {loss_weights!r}")
    if len(loss_weights) != len(types):
        raise ValueError(
            f"loss_weights must have the same length as loss_type: got {len(loss_weights)} weights "
            f"{list(loss_weights)} for {len(types)} loss types {list(types)}; pass one weight per loss type "
            "(or loss_weights=None for 1.0 each)"
        )
    for k, w in zip(types, loss_weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(
                f"loss_weights entry for {k!r} must be a finite number >= 0, got {w!r}; "
                "TRL's MPO example is loss_type=['sigmoid', 'bco_pair', 'sft'], loss_weights=[0.8, 0.2, 1.0]"
            )
    return tuple(types), tuple(float(w) for w in loss_weights)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_loss_options(
    loss_type: str | Sequence[str],
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    *,
    loss_weights: Sequence[float] | None = None,
    discopop_tau: float = TRL_DISCOPOP_TAU,
    ld_alpha: float | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = TRL_F_ALPHA_DIVERGENCE_COEF,
    use_weighting: bool = False,
    has_lengths: bool = True,
    has_margin_offset: bool = False,
) -> None:
    """Reject an illegal option combination before any heavy work starts.

    The options carry TRL 1.16's `DPOConfig` names, defaults and meanings; TRL's refusals (an
    f-divergence other than reverse KL with a loss not built on the chosen−rejected score difference,
    `use_weighting` with the sorting `aot*` losses, `exo_pair` without label smoothing, mismatched
    `loss_weights`) are refused here too, plus values TRL documents as invalid but does not check
    (`ld_alpha` outside [0, 1], `label_smoothing` outside [0, 0.5)) and options that would be silently
    ignored (label smoothing on a loss that does not use it).

    Args:
        loss_type: one loss type of `LOSS_TYPES`, or a list of them summed with `loss_weights` (TRL's
            mixtures; e.g. MPO: `["sigmoid", "bco_pair", "sft"]`).
        beta: β, the strength of the pull towards the reference (for ipo, its τ).
        label_smoothing: label-flip probability ε (cDPO for sigmoid / aot*, robust, exo_pair's ε).
        loss_weights: one weight per entry of `loss_type`; None weights each 1.0.
        discopop_tau: DiscoPOP's temperature τ.
        ld_alpha: LD-DPO's α for the tokens of the longer response beyond the shared length; None is plain
            DPO. Applied by the caller to the log-prob sums (`ld_token_weights`).
        f_divergence_type: the f-divergence regulariser (`F_DIVERGENCE_TYPES`).
        f_alpha_divergence_coef: α of `alpha_divergence`.
        use_weighting: WPO weighting (the caller passes `wpo_weights` to `preference_loss`).
        has_lengths: whether completion lengths will reach every `preference_loss` call (ipo,
            sigmoid_norm and sft need them); config-time callers that pass them leave True.
        has_margin_offset: whether reward shaping will add a margin offset.

    Raises:
        ValueError: naming the option, the bad value and how to fix it.
    """
    types, _ = loss_mixture(loss_type, loss_weights)
    if not (_is_number(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got beta={beta!r}; TRL's default is beta=0.1")
    if not (_is_number(label_smoothing) and 0.0 <= label_smoothing < 0.5):
        raise ValueError(
            f"label_smoothing must lie in [0, 0.5), got label_smoothing={label_smoothing!r}; it is the "
            "probability that a preference label is flipped"
        )
    if label_smoothing and not set(types) & set(SMOOTHING_USERS):
        raise ValueError(
            f"label_smoothing={label_smoothing!r} has no effect with loss_type={loss_type!r} (TRL ignores it); "
            f"set label_smoothing=0.0, or use one of {list(SMOOTHING_USERS)}"
        )
    if "exo_pair" in types and label_smoothing == 0.0:
        raise ValueError(
            "loss_type='exo_pair' needs label_smoothing > 0 (its ε; log ε is infinite at 0); "
            "the EXO paper recommends label_smoothing=1e-3"
        )
    if not (_is_number(discopop_tau) and discopop_tau > 0):
        raise ValueError(
            f"discopop_tau must be a finite number > 0, got discopop_tau={discopop_tau!r}; "
            f"the DiscoPOP paper and TRL use {TRL_DISCOPOP_TAU}"
        )
    needs_lengths = [k for k in types if k in LENGTH_USERS]
    if needs_lengths and not has_lengths:
        raise ValueError(
            f"loss_type={needs_lengths[0]!r} needs chosen_lengths and rejected_lengths (completion token counts): "
            "TRL's ipo and sigmoid_norm divide each sequence log-prob by its completion length and sft averages "
            "over the chosen tokens"
        )
    if has_margin_offset and not (
        set(types) & set(MARGIN_OFFSET_USERS) and set(types) <= {*MARGIN_OFFSET_USERS, "sft"}
    ):
        bad = next((k for k in types if k not in (*MARGIN_OFFSET_USERS, "sft")), types[0])
        raise ValueError(
            f"margin_offset (reward shaping) is not supported with loss_type={bad!r}; it is supported "
            f"only for {list(MARGIN_OFFSET_USERS)} (alone or mixed with 'sft'): drop the reward-shaping "
            "intervention or use loss_type='sigmoid'"
        )
    if ld_alpha is not None and not (_is_number(ld_alpha) and 0.0 <= ld_alpha <= 1.0):
        raise ValueError(
            f"ld_alpha must lie in [0, 1] or be None, got ld_alpha={ld_alpha!r}: it weights the log-probs of the "
            "longer response's tokens beyond the shared length (1.0: no down-weighting, 0.0: drop them; None: "
            "plain DPO)"
        )
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(
            f"unknown f_divergence_type={f_divergence_type!r}; valid values: {list(F_DIVERGENCE_TYPES)} "
            "(default 'reverse_kl', i.e. standard DPO)"
        )
    if f_divergence_type != "reverse_kl" and not set(types) <= set(F_DIVERGENCE_USERS):
        bad = [k for k in types if k not in F_DIVERGENCE_USERS]
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} is not supported with loss_type {bad} (the f-DPO "
            "reparameterisation cancels log Z(x) only in the chosen−rejected score difference); it is supported "
            f"only for {sorted(F_DIVERGENCE_USERS)}: use f_divergence_type='reverse_kl' with these losses"
        )
    if not _is_number(f_alpha_divergence_coef):
        raise ValueError(
            f"f_alpha_divergence_coef must be a finite number, got {f_alpha_divergence_coef!r}; "
            f"TRL's default is {TRL_F_ALPHA_DIVERGENCE_COEF}"
        )
    if use_weighting and set(types) & set(SORTING_LOSSES):
        raise ValueError(
            f"use_weighting=True (WPO) is not supported with loss_type={loss_type!r}: 'aot' and 'aot_unpaired' sort "
            "the batch, which would misalign the per-pair weights; set use_weighting=False or pick another loss"
        )


__all__ = ["TRL_DISCOPOP_TAU", "loss_mixture", "validate_loss_options"]
