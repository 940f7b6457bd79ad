"""Reading the raw records of any preference-data source: JSON Lines (optionally gzipped; each
record with its 1-based line), a JSON document, Parquet, a `datasets` save_to_disk directory, a
`datasets.Dataset`/`DatasetDict`, a pandas DataFrame, a list of dicts or a dict of columns.

A line that is not UTF-8 or not parseable JSON becomes an `Unreadable` record (a bad row for the
validation in `rows`), so one bad byte never hides the rest of the file. Cells come back as plain
Python values (`plain_record`), so validation sees str/list/dict/float.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Unreadable:
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


def plain_record(record: Any) -> Any:
    if isinstance(record, Unreadable):
        return record
    try:
        return _plain(record)
    except RecursionError:  # a parsed record nested almost to the limit, or an in-memory one
        return Unreadable(f"the record is nested too deeply to read (over {sys.getrecursionlimit()} levels)")


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
    """One JSON Lines record, or `Unreadable` naming the line: bad bytes or nesting never stop a read."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Unreadable(f"invalid UTF-8 on line {line_no}: the line's byte {e.start + 1} is 0x{raw[e.start]:02x}; "
                           "save the file as UTF-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return Unreadable(f"invalid JSON on line {line_no}: {e.msg} (column {e.colno})")
    except RecursionError:
        return Unreadable(f"JSON on line {line_no} is nested too deeply to read (over {sys.getrecursionlimit()} levels)")


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


def load_records(source: Any, split: str | None) -> tuple[list[Any], list[int] | None]:
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


__all__ = ["Unreadable", "load_records", "plain_record"]
