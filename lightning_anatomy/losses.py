"""The preference-loss family as pure tensor functions on summed sequence log-probs.

All 15 loss types of TRL 1.16's `DPOTrainer`, its loss mixtures (`loss_type` a list with
`loss_weights`), f-divergences (`f_divergence_type`, `f_alpha_divergence_coef`), WPO weighting
(`use_weighting`) and LD-DPO (`ld_alpha`) agree numerically with TRL 1.16 (so numbers and
dashboards carry over), with one deliberate addition: `sigmoid` honours `label_smoothing` as
conservative DPO (cDPO), which TRL 1.16 silently ignores for `sigmoid`; at `label_smoothing=0`
the two are identical.

Notation (per pair): ``c = log π(y_w|x) − log π_ref(y_w|x)`` and ``r = log π(y_l|x) − log π_ref(y_l|x)``
are the chosen / rejected log-ratios; ``s_c = f'(c)``, ``s_r = f'(r)`` their f-divergence scores
(``s = c`` for the default reverse KL, i.e. plain DPO); ``Δ = s_c − s_r`` and ``z = β·Δ (+ margin_offset)``
the logits. Everything is computed in fp32 whatever the input dtype: the losses are small differences
of large sums, which bf16 cannot hold.

What needs more than summed log-probs is computed by the caller from per-token log-probs with the
helpers here, then passed in: LD-DPO's weighted sums (`ld_token_weights`: shared-length tokens
weight 1, the longer response's tail weight α), WPO's per-pair weights (`wpo_weights`), and the raw
chosen sum `sft` needs when the others are LD-weighted (`sft_chosen_logps`).

No loss type keeps state: TRL 1.16's `bco_pair` is the stateless −log σ(β·c) − log σ(−β·r) (the
running reward mean of older TRL releases is gone), so nothing here needs checkpointing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

TRL_DISCOPOP_TAU = 0.05  # TRL 1.16 DPOConfig.discopop_tau default, the DiscoPOP paper's value
TRL_F_ALPHA_DIVERGENCE_COEF = 0.5  # TRL 1.16 DPOConfig.f_alpha_divergence_coef default
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


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


@dataclass(frozen=True)
class _Terms:
    """What the loss functions read, all [B] fp32."""

    chosen: Tensor  # c, chosen log-ratio
    rejected: Tensor  # r, rejected log-ratio
    chosen_score: Tensor  # s_c = f'(c) (= c for reverse_kl)
    rejected_score: Tensor  # s_r
    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_lengths: Tensor | None  # completion token counts clamped to ≥ 1 (ipo, sigmoid_norm)
    rejected_lengths: Tensor | None
    raw_chosen_lengths: Tensor | None  # unclamped (sft's token mean)
    sft_chosen: Tensor  # summed chosen log-probs without LD weighting
    offset: Tensor | None  # margin_offset

    @property
    def delta(self) -> Tensor:
        """Δ = s_c − s_r."""
        return self.chosen_score - self.rejected_score

    @property
    def normalised_delta(self) -> Tensor:
        """Δ̄ = s_c/|y_w| − s_r/|y_l|, the per-token margin (ipo, sigmoid_norm)."""
        return self.chosen_score / self.chosen_lengths - self.rejected_score / self.rejected_lengths


@dataclass(frozen=True)
class _Options:
    beta: float
    label_smoothing: float
    discopop_tau: float


def _z(t: _Terms, o: _Options) -> Tensor:
    """z = β·Δ + margin_offset."""
    z = o.beta * t.delta
    return z if t.offset is None else z + t.offset


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z) (cDPO's form; plain −log σ(z) at ε = 0)."""
    loss = -F.logsigmoid(z)
    if eps:
        loss = (1 - eps) * loss - eps * F.logsigmoid(-z)
    return loss


def _sigmoid(t: _Terms, o: _Options) -> Tensor:
    """DPO (Rafailov et al. 2023): −log σ(z). With label smoothing ε, conservative DPO (cDPO,
    Mitchell 2023): −(1−ε)·log σ(z) − ε·log σ(−z), i.e. each label is assumed flipped with prob. ε."""
    return _smoothed_logistic(_z(t, o), o.label_smoothing)


def _hinge(t: _Terms, o: _Options) -> Tensor:
    """SLiC hinge (Zhao et al. 2023): max(0, 1 − β·Δ)."""
    return torch.relu(1 - o.beta * t.delta)


