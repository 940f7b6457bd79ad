"""Editing gradients along a concept subspace: the autograd Functions on the activation path.

The gradient edit lives in an autograd Function on the activation path rather than in a
`.grad` hook on parameters: it is linear in the incoming gradient, so it stays exact under AMP
loss scaling, gradient accumulation, DDP averaging and activation checkpointing, and it never
touches (possibly sharded) parameter gradients. All products with the basis run in fp32, because
a bf16 g·Q loses the very component we are trying to remove.

`Q` is always a `[d, k]` basis with orthonormal columns (see `ConceptSet.basis`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from lightning_anatomy.interventions.basis import check_basis, in_span

# Moved to `interventions.activation_edits`; resolvable here for one release, with a warning.
_MOVED = ("project_out", "mean_ablate", "component_along")


class GradientProjection(torch.autograd.Function):
    """Identity forward; backward removes the gradient's component along span(Q): g ← (I − QQᵀ)g.

    `GradientProjection.apply(h, Q)` with `h: [..., d]`, `Q: [d, k]` orthonormal. Q gets no
    gradient. Applying it twice equals applying it once (a projection is idempotent), which is why a
    forward hook re-run by activation checkpointing stays correct.
    """

    @staticmethod
    def forward(ctx, h: Tensor, Q: Tensor) -> Tensor:  # type: ignore[override]
        check_basis(h, Q, "GradientProjection")
        ctx.save_for_backward(Q)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        (Q,) = ctx.saved_tensors
        if grad is None:
            return None, None
        g32 = grad.float()
        return (g32 - in_span(g32, Q)).to(grad.dtype), None


class GradientAmplification(torch.autograd.Function):
    """Identity forward; backward scales the gradient's component along span(Q) by `factor`.

    g ← g + (factor − 1)·QQᵀg, i.e. the orthogonal part is unchanged and the in-span part is
    multiplied by `factor` (> 1). Linear in g, like `GradientProjection`.
    """

    @staticmethod
    def forward(ctx, h: Tensor, Q: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        check_basis(h, Q, "GradientAmplification")
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
        return (g32 + (ctx.factor - 1.0) * in_span(g32, Q)).to(grad.dtype), None, None


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"lightning_anatomy.interventions.projection.{name} is deprecated and will be removed in the next "
            "release; import it from lightning_anatomy.interventions.activation_edits (or "
            "lightning_anatomy.interventions)",
            DeprecationWarning,
            stacklevel=2,
        )
        from lightning_anatomy.interventions import activation_edits

        return getattr(activation_edits, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["GradientAmplification", "GradientProjection"]
