"""Products with a concept basis `Q` (`[d, k]`, orthonormal columns), in fp32, and whether two
bases span the same subspace (`same_subspace`: `ConceptProjection`'s resume check).

Shared by the gradient Functions (`projection.py`) and the activation edits
(`activation_edits.py`): both need the same shape check and the same fp32 in-span component,
because a bf16 g·Q loses the very component they remove.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Two bases describe the same subspace when their projectors differ by less than this (spectral
# norm): far above float noise between machines, far below any real change of a concept.
SUBSPACE_TOL = 1e-4


def check_basis(x: Tensor, Q: Tensor, what: str) -> None:
    """Refuse a basis that is not 2-D or whose width differs from `x`'s last dimension."""
    if Q.dim() != 2:
        raise ValueError(f"{what}: the basis Q must be 2-D [d, k], got shape {tuple(Q.shape)}")
    if x.shape[-1] != Q.shape[0]:
        raise ValueError(
            f"{what}: the activation's last dimension is {x.shape[-1]} but the basis Q has d={Q.shape[0]} rows; "
            "build the basis at the same hook (same model width) as the activation it edits"
        )


def in_span(g32: Tensor, Q: Tensor) -> Tensor:
    """(g·Q)·Qᵀ in fp32 on g's device: the part of g inside span(Q).

    Autocast is switched off here: under AMP it would quietly run these matmuls in bf16/fp16 and
    leave ~1e-3 of the removed component behind.
    """
    Q32 = Q.to(device=g32.device, dtype=torch.float32)
    with torch.autocast(device_type=g32.device.type, enabled=False):
        return (g32 @ Q32) @ Q32.T


def same_subspace(a: Tensor, b: Tensor) -> bool:
    """Whether two orthonormal bases span the same subspace: ‖P_a − P_b‖₂ = sin(largest principal
    angle) = sqrt(1 − σ_min(aᵀb)²) below `SUBSPACE_TOL` (only k×k work, never d×d)."""
    if a.shape != b.shape:
        return False
    # re-orthonormalised in float64 first: an fp32 basis is orthonormal only to ~1e-7, which the
    # square root would inflate to ~3e-4
    a64, b64 = torch.linalg.qr(a.double())[0], torch.linalg.qr(b.double())[0]
    sigma = torch.linalg.svdvals(a64.T @ b64)
    return float(torch.sqrt(torch.clamp(1 - sigma.min() ** 2, min=0))) <= SUBSPACE_TOL


__all__ = ["SUBSPACE_TOL", "check_basis", "in_span", "same_subspace"]
