"""The report's sortable tables of ranked concepts and feature clusters: each row links to its
section (and its cluster's), each section links back to `row-<section id>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from lightning_anatomy.audit.report_html import (
    anchor,
    badge_td,
    ci_td,
    direction_td,
    esc,
    legend_html,
    num_td,
    wrap_table,
)
from lightning_anatomy.audit.report_index import ReportIndex, build_index, member_list

if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.audit.result import AuditResult


STAT_KEYS = {"Δ": "delta", "d": "cohens_d", "z": "z", "Welch z": "welch_z", "q": "q_value", "Δmin": "delta_min",
             "Δlen": "delta_len_ctrl", "zlen": "z_len_ctrl", "ū": "predicted_shift", "λ": "explain_away_lambda",
             "pair AUROC": "pair_auroc", "pairs ≠": "differing_pairs"}
CONFOUNDING_STATS = ("λ", "pair AUROC", "pairs ≠")


def _confounding(rows: pd.DataFrame) -> tuple[str, ...]:
    """The confounding columns when any shown row has them (audits saved before them show none)."""
    has = "pair_auroc" in rows.columns and rows["pair_auroc"].notna().any()
    return CONFOUNDING_STATS if has else ()


def _stat_cells(r: pd.Series, stats: Sequence[str]) -> list[str]:
    cells = []
    for s in stats:
        if s == "CI":
            cells.append(ci_td(r.get("ci_low", np.nan), r.get("ci_high", np.nan)))
        else:
            cells.append(num_td(r.get(STAT_KEYS[s], np.nan)))
    return cells


def _concept_stats(method: str) -> tuple[str, ...]:
    z = "Welch z" if method == "paper" else "z"
    return ("Δ", "CI", "d", z, "q", "Δmin", "Δlen", "zlen")


def _cluster_stats(method: str) -> tuple[str, ...]:
    return ("ū", "Δmin", "Welch z", "d", "q") if method == "paper" else ("Δ", "CI", "d", "z", "q", "Δmin")


def concepts_table(index: ReportIndex) -> str:
    """The ranked concepts: each row links to its section, its cluster's section and back."""
    result = index.result
    multi_hook = result.concepts["hook"].nunique() > 1 if len(result.concepts) else False
    stats = _concept_stats(result.method) + _confounding(index.listed)
    head = ["rank", *(["hook"] if multi_hook else []), "feature", "label", "cluster", *stats, "split-half",
            "direction"]
    rows = []
    for _, r in index.listed.iterrows():
        hook, f = str(r["hook"]), int(r["feature"])
        cid = int(r["cluster"]) if "cluster" in r and pd.notna(r["cluster"]) else -1
        cluster = (index.cluster_link(hook, cid) if (hook, cid) in index.cluster_keys
                   else '<span class="unl" title="in no cluster of two or more features">–</span>')
        rows.append(
            f'<tr id="row-{anchor("concept", hook, f)}">{num_td(r["rank"])}'
            + (f'<td class="nw">{esc(hook)}</td>' if multi_hook else "")
            + f'<td class="num" data-v="{f}">{index.concept_link(hook, f)}</td>'
            + f'<td class="lbl">{index.label_html(hook, f)}</td><td data-v="{cid}">{cluster}</td>'
            + "".join(_stat_cells(r, stats)) + badge_td(r.get("split_half_agree", False))
            + direction_td(r.get("predicted_direction", "none")) + "</tr>")
    return wrap_table(head, rows) + legend_html(head)


def clusters_table(index: ReportIndex) -> str:
    """Every feature cluster: label, members (linked), statistics; each row links to its section."""
    if index.clusters.empty:
        return ("<p>No feature clusters (too few co-firing features; see cofire_min_tokens, "
                "min_cluster_size).</p>")
    stats = _cluster_stats(index.result.method) + _confounding(index.clusters)
    head = ["rank", "cluster", "size", "label (top members)", "members", *stats, "split-half", "direction"]
    rows = []
    for _, r in index.clusters.iterrows():
        hook, c = str(r["hook"]), int(r["cluster"])
        members = index.members.get((hook, c), [])
        rows.append(
            f'<tr id="row-{anchor("cluster", hook, c)}">{num_td(r.get("rank", np.nan))}'
            f'<td class="num" data-v="{c}">{index.cluster_link(hook, c, str(c))}</td>{num_td(len(members))}'
            f'<td class="lbl">{index.cluster_label_html(hook, c)}</td>'
            f'<td class="mem">{member_list(index, hook, members)}</td>' + "".join(_stat_cells(r, stats))
            + (badge_td(r["split_half_agree"]) if pd.notna(r.get("split_half_agree")) else "<td>not tested</td>")
            + direction_td(r.get("predicted_direction", "none") if pd.notna(r.get("predicted_direction")) else "none")
            + "</tr>")
    return wrap_table(head, rows) + legend_html(head)


def paper_cluster_table(result: AuditResult, limit: int | None = None) -> str:
    """The paper method's feature-cluster table (members with labels, ū, Δ_min, evidence)."""
    index = build_index(result)
    if limit is not None:
        index.clusters = index.clusters.head(limit)
    return clusters_table(index)
