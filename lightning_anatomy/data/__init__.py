"""Preference data: rows (reading, layouts, validation), tokens and batches, the DataModule.

`PreferenceDataModule` is imported lazily: the audit reads and tokenizes rows without a
Trainer, and importing Lightning would only slow it down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_anatomy.data.rows import PreferenceDataError, PreferenceRow, PreferenceRows, read_preferences
from lightning_anatomy.data.tokenize import TokenizedPair, collate_pairs, tokenize_rows

__all__ = [
    "PreferenceDataError",
    "PreferenceDataModule",
    "PreferenceRow",
    "PreferenceRows",
    "TokenizedPair",
    "collate_pairs",
    "read_preferences",
    "tokenize_rows",
]


def __getattr__(name: str) -> Any:
    if name == "PreferenceDataModule":
        from lightning_anatomy.data.datamodule import PreferenceDataModule

        return PreferenceDataModule
    raise AttributeError(f"module 'lightning_anatomy.data' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.data.datamodule import PreferenceDataModule
