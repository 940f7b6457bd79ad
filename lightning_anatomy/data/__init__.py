"""Preference data: rows (reading, layouts, validation), tokens and batches, the DataModule.

Names are imported lazily (`lightning_anatomy._lazy`): the audit reads and tokenizes rows without
a Trainer, and the data-source registry is imported by the package facade before torch is needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_anatomy._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "PreferenceDataError": "lightning_anatomy.data.bad_rows",
    "PreferenceRow": "lightning_anatomy.data.preference_row",
    "PreferenceRows": "lightning_anatomy.data.preference_row",
    "read_preferences": "lightning_anatomy.data.rows",
    "TokenizedPair": "lightning_anatomy.data.tokenize",
    "collate_pairs": "lightning_anatomy.data.tokenize",
    "tokenize_rows": "lightning_anatomy.data.tokenize",
    "PreferenceDataModule": "lightning_anatomy.data.datamodule",
}

__all__ = [
    "PreferenceDataError",
    "PreferenceDataModule",
    "PreferenceRow",
    "PreferenceRows",
    "TokenizedPair",
    "collate_pairs",
    "read_preferences",
    "tokenize_rows",
]  # literal so linters see the re-exports

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.data.bad_rows import PreferenceDataError
    from lightning_anatomy.data.datamodule import PreferenceDataModule
    from lightning_anatomy.data.preference_row import PreferenceRow, PreferenceRows
    from lightning_anatomy.data.rows import read_preferences
    from lightning_anatomy.data.tokenize import TokenizedPair, collate_pairs, tokenize_rows
