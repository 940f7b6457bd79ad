"""Interventions on what a preference dataset teaches: gradient projection, ablation, steering,
reward-shaping scores.

Names are imported lazily: the projection Functions need only torch, while the reward-shaping
scores pull in the concept lens (and sae-lens behind it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_anatomy._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "GradientProjection": "lightning_anatomy.interventions.projection",
    "GradientAmplification": "lightning_anatomy.interventions.projection",
    "project_out": "lightning_anatomy.interventions.projection",
    "mean_ablate": "lightning_anatomy.interventions.projection",
    "component_along": "lightning_anatomy.interventions.projection",
    "register_activation_edit": "lightning_anatomy.interventions.ablation",
    "ablation_edit": "lightning_anatomy.interventions.ablation",
    "orthonormal_union": "lightning_anatomy.interventions.ablation",
    "steer": "lightning_anatomy.interventions.steering",
    "steering_edit": "lightning_anatomy.interventions.steering",
    "signed_vectors": "lightning_anatomy.interventions.steering",
    "compute_concept_scores": "lightning_anatomy.interventions.reward_shaping",
    "load_scores": "lightning_anatomy.interventions.reward_shaping",
    "save_scores": "lightning_anatomy.interventions.reward_shaping",
}

__all__ = [
    "GradientAmplification",
    "GradientProjection",
    "ablation_edit",
    "component_along",
    "compute_concept_scores",
    "load_scores",
    "mean_ablate",
    "orthonormal_union",
    "project_out",
    "register_activation_edit",
    "save_scores",
    "signed_vectors",
    "steer",
    "steering_edit",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.interventions.ablation import (
        ablation_edit,
        orthonormal_union,
        register_activation_edit,
    )
    from lightning_anatomy.interventions.projection import (
        GradientAmplification,
        GradientProjection,
        component_along,
        mean_ablate,
        project_out,
    )
    from lightning_anatomy.interventions.reward_shaping import (
        compute_concept_scores,
        load_scores,
        save_scores,
    )
    from lightning_anatomy.interventions.steering import signed_vectors, steer, steering_edit
