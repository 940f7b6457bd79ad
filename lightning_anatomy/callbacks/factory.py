"""Build Lightning callbacks from plain config dicts (the `callbacks:` list of a fit config).

Each entry is `{"class": <name>, **kwargs}`. String values of `concepts` are ConceptSet
directories; `saes` maps hook names to SAE specs (a directory or `release/sae_id`), which the
callbacks attach to the policy they find in the LightningModule.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning.pytorch import Callback

CALLBACKS = {
    "ConceptProjection": "lightning_anatomy.callbacks",
    "ConceptAttribution": "lightning_anatomy.callbacks",
    "ConceptBlocking": "lightning_anatomy.callbacks",
    "ConceptDriftMonitor": "lightning_anatomy.callbacks",
    "RewardShaping": "lightning_anatomy.callbacks",
    "ConceptSteering": "lightning_anatomy.callbacks",
    "ModelCheckpoint": "lightning.pytorch.callbacks",
    "LearningRateMonitor": "lightning.pytorch.callbacks",
    "EarlyStopping": "lightning.pytorch.callbacks",
}


def build_callbacks(entries: list[dict[str, Any]] | None) -> list[Callback]:
    callbacks = []
    for i, entry in enumerate(entries or []):
        entry = dict(entry)
        name = entry.pop("class", None)
        if name not in CALLBACKS:
            raise ValueError(f"callbacks[{i}].class={name!r} is not one of {sorted(CALLBACKS)}")
        if isinstance(entry.get("concepts"), str):
            from lightning_anatomy.concepts import ConceptSet

            entry["concepts"] = ConceptSet.load(entry["concepts"])
        if name == "ConceptDriftMonitor" and "saes" in entry:
            entry["lens_or_saes"] = entry.pop("saes")
        cls = getattr(importlib.import_module(CALLBACKS[name]), name)
        try:
            callbacks.append(cls(**entry))
        except TypeError as err:
            raise ValueError(f"callbacks[{i}] ({name}): {err}") from err
    return callbacks
