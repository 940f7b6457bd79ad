"""lightning-anatomy: see what a preference dataset teaches a language model, and shape it.

Public names are imported lazily so that `import lightning_anatomy` stays cheap (the CLI and
DDP workers import it before they know which parts they need).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_anatomy._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "PreferenceDataModule": "lightning_anatomy.data",
    "read_preferences": "lightning_anatomy.data",
    "PreferenceDataError": "lightning_anatomy.data",
    "DPOModule": "lightning_anatomy.module",
    "preference_loss": "lightning_anatomy.losses",
    "ConceptLens": "lightning_anatomy.concepts",
    "ConceptSet": "lightning_anatomy.concepts",
    "GradientProjection": "lightning_anatomy.interventions",
    "ConceptProjection": "lightning_anatomy.callbacks",
    "ConceptAttribution": "lightning_anatomy.callbacks",
    "ConceptBlocking": "lightning_anatomy.callbacks",
    "ConceptDriftMonitor": "lightning_anatomy.callbacks",
    "audit_dataset": "lightning_anatomy.audit",
    "check_prediction": "lightning_anatomy.audit",
}

__all__ = [
    "ConceptAttribution",
    "ConceptBlocking",
    "ConceptDriftMonitor",
    "ConceptLens",
    "ConceptProjection",
    "ConceptSet",
    "DPOModule",
    "GradientProjection",
    "PreferenceDataError",
    "PreferenceDataModule",
    "audit_dataset",
    "check_prediction",
    "preference_loss",
    "read_preferences",
]  # literal so linters see the re-exports


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.audit import audit_dataset, check_prediction
    from lightning_anatomy.callbacks import (
        ConceptAttribution,
        ConceptBlocking,
        ConceptDriftMonitor,
        ConceptProjection,
    )
    from lightning_anatomy.concepts import ConceptLens, ConceptSet
    from lightning_anatomy.data import PreferenceDataError, PreferenceDataModule, read_preferences
    from lightning_anatomy.interventions import GradientProjection
    from lightning_anatomy.losses import preference_loss
    from lightning_anatomy.module import DPOModule
