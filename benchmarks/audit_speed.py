"""End-to-end audit time and memory, as a user runs it: `anatomy audit` on a preference file.

Per audit method, one `anatomy audit --config <config> --data.source=<file> --audit.method=<m>`
in its own process with a fresh output folder (extraction, co-firing clusters, statistics,
labels, report): wall seconds, pairs/s and the process's peak RSS (from `wait4`, so each method
is measured alone). Methods run one after another, not interleaved: these are absolute times
against the issue's goals (the whole shared HH sample within 15 minutes, 10k pairs within 2
hours on this 2-core CPU), on a machine that should be otherwise idle.

`--pairs N` audits the first N readable pairs; more than the file holds repeats the file
(timing only: the repeated pairs say nothing new).

`tilt_fit`: the tilt predictor's own cost beside the audit's (issue 24's goal: ≤ 60 s on this
CPU), measured in this process on synthetic cluster activities (seeded; the cost depends on the
sizes, not the values): the Bradley–Terry fit with its K-fold choice of the L2 penalty and the
tilt of the dataset's responses and of a rollout sample (`audit.tilt.tilt_predict`), on 10,000
pairs × the SmolLM2 SAE's cluster count under the "auto" size rule if every feature were
clustered (d_sae / target size: an upper bound; more clusters cost more). `--tilt-only` measures
only that (about 10 s here, 4 s of it the fit).

    python benchmarks/audit_speed.py                        # both methods, the whole HH sample, and tilt_fit
    python benchmarks/audit_speed.py --methods paper --pairs 10000 --name audit_speed.10k
    python benchmarks/audit_speed.py --tilt-only --out /tmp # the tilt predictor's fit and tilt only
    python benchmarks/audit_speed.py --quick                # tiny model on the toy set, a small tilt_fit (smoke)
"""

from __future__ import annotations

import argparse
import json
import math
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
import numpy as np  # noqa: E402

FORMAT = "lightning-anatomy/bench-audit-speed"
VERSION = 1
REPO = Path(__file__).resolve().parents[1]
METHODS = ("paper", "paired")
GOALS_S = {1155: 15 * 60, 10_000: 2 * 3600}  # pairs -> seconds (issue 13)
TILT_GOAL_S = 60.0  # the tilt predictor's fit and tilt on 10,000 pairs (issue 24)
TILT_PAIRS = 10_000
TILT_ROLLOUTS = 384  # the HH prediction benchmark's rollouts: 96 held-out prompts × 4


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


def smollm2_cluster_count() -> int:
    """Clusters of the SmolLM2 SAE under the "auto" size rule if every feature were clustered:
    ⌈d_sae / target size⌉ (2,304 / 15 → 154), an upper bound on what the audit finds."""
    from lightning_anatomy.audit.cofiring import target_cluster_size
    from lightning_anatomy.models.embedded import EMBEDDED_SAE_DIR

    d_sae = int(json.loads((EMBEDDED_SAE_DIR / "cfg.json").read_text())["d_sae"])
    return math.ceil(d_sae / target_cluster_size(d_sae))


