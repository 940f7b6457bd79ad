"""Preference rows: reading any common source, detecting its layout, validating every row.

A DPO run that dies at step 4,000 on row 91,532 wastes a day, so every row is checked in one pass
before training and every problem is reported at once, with its row number and field. Three
layouts are understood (the ones TRL accepts; parsed in `layouts`):

- explicit: `prompt`, `chosen`, `rejected` strings;
- conversational: lists of `{role, content}` messages, either a `prompt` list plus assistant
  `chosen`/`rejected` lists, or whole conversations in `chosen`/`rejected` sharing their prompt
  turns; rendered with the tokenizer's chat template;
- implicit: `chosen`/`rejected` whole transcripts sharing a prefix (HH-RLHF); the prompt is the
  shared prefix up to and including its last assistant-turn marker.

Rows and lines are different numbers: a row is a record, counted from 0 in file order (its
`row_id`); a line is a line of a JSON Lines file, counted from 1 as editors do (blank lines are
not rows). Messages say "row 3 (line 5)" where both are known. A line that is not UTF-8 or not
parseable JSON is a bad row like any other, so one bad byte never hides the rest of the file.
Duplicate pairs are kept but reported: they weigh a pair twice and, split across train and
validation, leak training pairs into the validation loss.

This module reads and validates (`read_preferences`); the pieces live beside it: the row types in
`preference_row`, reading raw records in `records`, the layouts in `layouts`, the bad-row and
duplicate reports (and `PreferenceDataError`) in `bad_rows`. Their public names are re-exported
here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_anatomy.data.bad_rows import (
    DUPLICATES_LISTED,
    MAX_LISTED,
    ON_BAD_ROWS,
    PreferenceDataError,
    check_on_bad_rows,
    find_duplicates,
    format_bad_rows,
    handle_bad_rows,
    row_label,
)
from lightning_anatomy.data.layouts import (
    ASSISTANT_MARKERS,
    LAYOUT_PARSERS,
    LAYOUTS,
    check_chat_tokenizer,
    detect_layout,
    split_implicit_prompt,
)
from lightning_anatomy.data.preference_row import BadRow, PreferenceRow, PreferenceRows
from lightning_anatomy.data.records import Unreadable, load_records, plain_record


def _passthrough(rows: Sequence[PreferenceRow]) -> PreferenceRows:
    seen: dict[int, int] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, PreferenceRow):
            raise TypeError(f"item {i} is a {type(row).__name__}; a list of PreferenceRow must hold only PreferenceRow")
        if row.row_id in seen:
            raise ValueError(f"row_id {row.row_id} appears at positions {seen[row.row_id]} and {i}; row ids must be unique")
        seen[row.row_id] = i
    return PreferenceRows(rows, layout="rows", duplicates=find_duplicates(rows))


def read_preferences(
    source: Any,
    *,
    on_bad_rows: str = "error",
    tokenizer: Any = None,
    layout: str = "auto",
    split: str | None = None,
    assistant_marker: str | Sequence[str] | None = None,
) -> PreferenceRows:
    """Read and validate every row of `source`; see the module docstring for layouts.

    Row numbers count records from 0 in file order (blank JSONL lines are not records); messages
    about a JSON Lines file also give each row's 1-based line. With `on_bad_rows="error"` any
    bad row (invalid UTF-8 or JSON included) raises one `PreferenceDataError` listing them all;
    with `"skip"` bad rows are dropped, listed in `.dropped` and summarised in one logged warning.
    Duplicate pairs are kept, listed in `.duplicates` and summarised in a warning.
    """
    check_on_bad_rows(on_bad_rows)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    if isinstance(source, list | tuple) and source and isinstance(source[0], PreferenceRow):
        return _passthrough(source)
    markers = (assistant_marker,) if isinstance(assistant_marker, str) else tuple(assistant_marker or ASSISTANT_MARKERS)
    if not markers or not all(isinstance(m, str) and m for m in markers):
        raise ValueError(f"assistant_marker must be a non-empty string or a list of them, got {assistant_marker!r}")

    records, lines = load_records(source, split)
    records = [plain_record(r) for r in records]
    chosen_layout = detect_layout(records) if layout == "auto" else layout
    if chosen_layout == "conversational":
        check_chat_tokenizer(tokenizer)
    parse = LAYOUT_PARSERS[chosen_layout]

    good: list[PreferenceRow] = []
    bad: list[BadRow] = []
    for row_id, rec in enumerate(records):
        problems: list[tuple[str, str]] = []
        if isinstance(rec, Unreadable):
            problems.append(("<json>", rec.reason))
        elif not isinstance(rec, Mapping):
            problems.append(("<row>", f"expected an object with preference fields, found {type(rec).__name__}"))
        else:
            row = parse(rec, row_id, problems, tokenizer=tokenizer, markers=markers)
            if row is not None:
                good.append(row)
        bad += [(row_id, f, reason) for f, reason in problems]
    handle_bad_rows(
        bad, on_bad_rows=on_bad_rows, total=len(records), kept=len(good), what=f"in the preference data ({chosen_layout} layout)",
        fix='Fix these rows, or pass on_bad_rows="skip" to drop them (they are then listed in `.dropped`).', lines=lines,
    )
    return PreferenceRows(good, dropped=bad, layout=chosen_layout, duplicates=find_duplicates(good, lines))


__all__ = [
    "ASSISTANT_MARKERS",
    "DUPLICATES_LISTED",
    "LAYOUTS",
    "MAX_LISTED",
    "ON_BAD_ROWS",
    "BadRow",
    "PreferenceDataError",
    "PreferenceRow",
    "PreferenceRows",
    "check_on_bad_rows",
    "detect_layout",
    "find_duplicates",
    "format_bad_rows",
    "handle_bad_rows",
    "read_preferences",
    "row_label",
    "split_implicit_prompt",
]