def _ipo(t: _Terms, o: _Options) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17): (Δ̄ − 1/(2β))², with Δ̄ = s_c/|y_w| − s_r/|y_l| the per-token
    margin (TRL normalises by completion length, as the IPO authors confirmed)."""
    return (t.normalised_delta - 1 / (2 * o.beta)) ** 2


def _robust(t: _Terms, o: _Options) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024), unbiased under label-flip rate ε:
    (−(1−ε)·log σ(β·Δ) + ε·log σ(−β·Δ)) / (1 − 2ε)."""
    eps, z = o.label_smoothing, o.beta * t.delta
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _exo_pair(t: _Terms, o: _Options) -> Tensor:
    """EXO-pref (Ji et al. 2024, Eq. 16): KL(q ‖ p_ε) over {chosen, rejected} with q = (σ(β·Δ), σ(−β·Δ))
    and target p_ε = (1−ε, ε): σ(z)·(log σ(z) − log(1−ε)) + σ(−z)·(log σ(−z) − log ε)."""
    eps, z = o.label_smoothing, o.beta * t.delta
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def _nca_pair(t: _Terms, o: _Options) -> Tensor:
    """NCA (Chen et al. 2024), pairwise: −log σ(β·c) − ½·log σ(−β·c) − ½·log σ(−β·r)."""
    bc, br = o.beta * t.chosen, o.beta * t.rejected
    return -F.logsigmoid(bc) - 0.5 * F.logsigmoid(-bc) - 0.5 * F.logsigmoid(-br)


def _bco_pair(t: _Terms, o: _Options) -> Tensor:
    """BCO, paired form as in TRL 1.16 (Jung et al. 2024, without the running reward shift):
    −log σ(β·c) − log σ(−β·r), each response classified on its own."""
    return -F.logsigmoid(o.beta * t.chosen) - F.logsigmoid(-o.beta * t.rejected)


def _sppo_hard(t: _Terms, o: _Options) -> Tensor:
    """SPPO (Wu et al. 2024, Eq. 4.7) with hard win probabilities 1 / 0:
    (c − 1/(2β))² + (r + 1/(2β))²."""
    half = 0.5 / o.beta
    return (t.chosen - half) ** 2 + (t.rejected + half) ** 2


def _aot(t: _Terms, o: _Options) -> Tensor:
    """AOT, paired (Melnyk et al. 2024): the sorted policy log-odds (log π(y_w) − log π(y_l)) of the
    batch against the sorted reference log-odds, δ = sort(policy) − sort(ref), under the cDPO loss
    −(1−ε)·log σ(β·δ) − ε·log σ(−β·δ). Entry i belongs to the i-th quantile, not to pair i."""
    policy, _ = torch.sort(t.policy_chosen - t.policy_rejected, dim=0)
    ref, _ = torch.sort(t.ref_chosen - t.ref_rejected, dim=0)
    return _smoothed_logistic(o.beta * (policy - ref), o.label_smoothing)


def _aot_unpaired(t: _Terms, o: _Options) -> Tensor:
    """AOT, unpaired (Melnyk et al. 2024): δ = sort(c) − sort(r) over the batch, cDPO loss on β·δ."""
    chosen, _ = torch.sort(t.chosen, dim=0)
    rejected, _ = torch.sort(t.rejected, dim=0)
    return _smoothed_logistic(o.beta * (chosen - rejected), o.label_smoothing)


def _apo_zero(t: _Terms, o: _Options) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7), for chosen outputs better than the policy's:
    1 − σ(β·c) + σ(β·r) (raise chosen, lower rejected)."""
    return 1 - torch.sigmoid(o.beta * t.chosen) + torch.sigmoid(o.beta * t.rejected)


def _apo_down(t: _Terms, o: _Options) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8), for chosen outputs worse than the policy's:
    σ(β·c) + 1 − σ(β·(c − r)) (lower both, rejected more)."""
    return torch.sigmoid(o.beta * t.chosen) + 1 - torch.sigmoid(o.beta * (t.chosen - t.rejected))


