"""Preference rows: reading any common source, detecting its layout, validating every row.

A DPO run that dies at step 4,000 on row 91,532 wastes a day, so every row is checked in one pass
before training and every problem is reported at once, with its row number and field. Three
layouts are understood (the ones TRL accepts):

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
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import numbers
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "explicit", "conversational", "implicit")
ON_BAD_ROWS = ("error", "skip")
ASSISTANT_MARKERS = ("\n\nAssistant:", "<|im_start|>assistant\n", "[/INST]", "<start_of_turn>model\n", "### Assistant:")
MAX_LISTED = 20
DUPLICATES_LISTED = 5

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


# ------------------------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class _Unreadable:
    """A record that could not be parsed (an invalid JSON line)."""

    reason: str


def _plain(value: Any) -> Any:
    """numpy/pandas/arrow cells as plain Python values, so validation sees str/list/dict/float."""
    if isinstance(value, str | bytes | bool | int | float) or value is None:
        return value
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _plain(value.tolist())
    return value


def _plain_record(record: Any) -> Any:
    if isinstance(record, _Unreadable):
        return record
    try:
        return _plain(record)
    except RecursionError:  # a parsed record nested almost to the limit, or an in-memory one
        return _Unreadable(f"the record is nested too deeply to read (over {sys.getrecursionlimit()} levels)")


def _columns_to_records(columns: Mapping[str, Any], origin: str) -> list[Any]:
    lengths = {k: len(v) for k, v in columns.items() if isinstance(v, list | tuple)}
    if len(lengths) != len(columns):
        bad = [k for k in columns if k not in lengths]
        raise ValueError(f"{origin}: a dict source must map column names to lists; column(s) {bad} are not lists")
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{origin}: columns have different lengths {lengths}; every column needs one value per row")
    n = next(iter(lengths.values()), 0)
    return [{k: columns[k][i] for k in columns} for i in range(n)]


def _looks_like_columns(data: Mapping[str, Any]) -> bool:
    """A dict of equal-purpose lists, not one conversational record (whose `chosen` lists messages)."""
    if not data or not all(isinstance(v, list) for v in data.values()):
        return False
    chosen = data.get("chosen")
    return not (chosen and isinstance(chosen[0], Mapping) and "role" in chosen[0])


def _parse_line(raw: bytes, line_no: int) -> Any:
    """One JSON Lines record, or `_Unreadable` naming the line: bad bytes or nesting never stop a read."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _Unreadable(f"invalid UTF-8 on line {line_no}: the line's byte {e.start + 1} is 0x{raw[e.start]:02x}; "
                           "save the file as UTF-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return _Unreadable(f"invalid JSON on line {line_no}: {e.msg} (column {e.colno})")
    except RecursionError:
        return _Unreadable(f"JSON on line {line_no} is nested too deeply to read (over {sys.getrecursionlimit()} levels)")


def _jsonl_records(raw_lines: Iterable[bytes]) -> tuple[list[Any], list[int]]:
    """The records of JSON Lines bytes and the 1-based line of each (split on b"\\n" only, as JSONL is)."""
    records: list[Any] = []
    lines: list[int] = []
    for line_no, raw in enumerate(raw_lines, start=1):
        if line_no == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark is not part of the record
        if not raw.strip():
            continue  # blank lines are not rows; row numbers count records
        records.append(_parse_line(raw, line_no))
        lines.append(line_no)
    return records, lines


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _decode_document(data: bytes, path: Path) -> Any:
    """A whole-file JSON document; its errors name the line, as JSON Lines errors do."""
    try:
        text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}: invalid UTF-8 on line {line} (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to read (over {sys.getrecursionlimit()} levels)") from None


def _file_records(path: Path, split: str | None) -> tuple[list[Any], list[int] | None]:
    """The records of a file and, for JSON Lines, the 1-based line of each record."""
    if not path.exists():
        raise FileNotFoundError(f"preference data not found: {path}")
    if path.is_dir():
        return _dataset_records(_load_from_disk(path), split, str(path)), None
    if split is not None:
        raise ValueError(f"split={split!r} only applies to a datasets DatasetDict, not to the file {path}")
    name = path.name.lower()
    kind = Path(name[:-3] if name.endswith(".gz") else name).suffix
    if kind in (".jsonl", ".ndjson"):
        with _open_binary(path) as f:
            return _jsonl_records(f)
    if kind == ".json":
        with _open_binary(path) as f:
            data = f.read()
        if data.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"["):
            return _decode_document(data, path), None
        try:
            doc = _decode_document(data, path)
        except ValueError:
            return _jsonl_records(data.split(b"\n"))  # JSON Lines under a .json name (datasets' to_json)
        if isinstance(doc, dict) and _looks_like_columns(doc):
            return _columns_to_records(doc, str(path)), None
        return [doc], None
    if kind in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist(), None
    raise ValueError(
        f"unsupported file type {''.join(path.suffixes) or '(none)'!r} for {path}: use .jsonl, .json, .parquet "
        "(optionally .gz for JSON), a datasets save_to_disk directory, or pass rows in memory"
    )


