"""Editing the activation at a hook point: the one hook layer, and the subspace edits it applies.

Every intervention that changes what flows through the model (CAFT ablation, mean ablation,
steering, the gradient projection Function) is a forward hook (or, for `resid_pre`, a
forward-pre hook) on a resolved `HookPoint`. `register_activation_edit` is the one place that
handles both kinds and both output structures, and that skips reference and measurement
forwards (`edits_suspended()`, the rule in `model_access.py`), so the callbacks cannot get these
details subtly different. Beside it, the edits themselves: `project_out` (CAFT, h ← h − QQᵀh),
`mean_ablate` (the component replaced by its mean) and `component_along` (the coordinates they
act on), all in fp32 and differentiable in h.

`Q` is always a `[d, k]` basis with orthonormal columns (see `ConceptSet.basis`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_anatomy.interventions.basis import check_basis, in_span
from lightning_anatomy.model_access import HookPoint, edits_suspended, hook_input, hook_output

# edit(hidden, module) -> new hidden (same shape and dtype), or None to leave it as it is
ActivationEdit = Callable[[Tensor, torch.nn.Module], Tensor | None]


def register_activation_edit(point: HookPoint, edit: ActivationEdit) -> RemovableHandle:
    """Apply `edit` to the activation at `point` on every forward outside reference and measurement passes.

    The edit must be a pure function of its inputs: activation checkpointing re-runs forward hooks
    while recomputing, and a recomputed forward has to reproduce the original one exactly.
    """
    if point.kind == "input":

        def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
            if edits_suspended():
                return None
            hidden, rebuild = hook_input(args, kwargs)
            new = edit(hidden, module)
            return None if new is None else rebuild(new)

        return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if edits_suspended():
            return None
        hidden, rebuild = hook_output(output)
        new = edit(hidden, module)
        return None if new is None else rebuild(new)

    return point.module.register_forward_hook(hook)


def training_only_edit(
    constant: Tensor, apply: Callable[[Tensor, Tensor], Tensor], active: Callable[[], bool] | None = None
) -> ActivationEdit:
    """An activation edit `apply(hidden, constant)` that acts only while training (`active()` when
    given, else the hooked module's `.training`), with `constant` moved to each activation's
    device once, in fp32 — what ablation and steering share."""
    on_device: dict[torch.device, Tensor] = {}

    def edit(hidden: Tensor, module: torch.nn.Module) -> Tensor | None:
        if not (active() if active is not None else module.training):
            return None
        c = on_device.get(hidden.device)
        if c is None:
            c = on_device[hidden.device] = constant.to(device=hidden.device, dtype=torch.float32)
        return apply(hidden, c)

    return edit


def ablation_edit(Q: Tensor, active: Callable[[], bool] | None = None) -> ActivationEdit:
    """CAFT: replace h by h − QQᵀh (fp32 math, gradient flowing) while training.

    "While training" is `active()` when given (callbacks pass "the Trainer is in its training
    stage": Lightning keeps a model built in eval mode in eval mode while it trains), else the
    hooked module's `.training`. Otherwise (validation, generation, inference) the activation is
    left untouched, which is what makes CAFT a training-time intervention only.
    """
    return training_only_edit(Q, project_out, active)


def orthonormal_union(bases: Sequence[Tensor], *, tol: float = 1e-6) -> Tensor:
    """An fp32 orthonormal basis `[d, k]` of the span of all columns of `bases` (the union subspace).

    Used where several concepts' bases land on one hook (`layers="all_later"`): projecting out each
    basis in turn is not the projection onto the union unless the bases are mutually orthogonal.
    Directions that are (numerically) already covered are dropped.
    """
    if not bases:
        raise ValueError("orthonormal_union needs at least one basis")
    widths = {int(b.shape[0]) for b in bases}
    if len(widths) != 1:
        raise ValueError(f"bases of different widths {sorted(widths)} cannot be combined at one hook")
    stacked = torch.cat([b.detach().to(torch.float64).cpu() for b in bases], dim=1)
    if stacked.shape[1] == 0:
        return stacked.to(torch.float32)
    u, s, _ = torch.linalg.svd(stacked, full_matrices=False)
    keep = s > tol * max(float(s[0]), 1.0)
    return u[:, keep].contiguous().to(torch.float32)


def project_out(x: Tensor, Q: Tensor) -> Tensor:
    """x − (x·Q)·Qᵀ in fp32, cast back to x's dtype; differentiable in x (CAFT ablation)."""
    check_basis(x, Q, "project_out")
    x32 = x.float()
    return (x32 - in_span(x32, Q)).to(x.dtype)


def mean_ablate(x: Tensor, Q: Tensor, mean: Tensor) -> Tensor:
    """x − (x·Q)·Qᵀ + Q·μ in fp32, cast back to x's dtype; differentiable in x (mean ablation).

    The component along span(Q) is replaced by its mean μ (`[k]`, coordinates in the basis, e.g.
    over reference tokens) instead of by zero: the residual stream has no preferred origin, so
    zero-ablation moves every activation by −QQᵀh and can act as a steering vector (Persona
    vectors, Chen et al. 2025, App. J.1). The gradient is (I − QQᵀ)g, as for `project_out`.
    """
    check_basis(x, Q, "mean_ablate")
    if mean.shape != (Q.shape[1],):
        raise ValueError(
            f"mean_ablate: the mean has shape {tuple(mean.shape)} but the basis Q has k={Q.shape[1]} columns; "
            "measure the mean as component_along(h, Q).mean over tokens with the same basis"
        )
    x32 = x.float()
    Q32 = Q.to(device=x.device, dtype=torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        shift = Q32 @ mean.to(device=x.device, dtype=torch.float32)
    return (x32 - in_span(x32, Q) + shift).to(x.dtype)


def component_along(x: Tensor, Q: Tensor) -> Tensor:
    """x·Q in fp32: the coordinates of x in the basis (`[..., k]`)."""
    check_basis(x, Q, "component_along")
    with torch.autocast(device_type=x.device.type, enabled=False):
        return x.float() @ Q.to(device=x.device, dtype=torch.float32)


__all__ = [
    "ActivationEdit",
    "ablation_edit",
    "component_along",
    "mean_ablate",
    "orthonormal_union",
    "project_out",
    "register_activation_edit",
    "training_only_edit",
]
