"""Lightning callbacks that read or shape what training does to concepts.

Imported lazily (module `__getattr__`): each callback module pulls in different parts of the
package, and a config only imports the ones it names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_anatomy._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "ConceptBlocking": "lightning_anatomy.callbacks.blocking",
    "ConceptProjection": "lightning_anatomy.callbacks.projection",
    "RewardShaping": "lightning_anatomy.callbacks.reward_shaping",
    "ConceptSteering": "lightning_anatomy.callbacks.steering",
    "ConceptAttribution": "lightning_anatomy.callbacks.attribution",
    "ConceptDriftMonitor": "lightning_anatomy.callbacks.drift",
    "TokenFiltering": "lightning_anatomy.callbacks.token_filtering",
}

__all__ = [
    "ConceptAttribution",
    "ConceptBlocking",
    "ConceptDriftMonitor",
    "ConceptProjection",
    "ConceptSteering",
    "RewardShaping",
    "TokenFiltering",
]  # literal so linters see the re-exports


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.callbacks.attribution import ConceptAttribution
    from lightning_anatomy.callbacks.blocking import ConceptBlocking
    from lightning_anatomy.callbacks.drift import ConceptDriftMonitor
    from lightning_anatomy.callbacks.projection import ConceptProjection
    from lightning_anatomy.callbacks.reward_shaping import RewardShaping
    from lightning_anatomy.callbacks.steering import ConceptSteering
    from lightning_anatomy.callbacks.token_filtering import TokenFiltering