def _load_from_disk(path: Path):
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise ValueError(f"{path} is a directory but not a datasets save_to_disk directory ({e})") from None


def _dataset_records(ds: Any, split: str | None, origin: str) -> list[Any]:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        name = split if split is not None else "train"
        if name not in ds:
            raise ValueError(f"{origin} has splits {sorted(ds)}; pass split= with one of them (no {name!r} split)")
        ds = ds[name]
    elif split is not None:
        raise ValueError(f"split={split!r} only applies to a datasets DatasetDict; {origin} is a single Dataset")
    return ds.to_list() if hasattr(ds, "to_list") else list(ds)  # IterableDataset has no to_list


def _load_records(source: Any, split: str | None) -> tuple[list[Any], list[int] | None]:
    """The records of any source and, for JSON Lines, the 1-based line of each."""
    if isinstance(source, str | os.PathLike):
        return _file_records(Path(source), split)
    module = type(source).__module__ or ""
    if module.startswith("datasets"):
        return _dataset_records(source, split, type(source).__name__), None
    if split is not None:
        raise ValueError(f"split={split!r} only applies to a datasets DatasetDict or a save_to_disk directory")
    if module.startswith("pandas"):
        return source.to_dict(orient="records"), None
    if isinstance(source, Mapping):
        return _columns_to_records(source, "in-memory dict"), None
    if isinstance(source, Iterable) and not isinstance(source, str | bytes):
        return list(source), None
    raise TypeError(
        f"cannot read preference data from a {type(source).__name__}: pass a path (.jsonl/.json/.parquet/"
        "save_to_disk directory), a datasets.Dataset/DatasetDict, a pandas DataFrame, a list of dicts or a dict of columns"
    )


# ------------------------------------------------------------------------------------------ fields
def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(rec: Mapping, name: str, problems: list[tuple[str, str]], *, response: bool) -> str | None:
    value = rec.get(name)
    if _missing(value):
        problems.append((name, "missing field"))
    elif not isinstance(value, str):
        problems.append((name, f"expected a string, found {type(value).__name__}"))
    elif response and not value.strip():
        problems.append((name, "empty response (blank or whitespace only)"))
    else:
        return value
    return None


def _messages(rec: Mapping, name: str, problems: list[tuple[str, str]]) -> list[dict] | None:
    value = rec.get(name)
    if _missing(value):
        problems.append((name, "missing field"))
        return None
    if not isinstance(value, list | tuple):
        problems.append((name, f"expected a list of {{role, content}} messages, found {type(value).__name__}"))
        return None
    if not value:
        problems.append((name, "empty message list"))
        return None
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            found = type(m).__name__ if not isinstance(m, Mapping) else "keys " + ", ".join(map(str, m))
            problems.append((name, f"message {i} must be a mapping with string 'role' and 'content' (found {found})"))
            return None
    return [dict(m) for m in value]


def _weight(rec: Mapping, problems: list[tuple[str, str]]) -> float:
    value = rec.get("weight")
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        problems.append(("weight", f"expected a number, found {type(value).__name__}"))
    elif not math.isfinite(value) or value < 0:
        problems.append(("weight", f"must be a finite number >= 0, found {value!r}"))
    else:
        return float(value)
    return 1.0


def _all_blank(messages: list[dict]) -> bool:
    return all(not m["content"].strip() for m in messages)


# ------------------------------------------------------------------------------------------ layouts
def _explicit(rec: Mapping, row_id: int, problems: list[tuple[str, str]], **_: Any) -> PreferenceRow | None:
    prompt = _text(rec, "prompt", problems, response=False)
    chosen = _text(rec, "chosen", problems, response=True)
    rejected = _text(rec, "rejected", problems, response=True)
    weight = _weight(rec, problems)
    if chosen is not None and chosen == rejected:
        problems.append(("rejected", "identical to chosen: a pair must differ to carry a preference"))
    if problems:
        return None
    return PreferenceRow(prompt, chosen, rejected, row_id, weight)


def split_implicit_prompt(chosen: str, rejected: str, markers: Sequence[str] = ASSISTANT_MARKERS) -> tuple[str, str, str] | None:
    """(prompt, chosen completion, rejected completion), or None when no marker ends a shared prefix.

    The prompt is the shared prefix up to and including the last assistant-turn marker that lies
    wholly inside it, so replies that happen to start alike still keep their common first words.
    """
    common = os.path.commonprefix([chosen, rejected])
    end = max((common.rfind(m) + len(m) for m in markers if m and common.rfind(m) >= 0), default=-1)
    if end < 0:
        return None
    return chosen[:end], chosen[end:], rejected[end:]


