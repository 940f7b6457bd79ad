"""Import a script of `benchmarks/` as a module (the folder is not a package; its scripts import
`_common` by name, so the folder goes on sys.path first), and walk a results document."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def run_quick(name: str, out: Path, *args: str) -> tuple[ModuleType, dict]:
    """`(module, results)` of `benchmarks/<name>.py --quick` run in-process on one thread (the
    test process's thread count is restored afterwards: torch loaded before the script could make
    OpenMP wait passively, and busy-waiting threads on a shared 2-core machine stall)."""
    import torch

    module = load_benchmark(name)
    threads = torch.get_num_threads()
    try:
        return module, module.main(["--quick", "--out", str(out), "--threads", "1", *args])
    finally:
        torch.set_num_threads(threads)


def floats_in(obj: object, where: str = "doc") -> Iterator[tuple[str, float]]:
    """Every float of a results document with its path (`doc.a[0].b`), to check they are finite."""
    if isinstance(obj, float):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from floats_in(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from floats_in(v, f"{where}[{i}]")
