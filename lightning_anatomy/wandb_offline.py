"""Read offline W&B runs (`run-<id>.wandb`) back into Python.

Tests, the demo and the benchmarks check what was logged without a W&B server, and wandb ships no
public reader for offline files. The format is internal to wandb (pinned by tests/test_wandb_offline.py):

* a 7-byte file header: `:W&B`, uint16 0xBEE1, uint8 version (0);
* then 32 KiB blocks of LevelDB-log chunks, each with a 7-byte header: uint32 CRC32, uint16 length,
  uint8 type (1 full, 2 first, 3 middle, 4 last); a block tail shorter than a header is padding;
* the CRC is zlib's CRC32 of the type byte followed by the payload (as wandb's writer computes it);
* each reassembled payload is a `wandb.proto.wandb_internal_pb2.Record`.

History and summary values arrive flattened (`nested_key` parts); they are joined with "/", and a
flattened object that carries `_type` (tables, histograms, images) is regrouped into the dict that
was logged, so `row["tab"]["_type"] == "table-file"`.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
IDENT, MAGIC, VERSION = b":W&B", 0xBEE1, 0
BLOCK_SIZE = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
INTERNAL_KEYS = frozenset({"_step", "_runtime", "_timestamp"})


class WandbFileError(ValueError):
    """An offline `.wandb` file that cannot be read: wrong header, bad checksum, truncation."""


@dataclass
class OfflineRun:
    """One offline run as logged: history rows, final summary and config."""

    path: Path
    run_id: str | None = None
    project: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None  # set once the run's exit record is read (the run finished)

    @property
    def finished(self) -> bool:
        return self.exit_code is not None

    @property
    def files_dir(self) -> Path:
        """The run's `files/` folder (media such as table JSON files live under it)."""
        return self.path.parent / "files"

    def keys(self) -> list[str]:
        """Every logged history key, sorted, without wandb's own `_step`/`_runtime`/`_timestamp`."""
        return sorted({k for row in self.history for k in row} - INTERNAL_KEYS)

    def series(self, key: str, step_key: str = "_step") -> list[tuple[Any, Any]]:
        """`[(step, value)]` over the history rows that hold `key` (Lightning's WandbLogger steps
        live under `step_key="trainer/global_step"`)."""
        rows = [row for row in self.history if key in row]
        if not rows and self.history:
            raise KeyError(f"history has no key {key!r}; logged keys: {self.keys()}")
        missing = [i for i, row in enumerate(rows) if step_key not in row]
        if missing:
            raise KeyError(
                f"{len(missing)} history rows with {key!r} have no step key {step_key!r}; "
                f"pass one of {sorted(rows[missing[0]])} as step_key"
            )
        return [(row[step_key], row[key]) for row in rows]

    def table(self, value: dict[str, Any]) -> dict[str, Any]:
        """Load a logged table (a history/summary value with `_type == "table-file"`) from `files/`."""
        if not isinstance(value, dict) or value.get("_type") != "table-file" or "path" not in value:
            raise ValueError(f"not a logged table value (need a dict with _type 'table-file' and 'path'): {value!r}")
        return json.loads((self.files_dir / value["path"]).read_text())


def find_offline_runs(root: str | Path = "wandb") -> list[Path]:
    """Run folders (`offline-run-<time>-<id>`) under `root`, oldest first.

    `root` may be the `wandb/` folder itself or any folder above it (a logger's `save_dir`).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no folder {str(root)!r} to search for offline W&B runs")
    found = {p.parent.resolve() for p in root.rglob("offline-run-*/run-*.wandb")}
    return sorted(found, key=lambda p: (p.name.split("-")[2], _start_time(p), p.name))


def _start_time(run_dir: Path) -> float:
    """The run record's start time: folder names only resolve to the second."""
    from wandb.proto import wandb_internal_pb2 as pb

    for wandb_file in run_dir.glob("run-*.wandb"):
        try:
            for payload in iter_records(wandb_file, allow_truncated=True):
                record = pb.Record()
                record.ParseFromString(payload)
                if record.WhichOneof("record_type") == "run":
                    t = record.run.start_time
                    return t.seconds + t.nanos * 1e-9
        except (WandbFileError, OSError, ValueError):
            break
    return float("inf")


def read_run(path_or_dir: str | Path, *, allow_truncated: bool = False, wait: float = 0.0) -> OfflineRun:
    """Parse one offline run (its `.wandb` file or its run folder).

    `wandb.finish()` can return before wandb-core has flushed the file, so `wait` (seconds) polls
    until the run's exit record is on disk first. A file that then still ends in the middle of a
    record (a run still writing, or killed) raises unless `allow_truncated=True`, which keeps the
    complete records before the cut.
    """
    path = _run_file(Path(path_or_dir))
    return wait_until_finished(path, wait) or _parse(path, allow_truncated=allow_truncated)


def wait_until_finished(path: str | Path, timeout: float) -> OfflineRun | None:
    """The run parsed once its exit record is on disk, or None after `timeout` seconds.

    wandb-core writes the `.wandb` file from its own process, so the file can still be short of
    its last records when `wandb.finish()` returns.
    """
    path = _run_file(Path(path))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            run = _parse(path, allow_truncated=True)
        except (WandbFileError, OSError):  # e.g. the header is not written yet
            run = None
        if run is not None and run.finished:
            return run
        time.sleep(0.05)
    return None


