"""Regenerate the README's benchmark tables from the results files (one command, no hand edits).

    python benchmarks/readme_tables.py            # rewrites every marked table in README.md

A table lives between `<!-- <name>:begin -->` and `<!-- <name>:end -->`; each name maps to a
results file and the function of its benchmark that renders it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _interventions(doc: dict[str, Any]) -> str:
    import interventions

    return interventions.markdown(interventions.upgrade(doc))


TABLES: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "interventions-table": ("interventions.json", _interventions),
}


def render(readme: str, results: Path) -> str:
    """`readme` with every marked table replaced by its rendering of the results file."""
    for name, (filename, make) in TABLES.items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if begin not in readme:
            continue
        path = results / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run its benchmark first (the README's table {name!r} needs it)")
        table = make(json.loads(path.read_text()))
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if not pattern.search(readme):
            raise ValueError(f"README: {begin} has no matching {end}")
        replacement = f"{begin}\n{table}\n{end}"
        readme = pattern.sub(lambda _, new=replacement: new, readme)
    return readme


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--results", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    new = render(text, args.results)
    if new != text:
        common.files.atomic_write_text(args.readme, new)
    common.log(f"{args.readme}: {'updated' if new != text else 'already up to date'}")
    return args.readme


if __name__ == "__main__":
    main()
