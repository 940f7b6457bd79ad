"""The row types of preference data: `PreferenceRow` (one pair), `PreferenceRows` (the good rows
of a source with what was dropped, its layout and its duplicates) and `BadRow`, one problem of a
row. `rows.read_preferences` builds them; `tokenize` and the DataModule read them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

BadRow = tuple[int, str, str]  # (row number, field, reason); row numbers are 0-based records


@dataclass(frozen=True)
class PreferenceRow:
    """One preference pair; `prompt + chosen` is the full chosen sequence.

    `reference_prompt` is the prompt the reference model scores the completions after (None: the
    prompt). Inoculation prompting (`interventions.inoculate`) sets it to the original prompt
    while `prompt` carries the inoculating instruction, so only the policy sees the instruction.
    """

    prompt: str
    chosen: str
    rejected: str
    row_id: int
    weight: float = 1.0
    messages: dict | None = field(default=None, hash=False)
    reference_prompt: str | None = None


class PreferenceRows(list):
    """The good rows of a source, plus `.dropped` (problems of the rows skipped), `.layout` and
    `.duplicates`: `(row, row it repeats)` for every good row with the same prompt, chosen and
    rejected as an earlier one (kept, not an error)."""

    def __init__(self, rows: Iterable[PreferenceRow] = (), dropped: Iterable[BadRow] = (), layout: str | None = None,
                 duplicates: Iterable[tuple[int, int]] = ()):
        super().__init__(rows)
        self.dropped: list[BadRow] = list(dropped)
        self.layout = layout
        self.duplicates: list[tuple[int, int]] = list(duplicates)


__all__ = ["BadRow", "PreferenceRow", "PreferenceRows"]
