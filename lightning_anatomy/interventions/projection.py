"""Editing gradients (and activations) along a concept subspace.

The gradient edit lives in an autograd Function on the activation path rather than in a
`.grad` hook on parameters: it is linear in the incoming gradient, so it stays exact under AMP
loss scaling, gradient accumulation, DDP averaging and activation checkpointing, and it never
touches (possibly sharded) parameter gradients. All products with the basis run in fp32, because
a bf16 g·Q loses the very component we are trying to remove.

`Q` is always a `[d, k]` basis with orthonormal columns (see `ConceptSet.basis`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_basis(x: Tensor, Q: Tensor, what: str) -> None:
    if Q.dim() != 2:
        raise ValueError(f"{what}: the basis Q must be 2-D [d, k], got shape {tuple(Q.shape)}")
    if x.shape[-1] != Q.shape[0]:
        raise ValueError(
            f"{what}: the activation's last dimension is {x.shape[-1]} but the basis Q has d={Q.shape[0]} rows; "
            "build the basis at the same hook (same model width) as the activation it edits"
        )


def _component(g32: Tensor, Q: Tensor) -> Tensor:
    """(g·Q)·Qᵀ in fp32 on g's device: the part of g inside span(Q).

    Autocast is switched off here: under AMP it would quietly run these matmuls in bf16/fp16 and
    leave ~1e-3 of the removed component behind.
    """
    Q32 = Q.to(device=g32.device, dtype=torch.float32)
    with torch.autocast(device_type=g32.device.type, enabled=False):
        return (g32 @ Q32) @ Q32.T


class GradientProjection(torch.autograd.Function):
    """Identity forward; backward removes the gradient's component along span(Q): g ← (I − QQᵀ)g.

    `GradientProjection.apply(h, Q)` with `h: [..., d]`, `Q: [d, k]` orthonormal. Q gets no
    gradient. Applying it twice equals applying it once (a projection is idempotent), which is why a
    forward hook re-run by activation checkpointing stays correct.
    """

    @staticmethod
    def forward(ctx, h: Tensor, Q: Tensor) -> Tensor:  # type: ignore[override]
        _check_basis(h, Q, "GradientProjection")
        ctx.save_for_backward(Q)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        (Q,) = ctx.saved_tensors
        if grad is None:
            return None, None
        g32 = grad.float()
        return (g32 - _component(g32, Q)).to(grad.dtype), None


class GradientAmplification(torch.autograd.Function):
    """Identity forward; backward scales the gradient's component along span(Q) by `factor`.

    g ← g + (factor − 1)·QQᵀg, i.e. the orthogonal part is unchanged and the in-span part is
    multiplied by `factor` (> 1). Linear in g, like `GradientProjection`.
    """

    @staticmethod
    def forward(ctx, h: Tensor, Q: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        _check_basis(h, Q, "GradientAmplification")
        factor = float(factor)
        if not factor > 1.0 or factor == float("inf"):
            raise ValueError(
                f"GradientAmplification: factor must be a finite number > 1, got {factor}; "
                "use GradientProjection to remove the component instead of scaling it"
            )
        ctx.save_for_backward(Q)
        ctx.factor = factor
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        (Q,) = ctx.saved_tensors
        if grad is None:
            return None, None, None
        g32 = grad.float()
        return (g32 + (ctx.factor - 1.0) * _component(g32, Q)).to(grad.dtype), None, None


def project_out(x: Tensor, Q: Tensor) -> Tensor:
    """x − (x·Q)·Qᵀ in fp32, cast back to x's dtype; differentiable in x (CAFT ablation)."""
    _check_basis(x, Q, "project_out")
    x32 = x.float()
    return (x32 - _component(x32, Q)).to(x.dtype)


def mean_ablate(x: Tensor, Q: Tensor, mean: Tensor) -> Tensor:
    """x − (x·Q)·Qᵀ + Q·μ in fp32, cast back to x's dtype; differentiable in x (mean ablation).

    The component along span(Q) is replaced by its mean μ (`[k]`, coordinates in the basis, e.g.
    over reference tokens) instead of by zero: the residual stream has no preferred origin, so
    zero-ablation moves every activation by −QQᵀh and can act as a steering vector (Persona
    vectors, Chen et al. 2025, App. J.1). The gradient is (I − QQᵀ)g, as for `project_out`.
    """
    _check_basis(x, Q, "mean_ablate")
    if mean.shape != (Q.shape[1],):
        raise ValueError(
            f"mean_ablate: the mean has shape {tuple(mean.shape)} but the basis Q has k={Q.shape[1]} columns; "
            "measure the mean as component_along(h, Q).mean over tokens with the same basis"
        )
    x32 = x.float()
    Q32 = Q.to(device=x.device, dtype=torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        shift = Q32 @ mean.to(device=x.device, dtype=torch.float32)
    return (x32 - _component(x32, Q) + shift).to(x.dtype)


def component_along(x: Tensor, Q: Tensor) -> Tensor:
    """x·Q in fp32: the coordinates of x in the basis (`[..., k]`)."""
    _check_basis(x, Q, "component_along")
    with torch.autocast(device_type=x.device.type, enabled=False):
        return x.float() @ Q.to(device=x.device, dtype=torch.float32)
