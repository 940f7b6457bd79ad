"""Regenerate the benchmark tables of the docs from the results files (one command, no hand edits).

    python benchmarks/readme_tables.py                     # rewrites every marked table in docs/benchmarks.md and README.md
    python benchmarks/readme_tables.py --page other.md     # only the pages named

A table lives between `<!-- <name>:begin -->` and `<!-- <name>:end -->`; each name maps to a
results file in benchmarks/results/ and the function of its benchmark that renders it (each
benchmark script's own `tables`, the one it prints after a run).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


PAGES = (REPO / "docs" / "benchmarks.md", REPO / "README.md")


def _interventions(doc: dict[str, Any]) -> str:
    import interventions

    return interventions.markdown(interventions.upgrade(doc))


def _benchmark_tables(module: str, function: str = "tables") -> Callable[[dict[str, Any]], str]:
    """The renderer a benchmark script prints its results with (imported only when its table is used)."""

    def render_tables(doc: dict[str, Any]) -> str:
        return getattr(importlib.import_module(module), function)(doc).strip()

    return render_tables


TABLES: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "interventions-table": ("interventions.json", _interventions),
    "cost-table": ("cost.json", _benchmark_tables("cost")),
    "throughput-table": ("throughput.json", _benchmark_tables("throughput")),
    "audit-speed-table": ("audit_speed.json", _benchmark_tables("audit_speed")),
    "audit-speed-10k-table": ("audit_speed.10k.json", _benchmark_tables("audit_speed")),
    "audit-speed-tilt-table": ("audit_speed.tilt.json", _benchmark_tables("audit_speed")),
    "cofiring-scale-table": ("cofiring_scale.json", _benchmark_tables("cofiring_scale")),
    "spurious-table": ("spurious.json", _benchmark_tables("spurious", "markdown")),
    "real-model-table": ("real_model.json", _benchmark_tables("real_model")),
    "real-model-demo-table": ("real_model.demo.json", _benchmark_tables("real_model")),
    "prediction-table": ("prediction.json", _benchmark_tables("prediction")),
    "prediction-goals": ("prediction.json", _benchmark_tables("prediction", "goals")),
    "prediction-headline": ("prediction.json", _benchmark_tables("prediction", "headline")),
    "prediction-sweep": ("prediction.json", _benchmark_tables("prediction", "sweep")),
    "prediction-samples": ("prediction.json", _benchmark_tables("prediction", "samples")),
}


def render(readme: str, results: Path) -> str:
    """`readme` (any Markdown page) with every marked table replaced by its rendering of the results file."""
    for name, (filename, make) in TABLES.items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if begin not in readme:
            continue
        path = results / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run its benchmark first (the docs' table {name!r} needs it)")
        table = make(json.loads(path.read_text()))
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if not pattern.search(readme):
            raise ValueError(f"{begin} has no matching {end}")
        replacement = f"{begin}\n{table}\n{end}"
        readme = pattern.sub(lambda _, new=replacement: new, readme)
    return readme


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page", "--readme", dest="pages", type=Path, action="append",
                        help=f"a Markdown page to update (repeatable; default: {', '.join(str(p.relative_to(REPO)) for p in PAGES)})")
    parser.add_argument("--results", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    pages = args.pages or [p for p in PAGES if p.is_file()]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        new = render(text, args.results)
        if new != text:
            common.files.atomic_write_text(page, new)
        common.log(f"{page}: {'updated' if new != text else 'already up to date'}")
    return pages


if __name__ == "__main__":
    main()