def _discopop(t: _Terms, o: _Options) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, Eq. 5): with z = β·Δ and
    m = σ(z/τ), (1 − m)·(−log σ(z)) + m·exp(−z); τ = `discopop_tau` (TRL default 0.05)."""
    z = o.beta * t.delta
    m = torch.sigmoid(z / o.discopop_tau)
    return (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)


def _sft(t: _Terms, o: _Options) -> Tensor:
    """SFT / NLL on the chosen completions: −(Σ chosen token log-probs) / (Σ chosen tokens) over the
    batch (a token mean, as TRL), the same value on every pair. RPO (Pang et al. 2024) is
    ["sigmoid", "sft"] with weights [1, rpo_alpha]; MPO adds bco_pair."""
    nll = -t.sft_chosen.sum() / t.raw_chosen_lengths.sum().clamp(min=1.0)
    return nll.expand(t.sft_chosen.shape[0])


def _sigmoid_norm(t: _Terms, o: _Options) -> Tensor:
    """Length-normalised DPO (as TRL 1.16's sigmoid_norm): −log σ(β·Δ̄), Δ̄ the per-token margin."""
    return -F.logsigmoid(o.beta * t.normalised_delta)


_LOSSES: dict[str, Callable[[_Terms, _Options], Tensor]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "robust": _robust,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "sppo_hard": _sppo_hard,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "bco_pair": _bco_pair,
    "sigmoid_norm": _sigmoid_norm,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "sft": _sft,
}
LOSS_TYPES: tuple[str, ...] = tuple(_LOSSES)

# label_smoothing meaning per loss type; the others ignore it in TRL 1.16, so a non-zero value is an error
_SMOOTHING_USERS = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")
_MARGIN_OFFSET_USERS = ("sigmoid",)
_LENGTH_USERS = ("ipo", "sigmoid_norm", "sft")
# TRL 1.16: the f-DPO reparameterisation leaves a β·log Z(x) term that cancels only in the chosen−rejected
# score difference, so only the losses built on that difference have an f-divergence generalisation.
_F_DIVERGENCE_USERS = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
_SORTING_LOSSES = ("aot", "aot_unpaired")


def _loss_mixture(
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
        if k not in _LOSSES:
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
    types, _ = _loss_mixture(loss_type, loss_weights)
    if not (_is_number(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got beta={beta!r}; TRL's default is beta=0.1")
    if not (_is_number(label_smoothing) and 0.0 <= label_smoothing < 0.5):
        raise ValueError(
            f"label_smoothing must lie in [0, 0.5), got label_smoothing={label_smoothing!r}; it is the "
            "probability that a preference label is flipped"
        )
    if label_smoothing and not set(types) & set(_SMOOTHING_USERS):
        raise ValueError(
            f"label_smoothing={label_smoothing!r} has no effect with loss_type={loss_type!r} (TRL ignores it); "
            f"set label_smoothing=0.0, or use one of {list(_SMOOTHING_USERS)}"
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
    needs_lengths = [k for k in types if k in _LENGTH_USERS]
    if needs_lengths and not has_lengths:
        raise ValueError(
            f"loss_type={needs_lengths[0]!r} needs chosen_lengths and rejected_lengths (completion token counts): "
            "TRL's ipo and sigmoid_norm divide each sequence log-prob by its completion length and sft averages "
            "over the chosen tokens"
        )
    if has_margin_offset and not (
        set(types) & set(_MARGIN_OFFSET_USERS) and set(types) <= {*_MARGIN_OFFSET_USERS, "sft"}
    ):
        bad = next((k for k in types if k not in (*_MARGIN_OFFSET_USERS, "sft")), types[0])
        raise ValueError(
            f"margin_offset (reward shaping) is not supported with loss_type={bad!r}; it is supported "
            f"only for {list(_MARGIN_OFFSET_USERS)} (alone or mixed with 'sft'): drop the reward-shaping "
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
    if f_divergence_type != "reverse_kl" and not set(types) <= set(_F_DIVERGENCE_USERS):
        bad = [k for k in types if k not in _F_DIVERGENCE_USERS]
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} is not supported with loss_type {bad} (the f-DPO "
            "reparameterisation cancels log Z(x) only in the chosen−rejected score difference); it is supported "
            f"only for {sorted(_F_DIVERGENCE_USERS)}: use f_divergence_type='reverse_kl' with these losses"
        )
    if not _is_number(f_alpha_divergence_coef):
        raise ValueError(
            f"f_alpha_divergence_coef must be a finite number, got {f_alpha_divergence_coef!r}; "
            f"TRL's default is {TRL_F_ALPHA_DIVERGENCE_COEF}"
        )
    if use_weighting and set(types) & set(_SORTING_LOSSES):
        raise ValueError(
            f"use_weighting=True (WPO) is not supported with loss_type={loss_type!r}: 'aot' and 'aot_unpaired' sort "
            "the batch, which would misalign the per-pair weights; set use_weighting=False or pick another loss"
        )


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
    types, weights = _loss_mixture(loss_type, loss_weights)
    pol_c = _as_pair_vector("policy_chosen_logps", policy_chosen_logps, None)
    size = pol_c.numel()
    pol_r = _as_pair_vector("policy_rejected_logps", policy_rejected_logps, size)
    ref_c = _as_pair_vector("ref_chosen_logps", ref_chosen_logps, size)
    ref_r = _as_pair_vector("ref_rejected_logps", ref_rejected_logps, size)

    len_c = len_r = None
    if set(types) & set(_LENGTH_USERS):
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
    terms = _Terms(
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
    options = _Options(
        beta=float(beta), label_smoothing=float(label_smoothing), discopop_tau=float(discopop_tau)
    )
    losses = sum(weight * _LOSSES[k](terms, options) for k, weight in zip(types, weights))
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
