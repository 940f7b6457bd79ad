"""Data-source specs: the one place that turns a config's `source:` into something readable.

A spec is the name of a registered built-in source (`"toy"` / `"toy:<n>"`, the built-in toy set,
64 pairs by default; `"demo"`, the sycophancy demo's training pairs, registered by the package
facade), a path (JSONL, JSONL.gz, JSON, Parquet or a `save_to_disk` folder), or an object
`read_preferences` takes as it is (rows, a `Dataset`, a `DataFrame`). `check_source` refuses a bad
one before any model loads; `resolve_source` builds it.

Built-in sources are registered from above (`register_source`): the data layer imports nothing
of the layers that build on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOY_DEFAULT_SIZE = 64


@dataclass(frozen=True)
class BuiltinSource:
    """A named source: `build(size, seed)` returns rows; `size` is the `<n>` of `name:<n>` or None."""

    name: str
    build: Callable[[int | None, int], Any]
    description: str
    sized: bool = False


_SOURCES: dict[str, BuiltinSource] = {}


def register_source(name: str, build: Callable[[int | None, int], Any], description: str, *,
                    sized: bool = False) -> None:
    """Make `source=name` (and `name:<n>` when `sized`) a built-in source."""
    _SOURCES[name] = BuiltinSource(name, build, description, sized)


def _toy(size: int | None, seed: int) -> Any:
    from lightning_anatomy.data.toy import make_toy_preferences

    return make_toy_preferences(size or TOY_DEFAULT_SIZE, seed=seed)


register_source("toy", _toy, "'toy' or 'toy:<n>' (the built-in toy set)", sized=True)


def source_specs() -> str:
    """What a source may be, for error messages."""
    builtins = ", ".join(s.description for s in _SOURCES.values())
    return (f"{builtins}, a path to a JSONL (.jsonl/.jsonl.gz), JSON or Parquet file or a datasets.save_to_disk "
            "folder, or in-memory rows / a Dataset / a DataFrame from Python")


def _builtin(text: str, where: str) -> tuple[BuiltinSource, int | None] | None:
    name, colon, size = text.partition(":")
    source = _SOURCES.get(name)
    if source is None or (colon and not source.sized):
        return None
    if not colon:
        return source, None
    if not size.isdigit() or int(size) < 1:
        raise ValueError(f"{where}={text!r}: {name}:<n> needs a positive integer n, e.g. '{name}:64'")
    return source, int(size)


def check_source(spec: Any, where: str = "source") -> None:
    """Raise, naming `where`, when `spec` cannot be a preference source (reads nothing)."""
    if not isinstance(spec, str | os.PathLike):
        return  # in-memory rows and datasets: read_preferences checks them row by row
    text = str(spec)
    if not text:
        raise ValueError(f"{where} is empty; pass {source_specs()}")
    if isinstance(spec, str) and _builtin(text, where) is not None:
        return
    if not Path(text).expanduser().exists():
        raise FileNotFoundError(
            f"{where}={text!r} is not a file or folder, nor a built-in source; pass {source_specs()}")


def resolve_source(spec: Any, *, seed: int = 0, where: str = "source") -> Any:
    """What `read_preferences` reads for `spec`: built-in sets are generated (seeded), paths kept."""
    check_source(spec, where)
    found = _builtin(spec, where) if isinstance(spec, str) else None
    if found is not None:
        source, size = found
        return source.build(size, seed)
    return spec

