"""Data-source specs: the one place that turns a config's `source:` into something readable.

A spec is `"toy"` / `"toy:<n>"` (the built-in toy set, 64 pairs by default), `"demo"` (the
sycophancy demo's training pairs), a path (JSONL, JSONL.gz, JSON, Parquet or a `save_to_disk`
folder), or an object `read_preferences` takes as it is (rows, a `Dataset`, a `DataFrame`).
`check_source` refuses a bad one before any model loads; `resolve_source` builds it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SOURCE_SPECS = ("'toy' or 'toy:<n>' (the built-in toy set), 'demo' (the sycophancy demo's training pairs), a path "
                "to a JSONL (.jsonl/.jsonl.gz), JSON or Parquet file or a datasets.save_to_disk folder, or in-memory "
                "rows / a Dataset / a DataFrame from Python")
TOY_DEFAULT_SIZE = 64


def _toy_size(spec: str, where: str) -> int:
    size = spec.partition(":")[2] or str(TOY_DEFAULT_SIZE)
    if not size.isdigit() or int(size) < 1:
        raise ValueError(f"{where}={spec!r}: toy:<n> needs a positive integer n, e.g. 'toy:64'")
    return int(size)


def check_source(spec: Any, where: str = "source") -> None:
    """Raise, naming `where`, when `spec` cannot be a preference source (reads nothing)."""
    if not isinstance(spec, str | os.PathLike):
        return  # in-memory rows and datasets: read_preferences checks them row by row
    text = str(spec)
    if text == "toy" or text.startswith("toy:"):
        _toy_size(text, where)
        return
    if text == "demo":
        return
    if not text:
        raise ValueError(f"{where} is empty; pass {SOURCE_SPECS}")
    if not Path(text).expanduser().exists():
        raise FileNotFoundError(f"{where}={text!r} is not a file or folder, nor a built-in source; pass {SOURCE_SPECS}")


def resolve_source(spec: Any, *, seed: int = 0, where: str = "source") -> Any:
    """What `read_preferences` reads for `spec`: built-in sets are generated (seeded), paths kept."""
    check_source(spec, where)
    if isinstance(spec, str) and (spec == "toy" or spec.startswith("toy:")):
        from lightning_anatomy.data.toy import make_toy_preferences

        return make_toy_preferences(_toy_size(spec, where), seed=seed)
    if isinstance(spec, str) and spec == "demo":
        from lightning_anatomy.demo.data import make_demo_data

        return make_demo_data(seed=seed).train
    return spec
