"""Run every benchmark script in this folder, one after another, with its full settings (`make bench`).

A benchmark script is any `*.py` here whose name does not start with `_` (helpers) and is not
this runner. Each runs in its own process (so one's memory and threads never colour another's
numbers) with offline hubs and W&B; the runner goes on after a failure and exits non-zero at the
end if any script failed.

    python benchmarks/run_all.py                 # everything, full settings
    python benchmarks/run_all.py cost throughput # only these
    python benchmarks/run_all.py --quick         # every script with --quick
    python benchmarks/run_all.py --list
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
               "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}


def discover(directory: Path = HERE) -> list[Path]:
    """The benchmark scripts of `directory`, in name order."""
    return sorted(p for p in directory.glob("*.py") if not p.name.startswith("_") and p.name != Path(__file__).name)


def run_scripts(scripts: list[Path], extra_args: list[str], *, env: dict[str, str] | None = None
                ) -> list[tuple[str, int, float]]:
    """Run each script with `extra_args`; (name, exit code, seconds) per script, in order."""
    child_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    done = []
    for script in scripts:
        print(f"\n### {script.stem} {' '.join(extra_args)}".rstrip(), flush=True)
        start = time.time()
        rc = subprocess.call([sys.executable, str(script), *extra_args], env=child_env, cwd=script.parent.parent)
        done.append((script.stem, rc, time.time() - start))
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only these benchmarks (script names without .py)")
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--list", action="store_true", help="list the benchmark scripts and exit")
    parser.add_argument("--dir", type=Path, default=HERE, help=argparse.SUPPRESS)  # tests point it elsewhere
    args = parser.parse_args(argv)

    scripts = discover(args.dir)
    if args.list:
        print("\n".join(p.stem for p in scripts))
        return 0
    if args.names:
        known = {p.stem: p for p in scripts}
        unknown = [n for n in args.names if n not in known]
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; available: {sorted(known)}")
        scripts = [known[n] for n in args.names]
    if not scripts:
        parser.error(f"no benchmark scripts found in {args.dir}")
    results = run_scripts(scripts, ["--quick"] if args.quick else [])
    print("\n| benchmark | exit code | seconds |\n|---|---|---|")
    for name, rc, seconds in results:
        print(f"| {name} | {rc} | {seconds:.0f} |")
    failed = [name for name, rc, _ in results if rc != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
