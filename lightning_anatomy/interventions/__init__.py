"""Interventions on what a preference dataset teaches: gradient projection (`projection`), the
activation edits (`activation_edits`: the hook layer, ablation), steering, reward-shaping scores
and their explain-away λ, inoculation prompting, token-filter masks.

Names are imported lazily: the projection Functions need only torch, while the reward-shaping
scores pull in the concept lens (and sae-lens behind it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_anatomy._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "GradientProjection": "lightning_anatomy.interventions.projection",
    "GradientAmplification": "lightning_anatomy.interventions.projection",
    "project_out": "lightning_anatomy.interventions.activation_edits",
    "mean_ablate": "lightning_anatomy.interventions.activation_edits",
    "component_along": "lightning_anatomy.interventions.activation_edits",
    "register_activation_edit": "lightning_anatomy.interventions.activation_edits",
    "ablation_edit": "lightning_anatomy.interventions.activation_edits",
    "orthonormal_union": "lightning_anatomy.interventions.activation_edits",
    "steer": "lightning_anatomy.interventions.steering",
    "steering_edit": "lightning_anatomy.interventions.steering",
    "signed_vectors": "lightning_anatomy.interventions.steering",
    "compute_concept_scores": "lightning_anatomy.interventions.reward_shaping",
    "load_scores": "lightning_anatomy.interventions.reward_shaping",
    "save_scores": "lightning_anatomy.interventions.reward_shaping",
    "explain_away_lambda": "lightning_anatomy.interventions.explain_away",
    "ConfoundedConceptError": "lightning_anatomy.interventions.explain_away",
    "inoculate": "lightning_anatomy.interventions.inoculation",
    "Quantile": "lightning_anatomy.interventions.token_filter",
    "fit_threshold": "lightning_anatomy.interventions.token_filter",
    "pattern_token_mask": "lightning_anatomy.interventions.token_filter",
}

__all__ = [
    "ConfoundedConceptError",
    "GradientAmplification",
    "GradientProjection",
    "Quantile",
    "ablation_edit",
    "component_along",
    "compute_concept_scores",
    "explain_away_lambda",
    "fit_threshold",
    "inoculate",
    "load_scores",
    "mean_ablate",
    "orthonormal_union",
    "pattern_token_mask",
    "project_out",
    "register_activation_edit",
    "save_scores",
    "signed_vectors",
    "steer",
    "steering_edit",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.interventions.activation_edits import (
        ablation_edit,
        component_along,
        mean_ablate,
        orthonormal_union,
        project_out,
        register_activation_edit,
    )
    from lightning_anatomy.interventions.explain_away import ConfoundedConceptError, explain_away_lambda
    from lightning_anatomy.interventions.inoculation import inoculate
    from lightning_anatomy.interventions.projection import GradientAmplification, GradientProjection
    from lightning_anatomy.interventions.reward_shaping import (
        compute_concept_scores,
        load_scores,
        save_scores,
    )
    from lightning_anatomy.interventions.steering import signed_vectors, steer, steering_edit
    from lightning_anatomy.interventions.token_filter import Quantile, fit_threshold, pattern_token_mask
