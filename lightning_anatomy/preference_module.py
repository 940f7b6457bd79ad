"""`PreferenceModule`: the surface of `DPOModule` that callbacks may use, as a `typing.Protocol`.

Callbacks type their `pl_module` against it and read nothing else of the module (no `hparams`,
no private attribute), so a user's own LightningModule works with them when it offers the same.
The batch a step sees is a `lightning_anatomy.data.batch.PreferenceBatch`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from lightning_anatomy.data.batch import PreferenceBatch


@runtime_checkable
class PreferenceModule(Protocol):
    """What a preference-training LightningModule offers its callbacks.

    Attributes:
        policy: the trained causal LM (possibly PEFT-wrapped or sharded).
    """

    policy: nn.Module

    @property
    def reference_mode(self) -> str:
        """`"copy"`, `"precomputed"` or `"peft"`."""
        ...

    def reference_forward_module(self) -> nn.Module | None:
        """The module the reference forward runs through, inside `reference_pass()` (the frozen copy;
        the policy itself with adapters disabled for peft), or None when no reference forward runs."""
        ...

    @property
    def reference_table(self) -> Mapping[int, tuple[float, float]]:
        """Read-only `row_id -> (chosen, rejected)` precomputed reference log-probs (empty otherwise)."""
        ...

    def compute_loss(self, batch: PreferenceBatch, *, training: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of `batch` (policy forward, then reference) and its TRL-named statistics."""
        ...

    def register_auxiliary_loss(self, name: str, term: Callable[[], Tensor | None]) -> None:
        """Add `term()` to every training micro-batch's loss, after the policy and reference forwards."""
        ...

    def remove_auxiliary_loss(self, name: str) -> None:
        """Remove the auxiliary loss `name` (no error when there is none)."""
        ...


__all__ = ["PreferenceModule"]