def _implicit(rec: Mapping, row_id: int, problems: list[tuple[str, str]], *, markers: Sequence[str], **_: Any) -> PreferenceRow | None:
    chosen = _text(rec, "chosen", problems, response=True)
    rejected = _text(rec, "rejected", problems, response=True)
    weight = _weight(rec, problems)
    if chosen is None or rejected is None or problems:
        return None
    if chosen == rejected:
        problems.append(("rejected", "identical to chosen: a pair must differ to carry a preference"))
        return None
    parts = split_implicit_prompt(chosen, rejected, markers)
    if parts is None:
        problems.append(("prompt", f"chosen and rejected share no prefix ending in an assistant-turn marker (tried "
                                   f"{', '.join(map(repr, markers))}); pass assistant_marker= or give a 'prompt' field"))
        return None
    # A blank reply after the marker is a bad row, as in the other layouts (HH-RLHF's harmless test
    # split has one): it would teach "say nothing", and a filtered copy written in the explicit
    # layout (`audit.write_rows`) must read back the same rows.
    prompt, chosen_reply, rejected_reply = parts
    for name, reply in (("chosen", chosen_reply), ("rejected", rejected_reply)):
        if not reply.strip():
            problems.append((name, "empty response after the last assistant-turn marker (blank or whitespace only)"))
    if problems:
        return None
    return PreferenceRow(prompt, chosen_reply, rejected_reply, row_id, weight)


def _render(tokenizer: Any, messages: list[dict], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _conversational(rec: Mapping, row_id: int, problems: list[tuple[str, str]], *, tokenizer: Any, **_: Any) -> PreferenceRow | None:
    has_prompt = not _missing(rec.get("prompt"))
    prompt = _messages(rec, "prompt", problems) if has_prompt else None
    chosen = _messages(rec, "chosen", problems)
    rejected = _messages(rec, "rejected", problems)
    weight = _weight(rec, problems)
    if chosen is None or rejected is None or problems or (has_prompt and prompt is None):
        return None
    if chosen == rejected:
        problems.append(("rejected", "identical to chosen: a pair must differ to carry a preference"))
        return None
    if prompt is None:  # implicit prompt: the leading messages both conversations share
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        if k == 0:
            problems.append(("prompt", "chosen and rejected share no leading messages, so there is no prompt; "
                                       "add a 'prompt' message list"))
            return None
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply or _all_blank(reply):
            problems.append((name, "empty response (no message or blank content after the prompt)"))
    if problems:
        return None
    try:
        prompt_text = _render(tokenizer, prompt, generation_prompt=True)
    except Exception as e:  # chat templates raise on conversations they do not accept
        problems.append(("prompt", f"the chat template rejected the prompt messages: {e}"))
        return None
    replies = {}
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        try:
            full = _render(tokenizer, prompt + reply, generation_prompt=False)
        except Exception as e:
            problems.append((name, f"the chat template rejected prompt + {name}: {e}"))
            continue
        if not full.startswith(prompt_text):
            problems.append((name, f"the rendered prompt (add_generation_prompt=True) is not a prefix of the rendered "
                                   f"prompt + {name}, so the response cannot be cut out; {name} should hold assistant turns"))
            continue
        replies[name] = full[len(prompt_text):]
    if problems:
        return None
    messages = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return PreferenceRow(prompt_text, replies["chosen"], replies["rejected"], row_id, weight, messages)


_LAYOUT_PARSERS = {"explicit": _explicit, "implicit": _implicit, "conversational": _conversational}


def detect_layout(records: Sequence[Any]) -> str:
    """The layout of the first row that has a usable `chosen` (a prompt column anywhere means explicit)."""
    has_prompt = any(isinstance(r, Mapping) and not _missing(r.get("prompt")) for r in records)
    for r in records:
        if not isinstance(r, Mapping):
            continue
        chosen, prompt = r.get("chosen"), r.get("prompt")
        if isinstance(chosen, list | tuple) or isinstance(prompt, list | tuple):
            return "conversational"
        if isinstance(chosen, str):
            return "explicit" if has_prompt else "implicit"
    return "explicit" if has_prompt else "implicit"


def _check_chat_tokenizer(tokenizer: Any) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        what = "no tokenizer was given" if tokenizer is None else f"{type(tokenizer).__name__} has no chat_template"
        raise ValueError(
            f"conversational rows (lists of {{role, content}} messages) are rendered with a chat template, but {what}: "
            "pass tokenizer= a tokenizer with a chat template (e.g. the policy's AutoTokenizer)"
        )


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

    records, lines = _load_records(source, split)
    records = [_plain_record(r) for r in records]
    chosen_layout = detect_layout(records) if layout == "auto" else layout
    if chosen_layout == "conversational":
        _check_chat_tokenizer(tokenizer)
    parse = _LAYOUT_PARSERS[chosen_layout]

    good: list[PreferenceRow] = []
    bad: list[BadRow] = []
    for row_id, rec in enumerate(records):
        problems: list[tuple[str, str]] = []
        if isinstance(rec, _Unreadable):
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
