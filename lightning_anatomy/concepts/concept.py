"""`Concept`: one named direction at one hook, with the action a user chose for it
(`suppress`, `amplify` or `allow`), its label and its provenance; the element of a `ConceptSet`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_anatomy.concepts.errors import ConceptSetError

ACTIONS = ("suppress", "amplify", "allow")


def check_action(action: str, where: str) -> str:
    if action not in ACTIONS:
        raise ConceptSetError(f"{where}: action {action!r} is not one of {', '.join(ACTIONS)}")
    return action


def plain_provenance(value: Any) -> Any:
    """Provenance as plain YAML types (tensors and numpy scalars become lists and numbers)."""
    if isinstance(value, Mapping):
        return {str(k): plain_provenance(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_provenance(v) for v in value]
    if isinstance(value, torch.Tensor):
        return plain_provenance(value.tolist())
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalar
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


@dataclass
class Concept:
    """One named direction at one hook. `vector` is stored fp32 on CPU, shape [d]."""

    name: str
    hook: str
    vector: torch.Tensor
    label: str = ""
    action: str = "suppress"
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConceptSetError(f"concept name must be a non-empty string, got {self.name!r}")
        where = f"concept {self.name!r}"
        if not isinstance(self.hook, str) or not self.hook:
            raise ConceptSetError(f"{where}: field 'hook' must be a hook name, got {self.hook!r}")
        vec = torch.as_tensor(self.vector).detach()
        if vec.dim() != 1 or vec.numel() == 0:
            raise ConceptSetError(f"{where}: vector must be 1-D [d], got shape {tuple(vec.shape)}")
        vec = vec.to(device="cpu", dtype=torch.float32).clone().contiguous()
        if not torch.isfinite(vec).all():
            raise ConceptSetError(f"{where}: vector has non-finite values (NaN or inf)")
        if not vec.abs().sum() > 0:
            raise ConceptSetError(f"{where}: vector is all zeros, which names no direction")
        self.vector = vec
        self.label = "" if self.label is None else str(self.label)
        check_action(self.action, where)
        self.source = plain_provenance(dict(self.source or {}))

    @property
    def dim(self) -> int:
        return int(self.vector.numel())


__all__ = ["ACTIONS", "Concept", "check_action", "plain_provenance"]