def _run_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    files = sorted(path.glob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(
            f"expected one run-*.wandb file in {str(path)!r}, found {len(files)}; "
            "pass the file itself, or a folder from find_offline_runs()"
        )
    return files[0]


def _parse(path: Path, *, allow_truncated: bool) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    run, flat_summary = OfflineRun(path=path), {}
    for payload in iter_records(path, allow_truncated=allow_truncated):
        record = pb.Record()
        try:
            record.ParseFromString(payload)
        except Exception as exc:  # protobuf raises its own DecodeError
            raise WandbFileError(f"{path}: a record is not a wandb Record protobuf ({exc})") from exc
        _apply(run, flat_summary, record)
    run.summary = _regroup(flat_summary)
    run.config.pop("_wandb", None)  # wandb's own bookkeeping, not the user's config
    return run


def iter_records(path: str | Path, *, allow_truncated: bool = False) -> Iterator[bytes]:
    """The reassembled, checksum-verified record payloads of a `.wandb` file, in order."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < FILE_HEADER.size:
        raise WandbFileError(f"{path}: {len(data)} bytes is too short for a .wandb header")
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if ident != IDENT or magic != MAGIC:
        raise WandbFileError(f"{path}: not a W&B record log (header {data[:7]!r}); pass a run-<id>.wandb file")
    if version != VERSION:
        raise WandbFileError(f"{path}: unsupported .wandb format version {version} (this reader knows {VERSION})")

    pos, parts, start = FILE_HEADER.size, [], None

    def truncated(why: str) -> WandbFileError:
        return WandbFileError(
            f"{path}: truncated at byte {pos} ({why}); the run may still be writing or was killed — "
            "pass allow_truncated=True to read the complete records before the cut"
        )

    while pos < len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:
            pos += left_in_block  # block trailer padding
            continue
        if pos + CHUNK_HEADER.size > len(data):
            if allow_truncated:
                return
            raise truncated("partial chunk header")
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        body_at = pos + CHUNK_HEADER.size
        if length > left_in_block - CHUNK_HEADER.size:
            raise WandbFileError(f"{path}: chunk at byte {pos} claims {length} bytes, more than its block holds (corrupt)")
        if body_at + length > len(data):
            if allow_truncated:
                return
            raise truncated("partial chunk body")
        body = data[body_at : body_at + length]
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
            raise WandbFileError(f"{path}: checksum mismatch in the chunk at byte {pos}; the file is corrupt")
        if kind == FULL and start is None:
            yield body
        elif kind == FIRST and start is None:
            parts, start = [body], pos
        elif kind == MIDDLE and start is not None:
            parts.append(body)
        elif kind == LAST and start is not None:
            parts.append(body)
            yield b"".join(parts)
            parts, start = [], None
        else:
            raise WandbFileError(f"{path}: unexpected chunk type {kind} at byte {pos} (corrupt record framing)")
        pos = body_at + length
    if start is not None and not allow_truncated:
        pos = start
        raise truncated("the last record has no final chunk")


# --- decoding records -------------------------------------------------------------------------------


def _item_key(item: Any) -> str:
    return item.key if item.key else "/".join(item.nested_key)


def _item_value(item: Any) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    which = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if which is None or which == "none":
        return None
    if which == "json":
        return json.loads(item.json)
    return getattr(item, which)


def _regroup(flat: dict[str, Any]) -> dict[str, Any]:
    """Fold `k/_type`, `k/...` back into `flat[k] = {"_type": ..., ...}` (tables, histograms)."""
    prefixes = sorted({k[: -len("/_type")] for k in flat if k.endswith("/_type")}, key=len)
    out = dict(flat)
    for prefix in prefixes:
        if prefix in out and not isinstance(out[prefix], dict):
            continue
        group = {k: out.pop(k) for k in [k for k in out if k.startswith(prefix + "/")]}
        obj: dict[str, Any] = out.get(prefix, {}) if isinstance(out.get(prefix), dict) else {}
        for k, v in group.items():
            *parents, leaf = k[len(prefix) + 1 :].split("/")
            node = obj
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = v
        out[prefix] = obj
    return out


def _apply_updates(target: dict[str, Any], updates: Any, removes: Any) -> None:
    for item in updates:
        target[_item_key(item)] = _item_value(item)
    for item in removes:
        target.pop(_item_key(item), None)


def _apply(run: OfflineRun, flat_summary: dict[str, Any], record: Any) -> None:
    """Fold one record into the run; the summary stays flat until every update is in."""
    kind = record.WhichOneof("record_type")
    if kind == "history":
        row = {_item_key(item): _item_value(item) for item in record.history.item}
        row.setdefault("_step", int(record.history.step.num))
        run.history.append(_regroup(row))
    elif kind == "summary":
        _apply_updates(flat_summary, record.summary.update, record.summary.remove)
    elif kind == "config":
        _apply_updates(run.config, record.config.update, record.config.remove)
    elif kind == "run":
        run.run_id = record.run.run_id or run.run_id
        run.project = record.run.project or run.project
        _apply_updates(run.config, record.run.config.update, record.run.config.remove)
        _apply_updates(flat_summary, record.run.summary.update, record.run.summary.remove)
    elif kind == "exit":
        run.exit_code = int(record.exit.exit_code)
