"""lightning-anatomy: see what a preference dataset teaches a language model, and shape it.

Public names are imported lazily so that `import lightning_anatomy` stays cheap (the CLI and
DDP workers import it before they know which parts they need).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_anatomy._lazy import lazy_exports
from lightning_anatomy.data.sources import register_source

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
    "ConceptSteering": "lightning_anatomy.callbacks",
    "RewardShaping": "lightning_anatomy.callbacks",
    "TokenFiltering": "lightning_anatomy.callbacks",
    "audit_dataset": "lightning_anatomy.audit",
    "check_prediction": "lightning_anatomy.audit",
    "AuditResult": "lightning_anatomy.audit",
    "AuditOptions": "lightning_anatomy.audit",
    "PredictionCheck": "lightning_anatomy.audit",
    "load_model": "lightning_anatomy.models.loading",
    "load_tokenizer": "lightning_anatomy.models.loading",
    "load_sae": "lightning_anatomy.concepts.sae",
    "quiet_lightning": "lightning_anatomy.console",
}

__all__ = [
    "AuditOptions",
    "AuditResult",
    "ConceptAttribution",
    "ConceptBlocking",
    "ConceptDriftMonitor",
    "ConceptLens",
    "ConceptProjection",
    "ConceptSet",
    "ConceptSteering",
    "DPOModule",
    "GradientProjection",
    "PredictionCheck",
    "PreferenceDataError",
    "PreferenceDataModule",
    "RewardShaping",
    "TokenFiltering",
    "audit_dataset",
    "check_prediction",
    "load_model",
    "load_sae",
    "load_tokenizer",
    "preference_loss",
    "quiet_lightning",
    "read_preferences",
]  # literal so linters see the re-exports


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


def _demo_source(size: int | None, seed: int) -> object:
    from lightning_anatomy.demo.data import make_demo_data

    return make_demo_data(seed=seed).train


# The facade sits above every layer, so it wires the demo's data into the data layer's registry.
register_source("demo", _demo_source, "'demo' (the sycophancy demo's training pairs)")


if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.audit import (
        AuditOptions,
        AuditResult,
        PredictionCheck,
        audit_dataset,
        check_prediction,
    )
    from lightning_anatomy.callbacks import (
        ConceptAttribution,
        ConceptBlocking,
        ConceptDriftMonitor,
        ConceptProjection,
        ConceptSteering,
        RewardShaping,
        TokenFiltering,
    )
    from lightning_anatomy.concepts import ConceptLens, ConceptSet
    from lightning_anatomy.concepts.sae import load_sae
    from lightning_anatomy.console import quiet_lightning
    from lightning_anatomy.data import PreferenceDataError, PreferenceDataModule, read_preferences
    from lightning_anatomy.interventions import GradientProjection
    from lightning_anatomy.losses import preference_loss
    from lightning_anatomy.models.loading import load_model, load_tokenizer
    from lightning_anatomy.module import DPOModule
