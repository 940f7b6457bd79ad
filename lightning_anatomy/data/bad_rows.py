"""Reporting bad and duplicate rows: `PreferenceDataError` (every bad row of a source at once),
the one message format that names rows ("row 3 (line 5)"), the error-or-skip policy
(`on_bad_rows`) and the duplicate-pair report. Shared by reading (`rows`) and tokenizing
(`tokenize`), so a bad row reads the same wherever it is found.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from lightning_anatomy.data.preference_row import BadRow, PreferenceRow

# the logger of `data.rows`, where these reports were first written: filters set on it keep working
log = logging.getLogger("lightning_anatomy.data.rows")

ON_BAD_ROWS = ("error", "skip")
MAX_LISTED = 20
DUPLICATES_LISTED = 5


class PreferenceDataError(ValueError):
    """Every bad row of a source at once; `.bad_rows` holds `(row_number, field, reason)`."""

    def __init__(self, message: str, bad_rows: Sequence[BadRow] = ()):
        super().__init__(message)
        self.bad_rows: list[BadRow] = list(bad_rows)

    def __reduce__(self):  # keep both fields across processes (DDP spawn, dataloader workers)
        return (type(self), (str(self), self.bad_rows))


def check_on_bad_rows(on_bad_rows: str) -> None:
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"on_bad_rows must be one of {', '.join(map(repr, ON_BAD_ROWS))}, got {on_bad_rows!r}")


def row_label(row: int, lines: Sequence[int] | None = None) -> str:
    """How every message names a row: "row 3 (line 5)" where the source has lines, else "row 3"."""
    return f"row {row} (line {lines[row]})" if lines is not None and 0 <= row < len(lines) else f"row {row}"


def format_bad_rows(bad_rows: Sequence[BadRow], *, what: str, fix: str, lines: Sequence[int] | None = None) -> str:
    """The message listing bad rows; `lines[row]` is the 1-based file line of each row, when known."""
    rows = len({r for r, _, _ in bad_rows})
    counting = "rows count records from 0" + (", lines count file lines from 1" if lines is not None else "")
    out = [f"{len(bad_rows)} problem(s) in {rows} row(s) {what} ({counting}; row, field: reason):"]
    out += [f"  {row_label(r, lines)}, {f}: {reason}" for r, f, reason in bad_rows[:MAX_LISTED]]
    if len(bad_rows) > MAX_LISTED:
        out.append(f"  ... and {len(bad_rows) - MAX_LISTED} more")
    out.append(fix)
    return "\n".join(out)


def handle_bad_rows(bad_rows: Sequence[BadRow], *, on_bad_rows: str, total: int, kept: int, what: str, fix: str,
                    lines: Sequence[int] | None = None) -> None:
    """Raise (error mode), or log one summary (skip mode); zero kept rows always raises."""
    if not bad_rows and kept:
        return
    if on_bad_rows == "error" and bad_rows:
        raise PreferenceDataError(format_bad_rows(bad_rows, what=what, fix=fix, lines=lines), bad_rows)
    if kept == 0:
        if not bad_rows:
            raise PreferenceDataError(f"no rows {what}: the source is empty")
        message = format_bad_rows(bad_rows, what=what, fix="Every row is bad, so nothing is left to train on.",
                                  lines=lines)
        raise PreferenceDataError(f"no usable rows out of {total}; " + message, bad_rows)
    counts = Counter(f"{f}: {reason}" for _, f, reason in bad_rows)
    summary = "; ".join(f"{n} x {key}" for key, n in counts.most_common())
    rows = list(dict.fromkeys(r for r, _, _ in bad_rows))
    where = ", ".join(row_label(r, lines) for r in rows[:MAX_LISTED])
    more = ", ..." if len(rows) > MAX_LISTED else ""
    log.warning("skipped %d of %d rows %s (listed in .dropped): %s [%s%s]", total - kept, total, what, summary,
                where, more)


def find_duplicates(rows: Sequence[PreferenceRow], lines: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """`(row, row it repeats)` for each row whose prompt, chosen and rejected an earlier row has; warns once."""
    first: dict[tuple[str, str, str], int] = {}
    duplicates: list[tuple[int, int]] = []
    for row in rows:
        earlier = first.setdefault((row.prompt, row.chosen, row.rejected), row.row_id)
        if earlier != row.row_id:
            duplicates.append((row.row_id, earlier))
    if duplicates:
        shown = ", ".join(f"{row_label(r, lines)} repeats {row_label(e, lines)}" for r, e in duplicates[:DUPLICATES_LISTED])
        more = ", ..." if len(duplicates) > DUPLICATES_LISTED else ""
        log.warning("%d duplicate pair(s) (same prompt, chosen and rejected as an earlier row; kept, listed in "
                    ".duplicates; the DataModule keeps copies on one side of the train/val split): %s%s",
                    len(duplicates), shown, more)
    return duplicates


__all__ = [
    "DUPLICATES_LISTED",
    "MAX_LISTED",
    "ON_BAD_ROWS",
    "PreferenceDataError",
    "check_on_bad_rows",
    "find_duplicates",
    "format_bad_rows",
    "handle_bad_rows",
    "row_label",
]
