"""The registry of pair losses: TRL 1.16's 15 loss types as functions of the per-pair terms.

Each function maps the per-pair terms (`LossTerms`, all `[B]` fp32: log-ratios, their
f-divergence scores, log-probs, lengths, margin offset) and the scalar options (`LossParams`) to
the per-pair loss; `LOSS_FUNCTIONS` names them and the `*_USERS` tuples say which loss types read
which option (what `losses.options` checks). Notation: see `lightning_anatomy.losses`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossTerms:
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
class LossParams:
    """The scalar options the loss functions read."""

    beta: float
    label_smoothing: float
    discopop_tau: float


def _z(t: LossTerms, o: LossParams) -> Tensor:
    """z = β·Δ + margin_offset."""
    z = o.beta * t.delta
    return z if t.offset is None else z + t.offset


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z) (cDPO's form; plain −log σ(z) at ε = 0)."""
    loss = -F.logsigmoid(z)
    if eps:
        loss = (1 - eps) * loss - eps * F.logsigmoid(-z)
    return loss


def _sigmoid(t: LossTerms, o: LossParams) -> Tensor:
    """DPO (Rafailov et al. 2023): −log σ(z). With label smoothing ε, conservative DPO (cDPO,
    Mitchell 2023): −(1−ε)·log σ(z) − ε·log σ(−z), i.e. each label is assumed flipped with prob. ε."""
    return _smoothed_logistic(_z(t, o), o.label_smoothing)


def _hinge(t: LossTerms, o: LossParams) -> Tensor:
    """SLiC hinge (Zhao et al. 2023): max(0, 1 − β·Δ)."""
    return torch.relu(1 - o.beta * t.delta)


def _ipo(t: LossTerms, o: LossParams) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17): (Δ̄ − 1/(2β))², with Δ̄ = s_c/|y_w| − s_r/|y_l| the per-token
    margin (TRL normalises by completion length, as the IPO authors confirmed)."""
    return (t.normalised_delta - 1 / (2 * o.beta)) ** 2


def _robust(t: LossTerms, o: LossParams) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024), unbiased under label-flip rate ε:
    (−(1−ε)·log σ(β·Δ) + ε·log σ(−β·Δ)) / (1 − 2ε)."""
    eps, z = o.label_smoothing, o.beta * t.delta
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _exo_pair(t: LossTerms, o: LossParams) -> Tensor:
    """EXO-pref (Ji et al. 2024, Eq. 16): KL(q ‖ p_ε) over {chosen, rejected} with q = (σ(β·Δ), σ(−β·Δ))
    and target p_ε = (1−ε, ε): σ(z)·(log σ(z) − log(1−ε)) + σ(−z)·(log σ(−z) − log ε)."""
    eps, z = o.label_smoothing, o.beta * t.delta
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def _nca_pair(t: LossTerms, o: LossParams) -> Tensor:
    """NCA (Chen et al. 2024), pairwise: −log σ(β·c) − ½·log σ(−β·c) − ½·log σ(−β·r)."""
    bc, br = o.beta * t.chosen, o.beta * t.rejected
    return -F.logsigmoid(bc) - 0.5 * F.logsigmoid(-bc) - 0.5 * F.logsigmoid(-br)


def _bco_pair(t: LossTerms, o: LossParams) -> Tensor:
    """BCO, paired form as in TRL 1.16 (Jung et al. 2024, without the running reward shift):
    −log σ(β·c) − log σ(−β·r), each response classified on its own."""
    return -F.logsigmoid(o.beta * t.chosen) - F.logsigmoid(-o.beta * t.rejected)


def _sppo_hard(t: LossTerms, o: LossParams) -> Tensor:
    """SPPO (Wu et al. 2024, Eq. 4.7) with hard win probabilities 1 / 0:
    (c − 1/(2β))² + (r + 1/(2β))²."""
    half = 0.5 / o.beta
    return (t.chosen - half) ** 2 + (t.rejected + half) ** 2


