"""The preference-loss family as pure tensor functions on summed sequence log-probs.

Every definition agrees numerically with TRL 1.16's `DPOTrainer` (so numbers and dashboards carry
over) with one deliberate addition: `sigmoid` honours `label_smoothing` as conservative DPO (cDPO),
which TRL 1.16 silently ignores for `sigmoid`; at `label_smoothing=0` the two are identical.

Notation (per pair): ``c = log π(y_w|x) − log π_ref(y_w|x)`` and ``r = log π(y_l|x) − log π_ref(y_l|x)``
are the chosen / rejected log-ratios, ``Δ = c − r``, ``z = β·Δ (+ margin_offset)`` are the logits.
Everything is computed in fp32 whatever the input dtype: the losses are small differences of large
sums, which bf16 cannot hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

TRL_DISCOPOP_TAU = 0.05  # TRL 1.16 DPOConfig.discopop_tau default, the DiscoPOP paper's value
_NOT_IMPLEMENTED_TRL_TYPES = ("bco_pair", "aot", "aot_unpaired", "sft", "sigmoid_norm")


@dataclass(frozen=True)
class PreferenceLossOutput:
    """Per-pair results; reduce (weights, mean) in the caller.

    `losses` [B] fp32 with grad; `chosen_rewards` / `rejected_rewards` [B] = β·(policy − ref), detached,
    as TRL logs them (never length-normalised); `logits` [B] = β·Δ + margin_offset, the margin the loss
    is a function of (Δ length-normalised for ipo), detached.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    logits: Tensor


class _Pair(NamedTuple):
    chosen: Tensor  # c, chosen log-ratio (fp32)
    rejected: Tensor  # r, rejected log-ratio (fp32)
    delta: Tensor  # Δ = c − r, or c/|y_w| − r/|y_l| for ipo
    logits: Tensor  # z = β·Δ + margin_offset


@dataclass(frozen=True)
class _Options:
    beta: float
    label_smoothing: float
    discopop_tau: float


def _sigmoid(p: _Pair, o: _Options) -> Tensor:
    """DPO (Rafailov et al. 2023): −log σ(z). With label smoothing ε, conservative DPO (cDPO,
    Mitchell 2023): −(1−ε)·log σ(z) − ε·log σ(−z), i.e. each label is assumed flipped with prob. ε."""
    loss = -F.logsigmoid(p.logits)
    if o.label_smoothing:
        loss = (1 - o.label_smoothing) * loss - o.label_smoothing * F.logsigmoid(-p.logits)
    return loss


def _hinge(p: _Pair, o: _Options) -> Tensor:
    """SLiC hinge (Zhao et al. 2023): max(0, 1 − β·Δ)."""
    return torch.relu(1 - p.logits)


def _ipo(p: _Pair, o: _Options) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17): (Δ̄ − 1/(2β))², with Δ̄ = c/|y_w| − r/|y_l| the per-token
    log-ratio difference (TRL normalises by completion length, as the IPO authors confirmed)."""
    return (p.delta - 1 / (2 * o.beta)) ** 2


def _robust(p: _Pair, o: _Options) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024), unbiased under label-flip rate ε:
    (−(1−ε)·log σ(z) + ε·log σ(−z)) / (1 − 2ε)."""
    eps = o.label_smoothing
    return (-(1 - eps) * F.logsigmoid(p.logits) + eps * F.logsigmoid(-p.logits)) / (1 - 2 * eps)


def _exo_pair(p: _Pair, o: _Options) -> Tensor:
    """EXO-pref (Ji et al. 2024, Eq. 16): KL(q ‖ p_ε) over {chosen, rejected} with q = (σ(z), σ(−z))
    and target p_ε = (1−ε, ε): σ(z)·(log σ(z) − log(1−ε)) + σ(−z)·(log σ(−z) − log ε)."""
    eps = o.label_smoothing
    z = p.logits
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def _nca_pair(p: _Pair, o: _Options) -> Tensor:
    """NCA (Chen et al. 2024), pairwise: −log σ(β·c) − ½·log σ(−β·c) − ½·log σ(−β·r)."""
    bc, br = o.beta * p.chosen, o.beta * p.rejected
    return -F.logsigmoid(bc) - 0.5 * F.logsigmoid(-bc) - 0.5 * F.logsigmoid(-br)


def _sppo_hard(p: _Pair, o: _Options) -> Tensor:
    """SPPO (Wu et al. 2024, Eq. 4.7) with hard win probabilities 1 / 0:
    (c − 1/(2β))² + (r + 1/(2β))²."""
    half = 0.5 / o.beta
    return (p.chosen - half) ** 2 + (p.rejected + half) ** 2


def _apo_zero(p: _Pair, o: _Options) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7), for chosen outputs better than the policy's:
    1 − σ(β·c) + σ(β·r) (raise chosen, lower rejected)."""
    return 1 - torch.sigmoid(o.beta * p.chosen) + torch.sigmoid(o.beta * p.rejected)


def _apo_down(p: _Pair, o: _Options) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8), for chosen outputs worse than the policy's:
    σ(β·c) + 1 − σ(β·(c − r)) (lower both, rejected more)."""
    return torch.sigmoid(o.beta * p.chosen) + 1 - torch.sigmoid(o.beta * (p.chosen - p.rejected))


