"""Deprecated module path: the activation-edit layer lives in `interventions.activation_edits`.

Kept importable for one release; importing it warns. Import `register_activation_edit`,
`ablation_edit`, `orthonormal_union` and `training_only_edit` from
`lightning_anatomy.interventions.activation_edits` (or `lightning_anatomy.interventions`).
"""

from __future__ import annotations

import warnings

from lightning_anatomy.interventions.activation_edits import (
    ActivationEdit,
    ablation_edit,
    orthonormal_union,
    project_out,
    register_activation_edit,
    training_only_edit,
)

warnings.warn(
    "lightning_anatomy.interventions.ablation is deprecated and will be removed in the next release; import "
    "register_activation_edit, ablation_edit and orthonormal_union from lightning_anatomy.interventions."
    "activation_edits (or lightning_anatomy.interventions)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "ActivationEdit",
    "ablation_edit",
    "orthonormal_union",
    "project_out",
    "register_activation_edit",
    "training_only_edit",
]
