"""Steering along concept vectors during training (persona vectors, Chen et al. 2025).

Preventative steering adds α·v to the activations while training, so the optimizer no longer needs
to move the model toward v to fit data that carries the trait; at inference (no steering) the
trait stays out. The sign follows each concept's action: a `suppress` concept is added (+v), an
`amplify` concept subtracted (−v, the model learns to compensate, i.e. to produce more of it),
`allow` concepts are left alone. Reward shaping scores use the same signs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_anatomy.interventions.activation_edits import ActivationEdit, training_only_edit

SIDES = ("both", "chosen", "rejected")
ACTION_SIGN = {"suppress": 1.0, "amplify": -1.0}


def signed_vectors(concepts: Any, hook: str, *, normalize: bool = False) -> Tensor:
    """`[k, d]` fp32: the vectors of the non-`allow` concepts at `hook`, multiplied by their
    action's sign (suppress +1, amplify −1); unit length when `normalize`."""
    rows = []
    for concept in concepts.select(hook=hook):
        sign = ACTION_SIGN.get(concept.action)
        if sign is None:
            continue
        v = concept.vector.to(torch.float32)
        rows.append(sign * (v / v.norm() if normalize else v))
    if not rows:
        raise ValueError(
            f"concepts: no concept with action 'suppress' or 'amplify' at hook {hook!r} "
            f"(hooks in the set: {concepts.hooks}); set an action in concepts.yaml or ConceptSet.with_actions"
        )
    return torch.stack(rows)


def steer(hidden: Tensor, vector: Tensor, alpha: float, sides: str = "both") -> Tensor:
    """`hidden + alpha·vector` on the rows of `sides` of a `[chosen; rejected]` batch.

    `hidden` is `[2B, ...,  d]`; rows `0..B-1` are the chosen sequences, `B..2B-1` the rejected
    ones. Every position of a steered row gets the same shift.
    """
    if sides not in SIDES:
        raise ValueError(f"sides={sides!r} is not one of {SIDES}")
    if hidden.shape[-1] != vector.shape[-1]:
        raise ValueError(
            f"steering vector has d={vector.shape[-1]} but the activation's width is {hidden.shape[-1]}; "
            "build the concept at the hook it steers"
        )
    shift = (alpha * vector.to(device=hidden.device, dtype=torch.float32)).to(hidden.dtype)
    if sides == "both":
        return hidden + shift
    rows = hidden.shape[0]
    if rows % 2:
        raise ValueError(
            f"sides={sides!r} needs a [chosen; rejected] batch with an even number of rows, got {rows}; "
            "use sides='both' for other models"
        )
    scale = torch.zeros(rows, dtype=hidden.dtype, device=hidden.device)
    half = rows // 2
    scale[:half] = 1 if sides == "chosen" else 0
    scale[half:] = 1 if sides == "rejected" else 0
    return hidden + scale.view(rows, *([1] * (hidden.dim() - 1))) * shift


def steering_edit(
    vector: Tensor, alpha: float, sides: str = "both", active: Callable[[], bool] | None = None
) -> ActivationEdit:
    """An activation edit (see `register_activation_edit`) that steers while training: while
    `active()` is true when given (callbacks pass "the Trainer is in its training stage"), else
    while the hooked module is in train mode."""
    if sides not in SIDES:
        raise ValueError(f"sides={sides!r} is not one of {SIDES}")

    return training_only_edit(vector, lambda hidden, v: steer(hidden, v, alpha, sides), active)
