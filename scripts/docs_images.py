"""Regenerate docs/audit_report.png from a real audit run (`make docs-images`).

    .venv/bin/python scripts/docs_images.py [--config configs/audit/embedded.yaml]
                                            [--output-dir outputs/docs_images] [--out docs/audit_report.png]

Runs `anatomy audit` on configs/audit/embedded.yaml (the embedded SmolLM2-135M-Instruct and the
project's SAE on the demo data; under a minute on 2 CPU cores) into `--output-dir` (its
report.html is written there too), then draws what the top of that report shows: the summary
numbers, the "What to do next" box, the first rows of the ranked-concept table with their labels
and predicted direction, the volcano plot and the Δ histogram, about 1400 px wide.

This is a rendering of the report's content with matplotlib, NOT a browser screenshot: no
headless browser is installed where this project is built and none can be downloaded (offline
but for PyPI), so the picture is composed from the same `AuditResult` with the report's own
functions (`summary_rows`, `draw_volcano`, `draw_delta_histogram`, the report's label fallback,
`train_command`). The audit is seeded and the PNG carries no timestamp or version metadata, so a
rerun gives the same image; only the printed timing changes.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
TOP_ROWS = 15
DIRECTION_COLOURS = {"amplify": "#1565c0", "suppress": "#c62828", "none": "#777777"}


def run(config: Path, output_dir: Path):
    """The audit of `config` written to `output_dir`, parsed and checked as `anatomy audit` does; its AuditResult."""
    from lightning_anatomy.audit.job import run_audit
    from lightning_anatomy.cli import job_config

    return run_audit(job_config("audit", ["--config", str(config), f"--output_dir={output_dir}"]))


def plain(text: str, limit: int | None = None) -> str:
    """Text matplotlib shows as it is (no mathtext from '$'), cut to `limit` characters."""
    text = str(text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def draw_header(fig, result, concept_set_dir: str) -> None:
    from lightning_anatomy.audit.report import summary_rows, train_command

    fig.text(0.02, 0.975, "Dataset anatomy — audit report (configs/audit/embedded.yaml)", fontsize=16,
             weight="bold", va="top")
    rows = [(k, v) for k, v in summary_rows(result) if k != "hooks"]
    for i, (key, value) in enumerate(rows):
        col, line = divmod(i, 5)
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        fig.text(0.02 + 0.25 * col, 0.935 - 0.024 * line, plain(f"{key}: {shown}", 60), fontsize=9.5, va="top")
    command = " \\\n      ".join(textwrap.wrap(train_command(concept_set_dir), 64, break_on_hyphens=False))
    box = ("What to do next\n"
           f"1. edit {concept_set_dir}/concepts.yaml:\n"
           "     action: suppress | amplify | allow   (per concept)\n"
           "2. train with it:\n"
           f"     {command}")
    fig.text(0.525, 0.945, plain(box), fontsize=9, va="top", family="monospace", linespacing=1.5,
             bbox={"boxstyle": "round,pad=0.6", "fc": "#f5f9ff", "ec": "#1565c0", "lw": 1.5})


def draw_table(ax, result) -> None:
    from lightning_anatomy.audit.report import build_index
    from lightning_anatomy.audit.report_html import fmt

    index = build_index(result, max_concepts=TOP_ROWS)
    head = ["rank", "feature", "label", "cluster", "Δ", "d", "q", "split-half", "direction"]
    cells, colours, unlabelled = [], [], []
    for _, r in index.listed.iterrows():
        label, real = index.label(str(r["hook"]), int(r["feature"]))
        direction = str(r["predicted_direction"])
        cells.append([str(int(r["rank"])), str(int(r["feature"])), plain(label if real else f"(unlabelled) {label}", 78),
                      str(int(r["cluster"])) if int(r["cluster"]) >= 0 else "–", fmt(r["delta"]),
                      fmt(r["cohens_d"]), fmt(r["q_value"]), "agree" if r["split_half_agree"] else "disagree",
                      direction])
        colours.append(DIRECTION_COLOURS.get(direction, "#222222"))
        unlabelled.append(not real)
    ax.axis("off")
    n = len(result.concepts)
    ax.set_title(f"Ranked concepts (top {len(cells)} of {n}; the report lists 100, each linked to its contexts "
                 "and pairs; headers sort)", fontsize=11, loc="left")
    table = ax.table(cellText=cells, colLabels=head, cellLoc="left", bbox=[0, 0, 1, 1],
                     colWidths=[0.04, 0.06, 0.48, 0.05, 0.07, 0.06, 0.08, 0.07, 0.08])
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for (row, col), cell in table.get_celld().items():
        cell.PAD = 0.04 if col == 2 else 0.08  # matplotlib pads by a fraction of the cell's width
        cell.set_edgecolor("#dddddd")
        if row == 0:
            cell.set_facecolor("#f1f1f1")
            cell.set_text_props(weight="bold")
        elif col == len(head) - 1:
            cell.get_text().set_color(colours[row - 1])
        elif col == 2 and unlabelled[row - 1]:
            cell.get_text().set_color("#777777")
            cell.get_text().set_style("italic")


def compose(result, concept_set_dir: str, out: Path) -> None:
    """The report's content as one PNG, 1400 px wide, without version or date metadata."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lightning_anatomy.audit.report_plots import draw_delta_histogram, draw_volcano

    fig = Figure(figsize=(14, 10.5), dpi=100)
    draw_header(fig, result, concept_set_dir)
    grid = fig.add_gridspec(2, 2, left=0.04, right=0.98, top=0.775, bottom=0.06, height_ratios=[1.0, 0.95],
                            hspace=0.16, wspace=0.18)
    draw_table(fig.add_subplot(grid[0, :]), result)
    draw_volcano(fig.add_subplot(grid[1, 0]), result.concepts, float(result.options.get("alpha", 0.05)))
    draw_delta_histogram(fig.add_subplot(grid[1, 1]), result.concepts)
    fig.text(0.98, 0.012, "rendered from the report's content with matplotlib (scripts/docs_images.py), not a "
             "browser screenshot", ha="right", fontsize=7.5, color="#888")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    FigureCanvasAgg(fig).print_png(str(tmp), metadata={"Software": None})
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "audit" / "embedded.yaml")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs") / "docs_images")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "audit_report.png")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run(args.config, args.output_dir)
    audited = time.perf_counter()
    compose(result, str(args.output_dir / "audit" / "concept_set"), args.out)
    print(f"wrote {args.out} (audit {audited - start:.0f} s, drawing {time.perf_counter() - audited:.1f} s); "
          f"the report itself: {args.output_dir / 'audit' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