def _discopop(p: _Pair, o: _Options) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, Eq. 5): with m = σ(z/τ),
    (1 − m)·(−log σ(z)) + m·exp(−z); τ = `discopop_tau` (TRL default 0.05)."""
    z = p.logits
    m = torch.sigmoid(z / o.discopop_tau)
    return (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)


_LOSSES: dict[str, Callable[[_Pair, _Options], Tensor]] = {
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
}
LOSS_TYPES: tuple[str, ...] = tuple(_LOSSES)

# label_smoothing meaning per loss type; the others ignore it in TRL 1.16, so a non-zero value is an error
_SMOOTHING_USERS = ("sigmoid", "robust", "exo_pair")
_MARGIN_OFFSET_USERS = ("sigmoid",)


def validate_loss_options(
    loss_type: str,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    *,
    discopop_tau: float = TRL_DISCOPOP_TAU,
    has_lengths: bool = True,
    has_margin_offset: bool = False,
) -> None:
    """Reject an illegal option combination before any heavy work starts.

    Config-time callers that will pass completion lengths to every `preference_loss` call leave
    `has_lengths=True`; set `has_margin_offset=True` when reward shaping will add a margin offset.
    Raises ValueError naming the option and how to fix it.
    """
    if not isinstance(loss_type, str):
        raise ValueError(
            f"loss_type must be one string, got {loss_type!r}; combining loss types is not supported here, "
            f"pick one of {list(LOSS_TYPES)}"
        )
    if loss_type not in _LOSSES:
        hint = " (a TRL loss type not implemented here)" if loss_type in _NOT_IMPLEMENTED_TRL_TYPES else ""
        raise ValueError(f"unknown loss_type={loss_type!r}{hint}; valid loss types: {list(LOSS_TYPES)}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got beta={beta!r}; TRL's default is beta=0.1")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 0.5):
        raise ValueError(
            f"label_smoothing must lie in [0, 0.5), got label_smoothing={label_smoothing!r}; it is the "
            "probability that a preference label is flipped"
        )
    if label_smoothing and loss_type not in _SMOOTHING_USERS:
        raise ValueError(
            f"label_smoothing={label_smoothing!r} has no effect with loss_type={loss_type!r} (TRL ignores it); "
            f"set label_smoothing=0.0, or use one of {list(_SMOOTHING_USERS)}"
        )
    if loss_type == "exo_pair" and label_smoothing == 0.0:
        raise ValueError(
            "loss_type='exo_pair' needs label_smoothing > 0 (its ε; log ε is infinite at 0); "
            "the EXO paper recommends label_smoothing=1e-3"
        )
    if not (isinstance(discopop_tau, (int, float)) and math.isfinite(discopop_tau) and discopop_tau > 0):
        raise ValueError(
            f"discopop_tau must be a finite number > 0, got discopop_tau={discopop_tau!r}; "
            f"the DiscoPOP paper and TRL use {TRL_DISCOPOP_TAU}"
        )
    if loss_type == "ipo" and not has_lengths:
        raise ValueError(
            "loss_type='ipo' needs chosen_lengths and rejected_lengths (completion token counts): TRL's IPO "
            "divides each sequence log-prob by its completion length"
        )
    if has_margin_offset and loss_type not in _MARGIN_OFFSET_USERS:
        raise ValueError(
            f"margin_offset (reward shaping) is not supported with loss_type={loss_type!r}; it is supported "
            f"only for {list(_MARGIN_OFFSET_USERS)}: drop the reward-shaping intervention or use loss_type='sigmoid'"
        )


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
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    margin_offset: Tensor | None = None,
    discopop_tau: float = TRL_DISCOPOP_TAU,
) -> PreferenceLossOutput:
    """Per-pair preference loss from summed completion log-probs (all `[B]`).

    `chosen_lengths` / `rejected_lengths` are completion token counts, used (and required) only by
    `ipo`, clamped to ≥ 1 like TRL. `margin_offset` `[B]` is added to β·Δ before the sigmoid
    (reward shaping, Bergen et al. 2026: −log σ(β·Δθ + λ·ΔA)); `sigmoid` only.
    """
    validate_loss_options(
        loss_type,
        beta,
        label_smoothing,
        discopop_tau=discopop_tau,
        has_lengths=chosen_lengths is not None and rejected_lengths is not None,
        has_margin_offset=margin_offset is not None,
    )
    pol_c = _as_pair_vector("policy_chosen_logps", policy_chosen_logps, None)
    size = pol_c.numel()
    pol_r = _as_pair_vector("policy_rejected_logps", policy_rejected_logps, size)
    ref_c = _as_pair_vector("ref_chosen_logps", ref_chosen_logps, size)
    ref_r = _as_pair_vector("ref_rejected_logps", ref_rejected_logps, size)

    chosen, rejected = pol_c - ref_c, pol_r - ref_r
    if loss_type == "ipo":
        len_c = _as_pair_vector("chosen_lengths", chosen_lengths, size)
        len_r = _as_pair_vector("rejected_lengths", rejected_lengths, size)
        for name, lengths in (("chosen_lengths", len_c), ("rejected_lengths", len_r)):
            if bool((lengths < 0).any()):
                bad = int(torch.nonzero(lengths < 0)[0, 0])
                raise ValueError(
                    f"{name}[{bad}] = {lengths[bad].item():g} is negative; pass completion token counts"
                )
        delta = chosen / len_c.clamp(min=1.0) - rejected / len_r.clamp(min=1.0)
    else:
        delta = chosen - rejected
    logits = beta * delta
    if margin_offset is not None:
        logits = logits + _as_pair_vector("margin_offset", margin_offset, size)

    options = _Options(
        beta=float(beta), label_smoothing=float(label_smoothing), discopop_tau=float(discopop_tau)
    )
    losses = _LOSSES[loss_type](_Pair(chosen, rejected, delta, logits), options)
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
        logits=logits.detach(),
    )
