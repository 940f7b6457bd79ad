"""Products with a concept basis `Q` (`[d, k]`, orthonormal columns), in fp32.

Shared by the gradient Functions (`projection.py`) and the activation edits
(`activation_edits.py`): both need the same shape check and the same fp32 in-span component,
because a bf16 g·Q loses the very component they remove.
"""

from __future__ import annotations

import torch
from torch import Tensor


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


__all__ = ["check_basis", "in_span"]
