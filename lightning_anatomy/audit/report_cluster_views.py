"""The report's cluster-level views: the co-firing heatmap of the top feature clusters, the data
cluster × feature cluster grids, the data-cluster table and the paper method's inside-vs-outside
table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from lightning_anatomy.audit.report_html import esc, fmt, num_td, table_html, wrap_table
from lightning_anatomy.audit.report_index import ReportIndex, build_index
from lightning_anatomy.audit.report_plots import _img, clustered_matrix_plot, heatmap

if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.audit.result import AuditResult

MAX_HEATMAP_SIDE = 30  # rows/columns of any heatmap (its best-ranked members / strongest clusters)
GRID_COLUMNS = 30  # feature clusters in the data-cluster grid heatmap (the strongest |value| ones)


def grid_heatmaps(result: AuditResult, index: ReportIndex, value: str, label: str, title: str) -> list[str]:
    """The data cluster × feature cluster heatmap of `value` (in cluster-table order): every feature
    cluster up to `GRID_COLUMNS`, else the `GRID_COLUMNS` strongest |value| ones (each cluster's
    section lists its own rows either way)."""
    local = result.local
    if local is None or local.empty:
        return []
    dcs = sorted(int(d) for d in local["data_cluster"].unique())
    present = {int(c) for c in local["cluster"]}
    fcs = [int(c) for c in index.clusters["cluster"] if int(c) in present] if len(index.clusters) else []
    fcs += sorted(present - set(fcs))
    note = ""
    if len(fcs) > GRID_COLUMNS:
        strength = local.assign(_a=local[value].abs()).groupby("cluster")["_a"].max()
        keep = {int(c) for c in strength.sort_values(ascending=False, kind="mergesort").index[:GRID_COLUMNS]}
        note = f" ({GRID_COLUMNS} strongest of {len(fcs)} clusters)"
        fcs = [f for f in fcs if f in keep]
    sizes = local.groupby("data_cluster")["n_pairs"].first()
    out = []
    for start in range(0, len(fcs), GRID_COLUMNS):
        chunk = fcs[start:start + GRID_COLUMNS]
        grid = np.full((len(dcs), len(chunk)), np.nan)
        pos_d, pos_f = {d: i for i, d in enumerate(dcs)}, {f: j for j, f in enumerate(chunk)}
        for d, f, v in local[["data_cluster", "cluster", value]].itertuples(index=False):
            if int(f) in pos_f:
                grid[pos_d[int(d)], pos_f[int(f)]] = v
        part = note or (f" (clusters {start + 1}–{start + len(chunk)} of {len(fcs)})" if len(fcs) > GRID_COLUMNS else "")
        uri = heatmap(grid, rows=[f"data {d} (n={int(sizes.loc[d])})" for d in dcs], cols=[f"fc {f}" for f in chunk],
                      title=title + part, label=label, diverging=True)
        out.append(_img(uri, f"data cluster x feature cluster heatmap{part}"))
    return out


def _cofiring_html(result: AuditResult, index: ReportIndex, per_cluster: int = 8) -> list[str]:
    """Per hook, the co-firing MI of the best-ranked multi-member clusters, up to `per_cluster` of
    each one's best-ranked members and `MAX_HEATMAP_SIDE` features in all (a full matrix of every
    clustered feature is unreadable); each tick names the feature and its cluster."""
    out = []
    for hook, mi in result.cofiring.items():
        hook = str(hook)
        pos = index.cofire_pos.get(hook, {})
        picked: list[int] = []
        blocks: list[tuple[int, int]] = []
        names: list[str] = []
        shown = index.clusters[index.clusters["hook"].astype(str) == hook] if len(index.clusters) else index.clusters
        for c in shown["cluster"].astype(int) if len(shown) else []:
            room = MAX_HEATMAP_SIDE - len(picked)
            mine = [f for f in index.members.get((hook, c), []) if f in pos][:min(room, per_cluster)]
            if len(mine) < 2:
                continue
            picked += mine
            blocks.append((c, len(mine)))
            names += [f"{f} (c{c})" for f in mine]
        if len(picked) > 1:
            idx = [pos[f] for f in picked]
            title = (f"Co-firing MI ({hook}): best-ranked members of the top {len(blocks)} of {len(shown)} "
                     "multi-member clusters")
            out.append(_img(clustered_matrix_plot(mi[np.ix_(idx, idx)], blocks, hook, names=names, title=title),
                            f"co-firing matrix {hook}"))
    return out


def heatmaps_html(result: AuditResult, index: ReportIndex) -> str:
    """The paired method's heatmaps: the full clustered co-firing matrix and the local z grid."""
    parts = _cofiring_html(result, index) + grid_heatmaps(result, index, "z", "z",
                                                   "Local paired z: data cluster × feature cluster")
    return "".join(parts) or "<p>No clusters to show.</p>"


