"""Deprecated module path: `RewardShaping` and `ConceptSteering` have a file each now.

Kept importable for one release; importing it warns. Import them from `lightning_anatomy`
(or `lightning_anatomy.callbacks.reward_shaping` / `lightning_anatomy.callbacks.steering`).
"""

from __future__ import annotations

import warnings

from lightning_anatomy.callbacks.reward_shaping import RewardShaping
from lightning_anatomy.callbacks.steering import ConceptSteering

warnings.warn(
    "lightning_anatomy.callbacks.shaping is deprecated and will be removed in the next release; import "
    "RewardShaping and ConceptSteering from lightning_anatomy (or lightning_anatomy.callbacks.reward_shaping / "
    "lightning_anatomy.callbacks.steering)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["ConceptSteering", "RewardShaping"]
