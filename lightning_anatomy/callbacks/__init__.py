"""Lightning callbacks that read or shape what training does to concepts.

Imported lazily (module `__getattr__`): each callback module pulls in different parts of the
package, and the CLI's factory only needs the ones a config names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "ConceptProjection": "lightning_anatomy.callbacks.projection",
    "RewardShaping": "lightning_anatomy.callbacks.shaping",
    "ConceptSteering": "lightning_anatomy.callbacks.shaping",
    "ConceptAttribution": "lightning_anatomy.callbacks.attribution",
    "ConceptDriftMonitor": "lightning_anatomy.callbacks.drift",
}

__all__ = [
    "ConceptAttribution",
    "ConceptDriftMonitor",
    "ConceptProjection",
    "ConceptSteering",
    "RewardShaping",
]  # literal so linters see the re-exports


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_anatomy.callbacks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.callbacks.attribution import ConceptAttribution
    from lightning_anatomy.callbacks.drift import ConceptDriftMonitor
    from lightning_anatomy.callbacks.projection import ConceptProjection
    from lightning_anatomy.callbacks.shaping import ConceptSteering, RewardShaping
