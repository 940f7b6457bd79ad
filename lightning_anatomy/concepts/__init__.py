"""Concepts: hook points, SAE loading, the ConceptLens, concept sets and their labels.

Names are imported lazily: sae-lens takes seconds to import, and callbacks that only need
`reference_pass` or `resolve_hook` should not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_anatomy._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "ConceptLens": "lightning_anatomy.concepts.lens",
    "span_stats": "lightning_anatomy.concepts.lens",
    "capture_activations": "lightning_anatomy.concepts.lens",
    "ConceptSet": "lightning_anatomy.concepts.concept_set",
    "Concept": "lightning_anatomy.concepts.concept",
    "ConceptSetError": "lightning_anatomy.concepts.concept_set",
    "HookPoint": "lightning_anatomy.model_access",
    "resolve_hook": "lightning_anatomy.model_access",
    "hook_names": "lightning_anatomy.model_access",
    "hook_output": "lightning_anatomy.model_access",
    "hook_input": "lightning_anatomy.model_access",
    "hidden_size_at": "lightning_anatomy.model_access",
    "find_causal_lm": "lightning_anatomy.model_access",
    "reference_pass": "lightning_anatomy.model_access",
    "is_reference_pass": "lightning_anatomy.model_access",
    "measurement_pass": "lightning_anatomy.model_access",
    "is_measurement_pass": "lightning_anatomy.model_access",
    "edits_suspended": "lightning_anatomy.model_access",
    "load_sae": "lightning_anatomy.concepts.sae",
    "check_width": "lightning_anatomy.concepts.sae",
    "measure_fidelity": "lightning_anatomy.concepts.sae",
    "SAELoadError": "lightning_anatomy.concepts.sae",
    "SpanFeatures": "lightning_anatomy.concepts.span_features",
    "Context": "lightning_anatomy.concepts.labels",
    "Labeller": "lightning_anatomy.concepts.labels",
    "HeuristicLabeller": "lightning_anatomy.concepts.labels",
    "top_activating_contexts": "lightning_anatomy.concepts.labels",
    "feature_contexts": "lightning_anatomy.concepts.labels",
    "logit_lens_tokens": "lightning_anatomy.concepts.labels",
    "label_features": "lightning_anatomy.concepts.labels",
}

__all__ = [
    "Concept",
    "ConceptLens",
    "ConceptSet",
    "ConceptSetError",
    "Context",
    "HeuristicLabeller",
    "HookPoint",
    "Labeller",
    "SAELoadError",
    "SpanFeatures",
    "capture_activations",
    "check_width",
    "find_causal_lm",
    "hidden_size_at",
    "hook_input",
    "hook_names",
    "hook_output",
    "is_measurement_pass",
    "is_reference_pass",
    "edits_suspended",
    "label_features",
    "load_sae",
    "logit_lens_tokens",
    "measure_fidelity",
    "measurement_pass",
    "reference_pass",
    "resolve_hook",
    "span_stats",
    "top_activating_contexts",
    "feature_contexts",
]  # literal so linters see the re-exports


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.concepts.concept import Concept
    from lightning_anatomy.concepts.concept_set import ConceptSet, ConceptSetError
    from lightning_anatomy.concepts.labels import (
        Context,
        HeuristicLabeller,
        Labeller,
        feature_contexts,
        label_features,
        logit_lens_tokens,
        top_activating_contexts,
    )
    from lightning_anatomy.concepts.lens import ConceptLens, capture_activations, span_stats
    from lightning_anatomy.concepts.sae import SAELoadError, check_width, load_sae, measure_fidelity
    from lightning_anatomy.concepts.span_features import SpanFeatures
    from lightning_anatomy.model_access import (
        HookPoint,
        edits_suspended,
        find_causal_lm,
        hidden_size_at,
        hook_input,
        hook_names,
        hook_output,
        is_measurement_pass,
        is_reference_pass,
        measurement_pass,
        reference_pass,
        resolve_hook,
    )