def synthetic_pairs(n_pairs: int, n_clusters: int, n_rollouts: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chosen, rejected, rollouts) cluster activities in [0, 1], sparse like SAE clusters, with a
    planted Bradley–Terry preference (so the fit iterates as on real pairs, not on pure noise)."""
    rng = np.random.default_rng(seed)
    rate = 0.02 + rng.beta(0.5, 4.0, n_clusters)  # how often each cluster fires in a response

    def responses(n: int) -> np.ndarray:
        return rng.random((n, n_clusters)) * (rng.random((n, n_clusters)) < rate)

    w = np.zeros(n_clusters)  # a fifth of the clusters carry the preference
    picked = rng.choice(n_clusters, max(1, n_clusters // 5), replace=False)
    w[picked] = rng.normal(0.0, 3.0, len(picked))
    a, b = responses(n_pairs), responses(n_pairs)
    a_wins = rng.random(n_pairs) < 1.0 / (1.0 + np.exp(-(a - b) @ w))
    chosen, rejected = np.where(a_wins[:, None], a, b), np.where(a_wins[:, None], b, a)
    return chosen, rejected, responses(n_rollouts)


def time_tilt_fit(n_pairs: int, n_clusters: int, n_rollouts: int = TILT_ROLLOUTS, seed: int = 0) -> dict[str, Any]:
    """Wall and CPU seconds of `tilt_predict` (the Bradley–Terry fit with its cross-validation, then
    the tilt of the dataset's responses and of the rollouts) on synthetic activities of these sizes."""
    from lightning_anatomy.audit.tilt import L2_GRID, tilt_predict

    chosen, rejected, rollouts = synthetic_pairs(n_pairs, n_clusters, n_rollouts, seed)
    wall, cpu = time.perf_counter(), time.process_time()
    prediction = tilt_predict(chosen, rejected, rollouts=rollouts, seed=seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    goal = TILT_GOAL_S if n_pairs >= TILT_PAIRS else None
    return {"n_pairs": n_pairs, "n_clusters": n_clusters, "n_rollouts": n_rollouts, "n_folds": prediction.fit.n_folds,
            "n_l2": len(L2_GRID), "l2": prediction.fit.l2, "wall_s": wall, "cpu_s": cpu,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "data": "synthetic (seeded)", "seed": seed,
            "goal_s": goal, "goal_met": None if goal is None else wall <= goal}


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
    parser.add_argument("--tilt-only", action="store_true", help="only the tilt predictor's fit and tilt (tilt_fit)")
    parser.add_argument("--tilt-pairs", type=int, default=None,
                        help=f"pairs of the tilt_fit measurement (default {TILT_PAIRS:,}; 400 with --quick)")
    parser.add_argument("--tilt-clusters", type=int, default=None,
                        help="clusters of the tilt_fit measurement (default: the SmolLM2 SAE's under the size rule; "
                             "16 with --quick)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--name", default=None, help="output file stem (default audit_speed, or audit_speed.quick)")
    args = parser.parse_args(argv)
    if args.pairs is not None and args.pairs < 4:
        parser.error(f"--pairs {args.pairs}: an audit needs at least 4 pairs")
    for flag, value in (("--tilt-pairs", args.tilt_pairs), ("--tilt-clusters", args.tilt_clusters)):
        if value is not None and value < 2:
            parser.error(f"{flag} {value}: pass at least 2")
    config = REPO / "configs/audit/tiny.yaml" if args.quick else args.config
    if not args.quick and not args.tilt_only and not args.data.is_file():
        parser.error(f"--data {args.data} is absent (the shared data sits beside the repo); pass --data <file.jsonl>")
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="anatomy-audit-speed-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, Any] = {"format": FORMAT, "version": VERSION, "quick": args.quick, "config": str(
        config.relative_to(REPO)), "machine": common.machine_info("cpu"), "methods": {}}
    tilt_pairs = args.tilt_pairs or (400 if args.quick else TILT_PAIRS)
    tilt_clusters = args.tilt_clusters or (16 if args.quick else smollm2_cluster_count())
    common.log(f"tilt_fit: {tilt_pairs} pairs × {tilt_clusters} clusters")
    results["tilt_fit"] = time_tilt_fit(tilt_pairs, tilt_clusters)
    common.log(f"  {results['tilt_fit']['wall_s']:.1f} s")
    if args.tilt_only:
        args.methods = []
    try:
        data_args: list[str] = []
        requested = None  # pairs the goal is for (the toy set of --quick has none)
        if not args.quick and args.methods:
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
    default_name = "audit_speed.tilt" if args.tilt_only else "audit_speed"
    common.publish(results, args.out, args.name or ("audit_speed.quick" if args.quick else default_name), tables)
    return results


def tables(results: dict[str, Any]) -> str:
    """The audit per method (where measured) and the tilt predictor's fit and tilt (where measured)."""
    out = []
    if results["methods"] or "tilt_fit" not in results:
        rows = [[m, r["n_pairs"], f"{r['wall_s'] / 60:.1f} min", f"{r['pairs_per_s']:.2f}", f"{r['peak_rss_mb']:.0f} MB",
                 "–" if r["goal_met"] is None else f"{'met' if r['goal_met'] else 'missed'} (≤ {r['goal_s'] / 60:.0f} min)"]
                for m, r in results["methods"].items()]
        out.append(common.markdown_table(["method", "pairs", "wall", "pairs/s", "peak RSS", "goal"], rows))
    if "tilt_fit" in results:
        t = results["tilt_fit"]
        goal = "–" if t["goal_met"] is None else f"{'met' if t['goal_met'] else 'missed'} (≤ {t['goal_s']:.0f} s)"
        out.append(common.markdown_table(
            ["tilt predictor: Bradley–Terry fit (K-fold L2 choice) + tilt", "pairs", "clusters", "wall", "CPU", "goal"],
            [["tilt_fit", t["n_pairs"], t["n_clusters"], f"{t['wall_s']:.1f} s", f"{t['cpu_s']:.1f} s", goal]]))
    return "\n\n".join(out)


if __name__ == "__main__":
    main()