def data_cluster_table(result: AuditResult, index: ReportIndex) -> str:
    """Per tested data cluster: its pairs, its passing local signals, and the strongest one (linked);
    "" when none was tested."""
    dc = result.data_clusters
    if dc.empty or dc["data_cluster"].nunique() < 2:
        return ""
    local = result.local if result.local is not None else pd.DataFrame()
    z = "welch_z" if result.method == "paper" else "z"
    rows = []
    for d, n in dc["data_cluster"].astype(int).value_counts().sort_index().items():
        mine = local[local["data_cluster"].astype(int) == d] if len(local) else local
        passing = mine[mine["passes"].astype(bool)] if len(mine) else mine
        if len(passing):
            best = passing.loc[passing[z].abs().astype(float).idxmax()]
            strongest = (f"{index.cluster_link(str(best['hook']), int(best['cluster']))} "
                         f"({index.cluster_label_html(str(best['hook']), int(best['cluster']))}) · Δ {fmt(best['delta'])}, "
                         f"{'Welch z' if z == 'welch_z' else 'z'} {fmt(best[z])}")
        elif len(mine):
            strongest = '<span class="unl">none passes</span>'
        else:  # not tested here (too small, or silent): nothing to show
            continue
        name = "silent" if d < 0 else str(d)
        rows.append(f'<tr><td data-v="{d}">{esc(name)}</td>{num_td(int(n))}{num_td(len(passing))}'
                    f'<td class="lbl">{strongest}</td></tr>')
    if not rows:
        return ""
    return wrap_table(["data cluster", "pairs", "passing signals", "strongest passing signal"], rows)


def paper_local_views(result: AuditResult, limit: int = 50, index: ReportIndex | None = None) -> str:
    """The data cluster × feature cluster grid (Δ heatmaps, every cluster) and the ranked
    inside-vs-outside table."""
    local = result.local
    if local is None or local.empty:
        return "<p>No data cluster × feature cluster table (fewer than two data clusters).</p>"
    index = index or build_index(result)
    parts = grid_heatmaps(result, index, "delta", "Δ", "Inside − outside disparity Δ: data cluster × feature cluster")
    silent = int((result.data_clusters["data_cluster"] < 0).sum()) if len(result.data_clusters) else 0
    parts.append(f"<p>{silent} silent pairs (symmetric activity below the "
                 f"{fmt(result.options.get('silent_percentile', 5.0))}th percentile) are set aside. Filters: |T_m| ≥ "
                 f"{fmt(result.options.get('local_min_features', 10))}, n_k ≥ {fmt(result.options.get('local_min_pairs', 25))}"
                 ", split halves (index parity) agree; ranked by |Δ_min|.</p>")
    parts.append(table_html(local.head(limit), ("rank", "data_cluster", "n_pairs", "hook", "cluster", "size",
                                                "mean_inside", "mean_outside", "delta", "welch_z", "cohens_d",
                                                "delta_min", "passes", "global_delta"), badge=True))
    return "".join(parts)


def data_cluster_views(result: AuditResult, index: ReportIndex) -> str:
    """The data clusters' views, or "" when they have nothing to show (one data cluster, or none tested)."""
    if result.method == "paper":
        if result.local is None or result.local.empty:
            return ""
        return data_cluster_table(result, index) + paper_local_views(result, index=index)
    local = result.local
    local_only = (local[local["local_only"].astype(bool)] if len(local) and "local_only" in local.columns
                  else local.head(0))
    parts = data_cluster_table(result, index)
    if len(local_only):
        parts += ("<h3>Local signals (data cluster × feature cluster, passing only locally)</h3>"
                  + table_html(local_only.head(50), ("data_cluster", "n_pairs", "hook", "cluster", "delta", "z",
                                                      "q_value", "global_delta", "global_z"), badge=True))
    return parts
