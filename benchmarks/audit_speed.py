"""End-to-end audit time and memory, as a user runs it: `anatomy audit` on a preference file.

Per audit method, one `anatomy audit --config <config> --data.source=<file> --audit.method=<m>`
in its own process with a fresh output folder (extraction, co-firing clusters, statistics,
labels, report): wall seconds, pairs/s and the process's peak RSS (from `wait4`, so each method
is measured alone). Methods run one after another, not interleaved: these are absolute times
against the issue's goals (the whole shared HH sample within 15 minutes, 10k pairs within 2
hours on this 2-core CPU), on a machine that should be otherwise idle.

`--pairs N` audits the first N readable pairs; more than the file holds repeats the file
(timing only: the repeated pairs say nothing new).

    python benchmarks/audit_speed.py                        # both methods, the whole HH sample
    python benchmarks/audit_speed.py --methods paper --pairs 10000 --name audit_speed.10k
    python benchmarks/audit_speed.py --quick                # tiny model on the toy set (smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

FORMAT = "lightning-anatomy/bench-audit-speed"
VERSION = 1
REPO = Path(__file__).resolve().parents[1]
METHODS = ("paper", "paired")
GOALS_S = {1155: 15 * 60, 10_000: 2 * 3600}  # pairs -> seconds (issue 13)


def count_rows(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def repeated_file(path: Path, n_lines: int, work: Path) -> Path:
    """The JSONL file's lines cycled to `n_lines` lines (row ids are line numbers: all distinct)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = work / f"{path.stem}.x{n_lines}.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for i in range(n_lines):
            f.write(lines[i % len(lines)] + "\n")
    return out


def goal_for(requested: int | None) -> float | None:
    """The issue's time goal for an audit of `requested` pairs (the file's rows, or --pairs; rows the
    reader drops, e.g. the sample's one empty reply repeated, do not change which goal applies)."""
    return next((s for n, s in sorted(GOALS_S.items(), reverse=True) if requested is not None and requested >= n), None)


def run_audit(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one audit process; its wall time and its own peak RSS."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"audit failed (exit {proc.returncode}): {' '.join(command)}\n{output[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--pairs", type=int, default=None, help="pairs to audit (default: the whole file)")
    parser.add_argument("--data", type=Path, default=common.HH_RLHF, help="preference JSONL (default: the HH sample)")
    parser.add_argument("--config", type=Path, default=REPO / "configs/audit/embedded.yaml")
    parser.add_argument("--quick", action="store_true", help="configs/audit/tiny.yaml on its toy set")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--name", default=None, help="output file stem (default audit_speed, or audit_speed.quick)")
    args = parser.parse_args(argv)
    if args.pairs is not None and args.pairs < 4:
        parser.error(f"--pairs {args.pairs}: an audit needs at least 4 pairs")
    config = REPO / "configs/audit/tiny.yaml" if args.quick else args.config
    if not args.quick and not args.data.is_file():
        parser.error(f"--data {args.data} is absent (the shared data sits beside the repo); pass --data <file.jsonl>")
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="anatomy-audit-speed-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, Any] = {"format": FORMAT, "version": VERSION, "quick": args.quick, "config": str(
        config.relative_to(REPO)), "machine": common.machine_info("cpu"), "methods": {}}
    try:
        data_args: list[str] = []
        requested = None  # pairs the goal is for (the toy set of --quick has none)
        if not args.quick:
            n_file = count_rows(args.data)
            source = args.data if args.pairs is None or args.pairs <= n_file else repeated_file(
                args.data, args.pairs, work)
            data_args = [f"--data.source={os.path.relpath(source, REPO)}", "--data.on_bad_rows=skip"]
            if args.pairs is not None and args.pairs < n_file:
                data_args.append(f"--data.limit={args.pairs}")
            results["data"] = {"file": args.data.name, "lines_in_file": n_file, "repeated": source != args.data}
            requested = args.pairs or n_file
        goal = goal_for(requested)
        for method in args.methods:
            out_dir = work / method
            command = [sys.executable, "-m", "lightning_anatomy.cli", "audit", "--config",
                       os.path.relpath(config, REPO), *data_args, f"--audit.method={method}", f"--output_dir={out_dir}"]
            common.log(f"{method}: {' '.join(command[2:])}")
            measured = run_audit(command, env)
            audit = out_dir / "audit"
            meta = json.loads((audit / "audit.json").read_text())
            n_pairs = int(meta["options"]["n_pairs"])
            results["methods"][method] = {
                **measured, "n_pairs": n_pairs, "pairs_per_s": n_pairs / measured["wall_s"],
                "report_bytes": (audit / "report.html").stat().st_size,
                "command": "anatomy " + " ".join(command[3:-1]) + " --output_dir=<a new folder>", "goal_s": goal,
                "goal_met": None if goal is None else measured["wall_s"] <= goal}
            common.log(f"  {n_pairs} pairs in {measured['wall_s']:.0f} s, peak RSS {measured['peak_rss_mb']:.0f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["wall_s"] = time.time() - started
    common.publish(results, args.out, args.name or ("audit_speed.quick" if args.quick else "audit_speed"), tables)
    return results


def tables(results: dict[str, Any]) -> str:
    rows = [[m, r["n_pairs"], f"{r['wall_s'] / 60:.1f} min", f"{r['pairs_per_s']:.2f}", f"{r['peak_rss_mb']:.0f} MB",
             "–" if r["goal_met"] is None else f"{'met' if r['goal_met'] else 'missed'} (≤ {r['goal_s'] / 60:.0f} min)"]
            for m, r in results["methods"].items()]
    return common.markdown_table(["method", "pairs", "wall", "pairs/s", "peak RSS", "goal"], rows)


if __name__ == "__main__":
    main()
