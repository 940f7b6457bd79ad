"""The optimizer and learning-rate schedule of `DPOModule`: AdamW and warm-up then decay."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

SCHEDULERS = ("cosine", "linear", "constant")


def check_optimizer_options(lr: float, warmup_steps: int, scheduler: str) -> None:
    """Refuse a schedule or learning rate that cannot train, before any model loads."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r} is not one of {SCHEDULERS}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")


def adamw(params: Iterable[Tensor], *, lr: float, weight_decay: float, betas: tuple[float, float],
          eps: float) -> torch.optim.AdamW:
    """AdamW over the trainable `params`, with no weight decay on 1-d parameters (norms, biases),
    fused where torch supports it (see `fused_adamw_supported`)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps,
                             fused=fused_adamw_supported(params))


def fused_adamw_supported(params: list[Tensor]) -> bool | None:
    """True where torch's fused AdamW kernel serves every parameter (floating point, CPU or CUDA).

    The fused step updates each parameter in one kernel: the default paths allocate temporaries
    of the largest parameter (CPU, twice: 226 MB for SmolLM2's tied embedding) or of all of them
    (CUDA's foreach path). The same update up to fp32 rounding (1 ulp). None: torch's default.
    """
    ok = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok else None


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor per optimizer step: linear warm-up over `warmup` steps, then
    `kind` decay (cosine, linear, constant) until step `total`."""
    def schedule(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    return schedule


__all__ = ["SCHEDULERS", "adamw", "check_optimizer_options", "fused_adamw_supported", "lr_lambda"]
