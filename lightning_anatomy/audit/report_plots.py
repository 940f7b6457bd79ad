"""The audit report's plots: matplotlib figures on the Agg canvas (no pyplot, so a user's
backend is untouched), embedded in the page as base64 PNG `data:` URIs."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.audit.result import AuditResult

from lightning_anatomy.audit.report_html import esc

# ---- plots ---------------------------------------------------------------------------------------------


def png_data_uri(fig: Figure) -> str:
    canvas = FigureCanvasAgg(fig)
    buf = io.BytesIO()
    canvas.print_png(buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="{uri}">'


def _passes(concepts: pd.DataFrame) -> np.ndarray:
    return concepts["passes"].to_numpy(bool) if "passes" in concepts.columns else np.zeros(len(concepts), bool)


def draw_volcano(ax: Axes, concepts: pd.DataFrame, alpha: float = 0.05) -> None:
    """Δ vs −log10 q; passing concepts coloured by the side they lean to."""
    if len(concepts):
        q = np.clip(concepts["q_value"].to_numpy(np.float64), 1e-300, 1.0)
        y = -np.log10(q)
        x = concepts["delta"].to_numpy(np.float64)
        passes = _passes(concepts)
        ax.scatter(x[~passes], y[~passes], s=6, c="#9e9e9e", alpha=0.5, label="not passing", linewidths=0)
        for sign, colour, name in ((1, "#1565c0", "chosen-leaning"), (-1, "#c62828", "rejected-leaning")):
            sel = passes & (np.sign(x) == sign)
            ax.scatter(x[sel], y[sel], s=10, c=colour, label=name, linewidths=0)
        ax.axhline(-math.log10(alpha), color="#555", lw=0.8, ls="--")
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_xlabel("Δ (chosen − rejected)")
    ax.set_ylabel("−log10 q")
    ax.set_title("Volcano: disparity vs. evidence", fontsize=10)


def draw_delta_histogram(ax: Axes, concepts: pd.DataFrame) -> None:
    """Δ over every tested feature, the passing ones stacked on top in colour (log counts when tall)."""
    x = concepts["delta"].to_numpy(np.float64) if len(concepts) else np.zeros(0)
    ok = np.isfinite(x)
    passes = _passes(concepts)[ok]
    x = x[ok]
    if len(x):
        bins = np.histogram_bin_edges(x, bins=int(np.clip(np.sqrt(len(x)) * 2, 10, 60)))
        counts, _, _ = ax.hist([x[~passes], x[passes]], bins=bins, stacked=True, color=["#bdbdbd", "#ef6c00"],
                               label=[f"not passing ({int((~passes).sum())})", f"passing ({int(passes.sum())})"])
        if np.max(counts) > 50:
            ax.set_yscale("log")
        ax.axvline(0, color="#555", lw=0.8)
        ax.legend(fontsize=8, frameon=False)
    ax.set_xlabel("Δ (chosen − rejected)")
    ax.set_ylabel("features")
    ax.set_title("Distribution of Δ over all tested features", fontsize=10)


def _figure(draw: Any, *args: Any) -> str:
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    draw(fig.add_subplot(), *args)
    fig.tight_layout()
    return png_data_uri(fig)


def volcano_plot(concepts: pd.DataFrame) -> str:
    """The volcano plot as a data URI."""
    return _figure(draw_volcano, concepts)


def length_control_plot(concepts: pd.DataFrame) -> str | None:
    """Δ vs Δ at equal lengths with the diagonal; None when the audit ran without length control."""
    if "delta_len_ctrl" not in concepts.columns:
        return None
    x = concepts["delta"].to_numpy(np.float64)
    y = concepts["delta_len_ctrl"].to_numpy(np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        return None

    def draw(ax: Axes) -> None:
        passes = _passes(concepts)
        ax.scatter(x[ok & ~passes], y[ok & ~passes], s=6, c="#9e9e9e", alpha=0.5, linewidths=0, label="not passing")
        ax.scatter(x[ok & passes], y[ok & passes], s=10, c="#ef6c00", linewidths=0, label="passing")
        lo, hi = float(min(x[ok].min(), y[ok].min())), float(max(x[ok].max(), y[ok].max()))
        ax.plot([lo, hi], [lo, hi], color="#555", lw=0.8, ls="--", label="Δlen = Δ")
        ax.set_xlabel("Δ")
        ax.set_ylabel("Δ at equal lengths (Δlen)")
        ax.set_title("Length control: far below the diagonal = explained by length", fontsize=10)
        ax.legend(fontsize=8, frameon=False)

    return _figure(draw)


def data_cluster_plot(result: AuditResult) -> str | None:
    """Pairs per data cluster and, where the local table has rows, its passing signals per data
    cluster by the side they lean to; None with fewer than two data clusters."""
    dc = result.data_clusters
    counts = dc["data_cluster"].astype(int).value_counts().sort_index() if len(dc) else pd.Series(dtype=int)
    if len(counts) < 2:
        return None
    names = ["silent" if d < 0 else f"data {d}" for d in counts.index]
    local = result.local
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    axes = fig.subplots(1, 2 if len(local) else 1, sharey=True, squeeze=False)[0]
    axes[0].barh(names, counts.to_numpy(), color="#78909c")
    axes[0].invert_yaxis()
    axes[0].set_xlabel("pairs")
    axes[0].set_title("Pairs per data cluster", fontsize=10)
    if len(local):
        passing = local[local["passes"].astype(bool)]
        left = np.zeros(len(counts))
        for sign, colour, name in ((1, "#1565c0", "chosen-leaning"), (-1, "#c62828", "rejected-leaning")):
            n = np.array([((passing["data_cluster"].astype(int) == d) & (np.sign(passing["delta"]) == sign)).sum()
                          for d in counts.index], dtype=float)
            axes[1].barh(names, n, left=left, color=colour, label=name)
            left += n
        axes[1].set_xlabel("passing feature clusters")
        axes[1].set_title("Local signals per data cluster", fontsize=10)
        axes[1].legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return png_data_uri(fig)


def heatmap(matrix: np.ndarray, *, rows: Sequence[str], cols: Sequence[str], title: str, label: str,
            diverging: bool, size: tuple[float, float] | None = None) -> str:
    """A labelled heatmap as a data URI (diverging colours centred on 0 for signed values)."""
    m = np.asarray(matrix, dtype=np.float64)
    h = min(9.0, 1.5 + 0.25 * max(len(rows), 1))
    w = min(12.0, 2.5 + 0.3 * max(len(cols), 1))
    fig = Figure(figsize=size or (w, h), dpi=100)
    ax = fig.add_subplot()
    finite = m[np.isfinite(m)]
    if diverging:
        lim = float(np.max(np.abs(finite))) if finite.size else 1.0
        image = ax.imshow(np.nan_to_num(m, nan=0.0, posinf=lim, neginf=-lim), cmap="RdBu_r",
                          vmin=-(lim or 1.0), vmax=lim or 1.0, aspect="auto")
    else:
        image = ax.imshow(np.nan_to_num(m), cmap="viridis", aspect="auto")
    if len(rows) <= 40:
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
    if len(cols) <= 40:
        ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=90)
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return png_data_uri(fig)


def clustered_matrix_plot(mi: np.ndarray, blocks: Sequence[tuple[int, int]], hook: str,
                          names: Sequence[str] | None = None, title: str | None = None) -> str:
    """The co-firing MI of clustered features, cluster by cluster along the diagonal, with the
    multi-member clusters boxed (`blocks`: (cluster id, size)); `names`: one tick label per
    feature (else one per cluster), `title` in place of the default."""
    fig = Figure(figsize=(7.5, 6.4), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(np.nan_to_num(mi), cmap="viridis", aspect="auto", interpolation="nearest")
    if names is not None:
        start = 0
        for _, size in blocks:
            ax.add_patch(Rectangle((start - 0.5, start - 0.5), size, size, fill=False, ec="#ff7043", lw=1.2))
            start += size
        ax.set_xticks(range(len(names)), list(names), fontsize=7, rotation=90)
        ax.set_yticks(range(len(names)), list(names), fontsize=7)
        fig.colorbar(image, ax=ax, label="MI (nats)")
        ax.set_title(title or f"Co-firing MI ({hook})", fontsize=9)
        fig.tight_layout()
        return png_data_uri(fig)
    ticks, names, start = [], [], 0
    for cluster, size in blocks:
        if size > 1 or len(blocks) <= 40:
            ticks.append(start + (size - 1) / 2)
            names.append(f"c{cluster}")
        if size > 1:
            ax.add_patch(Rectangle((start - 0.5, start - 0.5), size, size, fill=False, ec="#ff7043", lw=0.8))
        start += size
    if len(ticks) <= 60:
        ax.set_xticks(ticks, names, fontsize=6, rotation=90)
        ax.set_yticks(ticks, names, fontsize=6)
    fig.colorbar(image, ax=ax, label="MI (nats)")
    ax.set_title(f"Co-firing MI of all {len(blocks)} clusters ({hook}); boxes: multi-member clusters",
                 fontsize=9)
    fig.tight_layout()
    return png_data_uri(fig)