def _aot(t: LossTerms, o: LossParams) -> Tensor:
    """AOT, paired (Melnyk et al. 2024): the sorted policy log-odds (log π(y_w) − log π(y_l)) of the
    batch against the sorted reference log-odds, δ = sort(policy) − sort(ref), under the cDPO loss
    −(1−ε)·log σ(β·δ) − ε·log σ(−β·δ). Entry i belongs to the i-th quantile, not to pair i."""
    policy, _ = torch.sort(t.policy_chosen - t.policy_rejected, dim=0)
    ref, _ = torch.sort(t.ref_chosen - t.ref_rejected, dim=0)
    return _smoothed_logistic(o.beta * (policy - ref), o.label_smoothing)


def _aot_unpaired(t: LossTerms, o: LossParams) -> Tensor:
    """AOT, unpaired (Melnyk et al. 2024): δ = sort(c) − sort(r) over the batch, cDPO loss on β·δ."""
    chosen, _ = torch.sort(t.chosen, dim=0)
    rejected, _ = torch.sort(t.rejected, dim=0)
    return _smoothed_logistic(o.beta * (chosen - rejected), o.label_smoothing)


def _apo_zero(t: LossTerms, o: LossParams) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7), for chosen outputs better than the policy's:
    1 − σ(β·c) + σ(β·r) (raise chosen, lower rejected)."""
    return 1 - torch.sigmoid(o.beta * t.chosen) + torch.sigmoid(o.beta * t.rejected)


def _apo_down(t: LossTerms, o: LossParams) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8), for chosen outputs worse than the policy's:
    σ(β·c) + 1 − σ(β·(c − r)) (lower both, rejected more)."""
    return torch.sigmoid(o.beta * t.chosen) + 1 - torch.sigmoid(o.beta * (t.chosen - t.rejected))


def _discopop(t: LossTerms, o: LossParams) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, Eq. 5): with z = β·Δ and
    m = σ(z/τ), (1 − m)·(−log σ(z)) + m·exp(−z); τ = `discopop_tau` (TRL default 0.05)."""
    z = o.beta * t.delta
    m = torch.sigmoid(z / o.discopop_tau)
    return (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)


def _sft(t: LossTerms, o: LossParams) -> Tensor:
    """SFT / NLL on the chosen completions: −(Σ chosen token log-probs) / (Σ chosen tokens) over the
    batch (a token mean, as TRL), the same value on every pair. RPO (Pang et al. 2024) is
    ["sigmoid", "sft"] with weights [1, rpo_alpha]; MPO adds bco_pair."""
    nll = -t.sft_chosen.sum() / t.raw_chosen_lengths.sum().clamp(min=1.0)
    return nll.expand(t.sft_chosen.shape[0])


def _sigmoid_norm(t: LossTerms, o: LossParams) -> Tensor:
    """Length-normalised DPO (as TRL 1.16's sigmoid_norm): −log σ(β·Δ̄), Δ̄ the per-token margin."""
    return -F.logsigmoid(o.beta * t.normalised_delta)


LOSS_FUNCTIONS: dict[str, Callable[[LossTerms, LossParams], Tensor]] = {
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
LOSS_TYPES: tuple[str, ...] = tuple(LOSS_FUNCTIONS)

# label_smoothing meaning per loss type; the others ignore it in TRL 1.16, so a non-zero value is an error
SMOOTHING_USERS = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")
MARGIN_OFFSET_USERS = ("sigmoid",)
LENGTH_USERS = ("ipo", "sigmoid_norm", "sft")
# TRL 1.16: the f-DPO reparameterisation leaves a β·log Z(x) term that cancels only in the chosen−rejected
# score difference, so only the losses built on that difference have an f-divergence generalisation.
F_DIVERGENCE_USERS = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
SORTING_LOSSES = ("aot", "aot_unpaired")


__all__ = [
    "F_DIVERGENCE_USERS", "LENGTH_USERS", "LOSS_FUNCTIONS", "LOSS_TYPES", "MARGIN_OFFSET_USERS", "SMOOTHING_USERS",
    "SORTING_LOSSES", "LossParams", "LossTerms",
]
