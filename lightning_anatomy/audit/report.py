"""The self-contained HTML report of an audit, laid out to be navigated.

One file that opens offline: inline CSS, plots as base64 PNGs drawn with matplotlib's Agg canvas
(no pyplot, so a user's backend is untouched) and ONE inline script of our own, which sorts a
table when its header is clicked; it reads only our `data-v` attributes and cell text and moves
rows, it never writes HTML. A Content-Security-Policy admits that script (by hash), inline styles
and `data:` images, nothing else: no network, no other script. Dataset text is hostile input:
every string that reaches the page goes through `html.escape`, so a pair holding `<script>` shows
the tag instead of running it.

Navigation: each ranked-concept row links to its section `concept-<hook>-<feature>` and each
feature-cluster row to `cluster-<hook>-<id>` (`anchor` makes them valid ids); each section links
back to its row, `row-<section id>`.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.audit.prediction import PredictionCheck
    from lightning_anatomy.audit.result import AuditResult

from lightning_anatomy.audit.report_html import (  # noqa: F401  (SCRIPT, SCRIPT_TAG, esc, fmt: re-exported)
    SCRIPT,
    SCRIPT_TAG,
    anchor,
    badge_td,
    ci_td,
    details_html,
    direction_td,
    esc,
    fmt,
    html_page,
    legend_html,
    num_td,
    table_html,
    wrap_table,
)
from lightning_anatomy.audit.report_plots import (  # noqa: F401  (draw_*: re-exported)
    _figure,
    _img,
    clustered_matrix_plot,
    data_cluster_plot,
    draw_delta_histogram,
    draw_volcano,
    heatmap,
    length_control_plot,
    volcano_plot,
)

CONCEPT_COLUMNS = ("rank", "hook", "feature", "label", "cluster", "delta", "cohens_d", "z", "welch_z", "ci_low",
                   "ci_high", "q_value", "delta_min", "delta_len_ctrl", "z_len_ctrl", "predicted_direction")

MAX_CLUSTER_HEATMAPS = 30  # per-cluster co-firing heatmaps drawn (best-ranked multi-member clusters)
MAX_HEATMAP_SIDE = 30  # rows/columns of any heatmap (its best-ranked members / strongest clusters)
GRID_COLUMNS = 30  # feature clusters in the data-cluster grid heatmap (the strongest |value| ones)
SUMMARY_CONCEPTS = 4  # concepts per direction in "What DPO will learn from this data"


def train_command(concept_set_dir: str, *, policy: str | None = None, source: str | None = None) -> str:
    """The command that trains with an edited concept set (the one place that spells it): the tiny
    fit config with the audited model and data, plus a gradient projection of the suppressed concepts."""
    parts = ["anatomy fit --config configs/tiny.yaml"]
    parts += [f"--model.policy={policy}"] if policy else []
    parts += [f"--data.source={source}"] if source else []
    parts += ["--trainer.callbacks+=lightning_anatomy.ConceptProjection",
              f"--trainer.callbacks.concepts={concept_set_dir}", "--trainer.callbacks.layers=all_later"]
    return " ".join(parts)


# ---- what the page knows about each concept and cluster --------------------------------------------------


def _text(v: Any) -> str:
    return v.strip() if isinstance(v, str) else ""


@dataclass
class ReportIndex:
    """Lookups shared by the tables and sections: labels, contexts, pairs, cluster members, ids."""

    result: AuditResult
    listed: pd.DataFrame
    labels: dict[tuple[str, int], str]
    contexts: dict[tuple[str, int], list[dict[str, Any]]]
    pairs: dict[tuple[str, int], pd.DataFrame]
    clusters: pd.DataFrame
    members: dict[tuple[str, int], list[int]]
    local: dict[tuple[str, int], pd.DataFrame]  # the local table's rows per (hook, feature cluster)
    cofire_pos: dict[str, dict[int, int]]  # row of each clustered feature in `cofiring[hook]`

    def __post_init__(self) -> None:
        self.listed_keys = {(str(h), int(f)) for h, f in self.listed[["hook", "feature"]].itertuples(index=False)}
        self.cluster_keys = set(self.members)

    def label(self, hook: str, feature: int) -> tuple[str, bool]:
        """(plain-text label, whether it is a real one): the audit's label, else the (up to three)
        tokens the feature fires on hardest in its stored contexts, else "feature <id>" (unlabelled)."""
        real = self.labels.get((hook, feature))
        if real:
            return real, True
        tokens = list(dict.fromkeys(_text(c.get("token")) for c in self.contexts.get((hook, feature), [])
                                    if _text(c.get("token"))))[:3]
        if tokens:
            return "fires on " + ", ".join(f"“{t}”" for t in tokens), False
        return f"feature {feature}", False

    def label_html(self, hook: str, feature: int) -> str:
        text, real = self.label(hook, feature)
        if real or text != f"feature {feature}":
            return esc(text)
        why = ("no label in this audit: only the top audit.top_k_trace concepts (and the best "
               "audit.cluster_label_members members of the top clusters) are labelled (concepts.labels), "
               "or pass labels={(hook, feature): text}")
        return f'<span class="unl" title="{esc(why)}">unlabelled</span> · {esc(text)}'

    def cluster_label_html(self, hook: str, cluster: int, n: int = 3) -> str:
        """The labels of the cluster's best-ranked labelled members, or an "unlabelled" marker."""
        names = [self.labels[(hook, f)] for f in self.members.get((hook, cluster), []) if (hook, f) in self.labels][:n]
        if names:
            return " · ".join(esc(s) for s in names)
        return '<span class="unl">unlabelled</span> (no member has a label)'

    def concept_link(self, hook: str, feature: int, text: str | None = None) -> str:
        shown = esc(text if text is not None else feature)
        if (hook, feature) in self.listed_keys:
            return f'<a href="#{anchor("concept", hook, feature)}">{shown}</a>'
        return shown

    def cluster_link(self, hook: str, cluster: int, text: str | None = None) -> str:
        shown = esc(text if text is not None else f"c{cluster}")
        if (hook, cluster) in self.cluster_keys:
            return f'<a href="#{anchor("cluster", hook, cluster)}">{shown}</a>'
        return shown


def _real_labels(concepts: pd.DataFrame) -> dict[tuple[str, int], str]:
    if "label" not in concepts.columns:
        return {}
    return {(str(h), int(f)): _text(lbl) for h, f, lbl in concepts[["hook", "feature", "label"]].itertuples(index=False)
            if _text(lbl)}


def _contexts_by_concept(contexts: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    out: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for c in contexts:
        out.setdefault((str(c.get("hook")), int(c.get("feature", -1))), []).append(dict(c))
    return out


def _groups(frame: pd.DataFrame | None, keys: list[str]) -> list[tuple[tuple[Any, ...], pd.DataFrame]]:
    """`frame.groupby(keys)` in order; nothing for an empty table or one without the key columns
    (an empty audit still renders)."""
    if frame is None or frame.empty or not set(keys) <= set(frame.columns):
        return []
    return list(frame.groupby(keys, sort=False))


def _pairs_by_concept(result: AuditResult, listed: pd.DataFrame) -> dict[tuple[str, int], pd.DataFrame]:
    """Stored traces, plus the listed concepts they lack traced from the span features when the
    result carries them (so every listed concept shows its pairs, not only the traced top ones)."""
    from lightning_anatomy.audit.tracing import trace_pairs

    out = {(str(h), int(f)): part for (h, f), part in _groups(result.traces, ["hook", "feature"])}
    features = result.features
    if features is None:
        return out
    k = int(result.options.get("trace_pairs", 5))
    missing = [(str(h), int(f)) for h, f in listed[["hook", "feature"]].itertuples(index=False)
               if (str(h), int(f)) not in out and str(h) in features.d_sae]
    for hook in dict.fromkeys(h for h, _ in missing):
        ids = [f for h, f in missing if h == hook]
        try:
            traced = trace_pairs(features, hook, ids, stat=result.stat, k=k, rows=result.rows,
                                 snippet_chars=int(result.options.get("snippet_chars", 200)))
        except KeyError:  # the stored features lack this stat: keep what is stored
            continue
        out.update({(hook, int(f)): part for f, part in traced.groupby("feature", sort=False)})
    return out


def _all_clusters(result: AuditResult) -> pd.DataFrame:
    """The cluster table, plus a members-only row for every assigned cluster it lacks (never tested)."""
    table = result.clusters.copy()
    assign = result.feature_clusters
    if assign.empty:
        return table
    have = {(str(h), int(c)) for h, c in table[["hook", "cluster"]].itertuples(index=False)} if len(table) else set()
    extra = [{"hook": str(h), "cluster": int(c), "size": len(part), "features": [int(f) for f in part["feature"]]}
             for (h, c), part in _groups(assign, ["hook", "cluster"]) if (str(h), int(c)) not in have]
    return pd.concat([table, pd.DataFrame(extra)], ignore_index=True) if extra else table


def _members(result: AuditResult, clusters: pd.DataFrame) -> dict[tuple[str, int], list[int]]:
    """Members per (hook, cluster), best-ranked concept first (untested features last, by id)."""
    rank = {(str(h), int(f)): int(r) for h, f, r in result.concepts[["hook", "feature", "rank"]].itertuples(index=False)}
    out = {}
    for _, row in clusters.iterrows():
        hook = str(row["hook"])
        feats = [int(f) for f in (row["features"] if isinstance(row.get("features"), list | np.ndarray) else [])]
        out[(hook, int(row["cluster"]))] = sorted(feats, key=lambda f: (rank.get((hook, f), 1 << 62), f))
    for (h, c), part in _groups(result.feature_clusters, ["hook", "cluster"]):
        key = (str(h), int(c))
        if key in out and not out[key]:
            out[key] = sorted((int(f) for f in part["feature"]), key=lambda f: (rank.get((key[0], f), 1 << 62), f))
    return out


def _cofire_positions(result: AuditResult) -> dict[str, dict[int, int]]:
    out = {}
    for hook, mi in result.cofiring.items():
        order = result.feature_clusters.loc[result.feature_clusters["hook"] == hook, "feature"].astype(int).tolist()
        out[str(hook)] = {f: i for i, f in enumerate(order[: mi.shape[0]])}
    return out


def build_index(result: AuditResult, max_concepts: int = 100) -> ReportIndex:
    """Everything the tables and sections look up, computed once per page."""
    listed = result.concepts.head(max_concepts)
    clusters = _all_clusters(result)
    members = _members(result, clusters)
    if len(clusters):  # a cluster of one member (the paired method's leftovers) is no structure to show
        keep = [len(members.get((str(h), int(c)), [])) > 1 for h, c in clusters[["hook", "cluster"]].itertuples(index=False)]
        clusters = clusters[np.asarray(keep, dtype=bool)].reset_index(drop=True)
        members = {k: v for k, v in members.items() if len(v) > 1}
    local = result.local
    by_cluster = {(str(h), int(c)): part for (h, c), part in _groups(local, ["hook", "cluster"])}
    return ReportIndex(result=result, listed=listed, labels=_real_labels(result.concepts),
                       contexts=_contexts_by_concept(result.contexts), pairs=_pairs_by_concept(result, listed),
                       clusters=clusters, members=members, local=by_cluster,
                       cofire_pos=_cofire_positions(result))


# ---- tables --------------------------------------------------------------------------------------------


STAT_KEYS = {"Δ": "delta", "d": "cohens_d", "z": "z", "Welch z": "welch_z", "q": "q_value", "Δmin": "delta_min",
             "Δlen": "delta_len_ctrl", "zlen": "z_len_ctrl", "ū": "predicted_shift"}


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
    stats = _concept_stats(result.method)
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


def _member_list(index: ReportIndex, hook: str, members: Sequence[int], limit: int | None = 8,
                 labels: bool = False) -> str:
    shown = list(members) if limit is None else list(members)[:limit]
    items = []
    for f in shown:
        item = index.concept_link(hook, f)
        if labels and (hook, f) in index.labels:
            item += f" <small>({esc(index.labels[(hook, f)])})</small>"
        items.append(item)
    more = f" … (+{len(members) - len(shown)})" if len(members) > len(shown) else ""
    return ", ".join(items) + more


def clusters_table(index: ReportIndex) -> str:
    """Every feature cluster: label, members (linked), statistics; each row links to its section."""
    if index.clusters.empty:
        return ("<p>No feature clusters (too few co-firing features; see cofire_min_tokens, "
                "min_cluster_size).</p>")
    stats = _cluster_stats(index.result.method)
    head = ["rank", "cluster", "size", "label (top members)", "members", *stats, "split-half", "direction"]
    rows = []
    for _, r in index.clusters.iterrows():
        hook, c = str(r["hook"]), int(r["cluster"])
        members = index.members.get((hook, c), [])
        rows.append(
            f'<tr id="row-{anchor("cluster", hook, c)}">{num_td(r.get("rank", np.nan))}'
            f'<td class="num" data-v="{c}">{index.cluster_link(hook, c, str(c))}</td>{num_td(len(members))}'
            f'<td class="lbl">{index.cluster_label_html(hook, c)}</td>'
            f'<td class="mem">{_member_list(index, hook, members)}</td>' + "".join(_stat_cells(r, stats))
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


# ---- sections ------------------------------------------------------------------------------------------


_MARKED = re.compile(r"«(.+?)»\((-?\d+(?:\.\d+)?)\)", re.S)


def highlighted_context(text: str, peak: float) -> str:
    """A `concepts.labels` context (`«token»(activation)` marks the firing tokens) as escaped HTML,
    each marked token on a background whose opacity is its activation relative to the peak."""
    parts, last = [], 0
    top = peak if peak > 0 else 1.0
    for m in _MARKED.finditer(text):
        parts.append(esc(text[last:m.start()]))
        act = float(m.group(2))
        alpha = max(0.05, min(1.0, act / top))
        parts.append(f'<span title="{act:.3g}" style="background:rgba(255,140,0,{alpha:.2f})">{esc(m.group(1))}</span>')
        last = m.end()
    parts.append(esc(text[last:]))
    return '<div class="tok">' + "".join(parts) + "</div>"


def _contexts_html(contexts: Sequence[Mapping[str, Any]], limit: int = 5) -> str:
    if not contexts:
        return ("<h4>Where it fires</h4><p class=\"unl\">No token contexts stored for this concept: the audit reads "
                "them for its top <code>audit.top_k_trace</code> concepts only, with a model at hand.</p>")
    blocks = [f'<div class="pair"><small>{esc(c.get("source", ""))} · peak {fmt(float(c.get("activation", 0.0)))}'
              f"</small>{highlighted_context(str(c.get('text', '')), float(c.get('activation', 0.0)))}</div>"
              for c in list(contexts)[:limit]]
    return "<h4>Where it fires (firing tokens highlighted)</h4>" + "".join(blocks)


def _texts_html(row: pd.Series) -> str:
    """A pair's prompt / chosen / rejected snippets, or a note where the result holds no texts."""
    texts = "".join(f'<pre class="{cls}">{esc(row[side])}</pre>' for side, cls in
                    (("prompt", "pr"), ("chosen", "ch"), ("rejected", "rj")) if _text(row.get(side)))
    return texts or '<br><small class="unl">(no texts in this result: the audit ran or was loaded without its rows)</small>'


def _pair_html(tr: pd.Series) -> str:
    return (
        f'<div class="pair"><small>row {esc(tr["row_id"])} · contribution {fmt(tr["contribution"])} '
        f'(chosen {fmt(tr["chosen_value"])}, rejected {fmt(tr["rejected_value"])}) · share {fmt(tr["share"])}</small>'
        f"{_texts_html(tr)}</div>")


def _pairs_html(pairs: pd.DataFrame | None, has_features: bool) -> str:
    if pairs is None or pairs.empty:
        why = ("no pair leans the way of this concept's Δ" if has_features
               else "not traced (only the top audit.top_k_trace concepts are stored without span features)")
        return f'<h4>Pairs contributing most</h4><p class="unl">No pairs: {why}.</p>'
    return "<h4>Pairs contributing most</h4>" + "".join(_pair_html(tr) for _, tr in pairs.iterrows())


def _back(sid: str) -> str:
    return f'<p class="back"><a href="#row-{sid}">↑ back to its row in the table</a></p>'


def concept_section(index: ReportIndex, r: pd.Series) -> str:
    """One listed concept: evidence, where it fires, its pairs, its cluster, a link back."""
    hook, f = str(r["hook"]), int(r["feature"])
    sid = anchor("concept", hook, f)
    cid = int(r["cluster"]) if "cluster" in r and pd.notna(r["cluster"]) else -1
    cluster = f" · cluster {index.cluster_link(hook, cid)}" if (hook, cid) in index.cluster_keys else ""
    direction = esc(r.get("predicted_direction", "none"))
    stats = (f"<p>Δ {fmt(r['delta'])} [{fmt(r.get('ci_low', np.nan))}, {fmt(r.get('ci_high', np.nan))}], "
             f"d {fmt(r['cohens_d'])}, q {fmt(r['q_value'])}, split halves "
             f"{'agree' if bool(r.get('split_half_agree', False)) else 'disagree'}, predicted "
             f'<span class="{direction}">{direction}</span>{cluster} · name in concepts.yaml: '
             f"<code>{esc(f'{hook}:{f}')}</code></p>")
    return (f'<section class="item" id="{sid}"><h3>#{fmt(r["rank"])} · {esc(hook)} · feature {f} — '
            f"{index.label_html(hook, f)}</h3>{stats}{_contexts_html(index.contexts.get((hook, f), []))}"
            f"{_pairs_html(index.pairs.get((hook, f)), index.result.features is not None)}{_back(sid)}</section>")


def _cluster_mi(index: ReportIndex, hook: str, members: Sequence[int]) -> tuple[list[str], np.ndarray] | None:
    """(member names, their block of the stored co-firing MI); None without a matrix or with fewer
    than two members in it."""
    mi = index.result.cofiring.get(hook)
    if mi is None:
        return None
    pos = index.cofire_pos[hook]
    kept = [f for f in members if f in pos]
    if len(kept) < 2:
        return None
    idx = [pos[f] for f in kept]
    return [str(f) for f in kept], mi[np.ix_(idx, idx)]


def _examples_html(result: AuditResult, cluster: int, limit: int = 3) -> str:
    ex = result.cluster_examples
    if ex is None or ex.empty:
        return ""
    mine = ex[ex["cluster"] == cluster].head(limit)
    out = []
    for _, e in mine.iterrows():
        out.append(f'<div class="pair"><small>row {esc(e["row_id"])} · u {fmt(float(e["u"]))}</small>'
                   f"{_texts_html(e)}</div>")
    return "<h4>Pairs leaning most with the cluster</h4>" + "".join(out) if out else ""


def _cluster_local_html(index: ReportIndex, hook: str, cluster: int) -> str:
    mine = index.local.get((hook, cluster))
    if mine is None or mine.empty:
        return ""
    z = "welch_z" if index.result.method == "paper" else "z"
    return ("<h4>Per data cluster (inside vs. the rest)</h4>"
            + table_html(mine, ("data_cluster", "n_pairs", "delta", z, "delta_min", "q_value", "passes")))


def cluster_section(index: ReportIndex, r: pd.Series, heatmap_uri: str | None) -> str:
    """One feature cluster: label, every member (labelled, linked), its co-firing block, examples."""
    hook, c = str(r["hook"]), int(r["cluster"])
    sid = anchor("cluster", hook, c)
    members = index.members.get((hook, c), [])
    tested = pd.notna(r.get("q_value", np.nan))
    stats = (f"<p>{len(members)} members · Δ {fmt(r.get('delta', np.nan))}, ū {fmt(r.get('predicted_shift', np.nan))}, "
             f"Δmin {fmt(r.get('delta_min', np.nan))}, q {fmt(r.get('q_value', np.nan))}, predicted "
             f"<span class=\"{esc(r.get('predicted_direction', 'none'))}\">{esc(r.get('predicted_direction', 'none'))}"
             "</span></p>" if tested else f"<p>{len(members)} members · not tested.</p>")
    img = _img(heatmap_uri, f"co-firing of cluster {c}") if heatmap_uri else ""
    return (f'<section class="item" id="{sid}"><h3>Cluster {c} ({esc(hook)}) — {index.cluster_label_html(hook, c)}'
            f"</h3>{stats}<h4>Members (best-ranked first)</h4><p>{_member_list(index, hook, members, None, True)}</p>"
            f"{img}{_examples_html(index.result, c)}{_cluster_local_html(index, hook, c)}{_back(sid)}</section>")


def cluster_sections(index: ReportIndex) -> str:
    parts, drawn = [], 0
    for _, r in index.clusters.iterrows():
        hook, c = str(r["hook"]), int(r["cluster"])
        uri = None
        block = _cluster_mi(index, hook, index.members.get((hook, c), []))
        if block is not None and drawn < MAX_CLUSTER_HEATMAPS:
            names, mi = block[0][:MAX_HEATMAP_SIDE], block[1][:MAX_HEATMAP_SIDE, :MAX_HEATMAP_SIDE]
            side = min(5.0, 2.2 + 0.15 * len(names))
            uri = heatmap(mi, rows=names, cols=names, label="MI (nats)", diverging=False,
                          title=f"co-firing MI, cluster {c}", size=(side + 1.2, side))
            drawn += 1
        parts.append(cluster_section(index, r, uri))
    return "".join(parts) or "<p>No feature clusters.</p>"


# ---- heatmaps and the data clusters ----------------------------------------------------------------------


def _grid_heatmaps(result: AuditResult, index: ReportIndex, value: str, label: str, title: str) -> list[str]:
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


def _heatmaps_html(result: AuditResult, index: ReportIndex) -> str:
    """The paired method's heatmaps: the full clustered co-firing matrix and the local z grid."""
    parts = _cofiring_html(result, index) + _grid_heatmaps(result, index, "z", "z",
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
    parts = _grid_heatmaps(result, index, "delta", "Δ", "Inside − outside disparity Δ: data cluster × feature cluster")
    silent = int((result.data_clusters["data_cluster"] < 0).sum()) if len(result.data_clusters) else 0
    parts.append(f"<p>{silent} silent pairs (symmetric activity below the "
                 f"{fmt(result.options.get('silent_percentile', 5.0))}th percentile) are set aside. Filters: |T_m| ≥ "
                 f"{fmt(result.options.get('local_min_features', 10))}, n_k ≥ {fmt(result.options.get('local_min_pairs', 25))}"
                 ", split halves (index parity) agree; ranked by |Δ_min|.</p>")
    parts.append(table_html(local.head(limit), ("rank", "data_cluster", "n_pairs", "hook", "cluster", "size",
                                                "mean_inside", "mean_outside", "delta", "welch_z", "cohens_d",
                                                "delta_min", "passes", "global_delta"), badge=True))
    return "".join(parts)


# ---- prediction check --------------------------------------------------------------------------------------


def prediction_section(check: PredictionCheck) -> str:
    """The report section of a `check_prediction` result: numbers, scatter, per-cluster table."""
    st = check.settings
    uri = "data:image/png;base64," + base64.b64encode(check.scatter_png()).decode("ascii")
    lo, hi = check.r2_ci
    rows = [("R² (squared Pearson)", check.r2), (f"{fmt(100 * st.get('confidence', 0.95))}% bootstrap CI over clusters",
                                                 f"[{fmt(lo)}, {fmt(hi)}]"),
            ("R² (OLS through the origin)", check.r2_ols), ("sign agreement", check.sign_agreement),
            ("clusters", check.n_clusters), ("prompts × samples", f"{st.get('n_prompts')} × {st.get('samples_per_prompt')}"),
            ("temperature / max new tokens", f"{st.get('temperature')} / {st.get('max_new_tokens')}"),
            ("measure (τ)", f"{st.get('measure')} ({st.get('tau')})"), ("encoded with", st.get("encode_with"))]
    summary = "".join(f"<tr><td>{esc(k)}</td><td>{fmt(v) if not isinstance(v, str) else esc(v)}</td></tr>" for k, v in rows)
    examples = "".join(f'<div class="pair"><pre class="pr">{esc(e["prompt"])}</pre><small>before</small>'
                       f'<pre class="rj">{esc(e["before"])}</pre><small>after</small><pre class="ch">{esc(e["after"])}</pre></div>'
                       for e in check.examples)
    table = check.table.reindex(check.table["observed"].abs().sort_values(ascending=False).index).head(50)
    return ('<h2 id="prediction">Prediction check: predicted vs observed cluster shifts on rollouts</h2>'
            f'<table class="summary">{summary}</table><img alt="prediction scatter" src="{uri}">'
            + table_html(table, ("hook", "cluster", "n_features", "label", "predicted", "observed", "before", "after"))
            + (f"<h3>Example rollouts</h3>{examples}" if examples else ""))


def prediction_page(check: PredictionCheck, *, title: str = "Prediction check") -> str:
    """`prediction_section` as one offline HTML page."""
    return html_page(title, prediction_section(check))


# ---- the page ------------------------------------------------------------------------------------------


def pair_auroc(diff: np.ndarray) -> float:
    """AUROC of a concept's paired difference ΔA = A(chosen) − A(rejected) for "chosen": the
    probability that a pair's ΔA, read chosen-first, exceeds another pair's read rejected-first
    (−ΔA), ties counting half (Mann–Whitney). 0.5: the concept says nothing about which side is
    chosen; 1 (0): it is always higher in the chosen (rejected) response."""
    d = np.asarray(diff, dtype=np.float64)
    d = d[np.isfinite(d)]
    if not len(d):
        return float("nan")
    neg = np.sort(-d)
    below = np.searchsorted(neg, d, side="left")  # negatives strictly below each positive
    ties = np.searchsorted(neg, d, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (len(d) * len(d)))


def preference_auroc(result: AuditResult, hook: str, feature: int, cohens_d: float) -> tuple[float, bool]:
    """(AUROC of ΔA for "chosen", exact): from the result's span features when it carries them,
    else the normal approximation Φ(√2·d) from the paired effect size d (exact=False)."""
    features = result.features
    if features is not None and hook in features.d_sae:
        try:
            chosen = features.get(hook, "chosen", result.stat)[:, int(feature)]
            rejected = features.get(hook, "rejected", result.stat)[:, int(feature)]
        except KeyError:  # the stored features lack this stat
            pass
        else:
            return pair_auroc(np.asarray((chosen - rejected).todense()).ravel()), True
    d = float(cohens_d) if pd.notna(cohens_d) else float("nan")
    return (0.5 * (1.0 + math.erf(d)) if np.isfinite(d) else float("nan")), False  # Φ(√2·d)


def _summary_row(index: ReportIndex, r: pd.Series) -> str:
    hook, f = str(r["hook"]), int(r["feature"])
    text, _ = index.label(hook, f)
    delta = float(r.get("delta", np.nan))
    auc, exact = preference_auroc(index.result, hook, f, r.get("cohens_d", np.nan))
    what = '<span class="amplify">↑ amplifies</span>' if delta > 0 else '<span class="suppress">↓ suppresses</span>'
    more = "" if text == f"feature {f}" else f" <small>· feature {f}</small>"
    return (f'<tr><td><a href="#{anchor("concept", hook, f)}">{esc(text)}</a>{more}</td><td>{what}</td>'
            f"<td>{'chosen' if delta > 0 else 'rejected'}</td><td>{fmt(r.get('cohens_d', np.nan))}</td>"
            f"<td>{fmt(delta)}</td><td>{'' if exact else '≈'}{_auc_text(auc)}</td></tr>")


def _auc_text(auc: float) -> str:
    return f"{auc:.3f}" if np.isfinite(auc) else "–"


def _side(n: int, action: str, side: str) -> str:
    return f'<span class="{action}">{action}</span> {n} {side}-leaning concept{"" if n == 1 else "s"}'


def dpo_summary_html(index: ReportIndex) -> str:
    """"What will DPO learn from this data?": the passing concepts' count by direction and the
    strongest of each side with its label, direction, effect size and confounding with the preference."""
    result = index.result
    c = result.concepts
    passing = c[c["passes"].astype(bool)] if "passes" in c.columns else c.head(0)
    n_up = int((passing["delta"] > 0).sum())
    n_down = int((passing["delta"] < 0).sum())
    o = result.options
    n_pairs = o.get("n_pairs", "?")
    if len(passing):
        lead = (f"<p><b>{len(passing)}</b> of {fmt(o.get('n_tested', len(c)))} tested concepts (SAE features) differ "
                f"reliably between the chosen and the rejected responses of these {fmt(n_pairs)} pairs (q &lt; "
                f"{fmt(o.get('alpha', 0.05))}, split halves agree). DPO on this data is predicted to "
                f"{_side(n_up, 'amplify', 'chosen')} and {_side(n_down, 'suppress', 'rejected')}. The strongest:</p>")
        shown = pd.concat([passing[passing["delta"] > 0].head(SUMMARY_CONCEPTS),
                           passing[passing["delta"] < 0].head(SUMMARY_CONCEPTS)]).sort_values("rank", kind="mergesort")
    else:
        lead = (f"<p><b>No concept passes</b> (q &lt; {fmt(o.get('alpha', 0.05))} with split halves agreeing) among "
                f"{fmt(o.get('n_tested', len(c)))} tested in {fmt(n_pairs)} pairs: this data gives DPO no reliable "
                "concept-level signal at this size. The strongest candidates, for what they are worth:</p>")
        shown = c.head(SUMMARY_CONCEPTS)
    rows = "".join(_summary_row(index, r) for _, r in shown.iterrows())
    head = ("<tr><th>concept (what it fires on)</th><th>DPO</th><th>leans to</th>"
            '<th title="Cohen\'s d_z: Δ / sd of the paired differences">effect d</th>'
            '<th title="mean chosen − rejected difference of the span statistic">Δ</th>'
            '<th title="AUROC of ΔA for chosen">AUROC (chosen)</th></tr>')
    note = ("<p><small>Effect d: 0.2 small, 0.5 medium, 0.8 large. AUROC (chosen): how well the concept alone "
            "tells which response of a pair was chosen (0.5: unrelated to the preference; near 1 or 0: the "
            "preference and the concept go together, so DPO learns the concept along with whatever the "
            "labellers preferred)." + (" ≈: estimated from d (the result carries no per-pair features)."
                                        if "<td>≈" in rows else "")
            + " Each row links to the concept's contexts and pairs.</small></p>")
    return (f'<div class="learn" id="learn"><h2>What will DPO learn from this data?</h2>{lead}'
            f"<table>{head}{rows}</table>{note}</div>")




def summary_rows(result: AuditResult) -> list[tuple[str, Any]]:
    """The audit's headline numbers (the report's summary table; also `scripts/docs_images.py`)."""
    o = result.options
    rows = [("pairs", o.get("n_pairs")), ("hooks", ", ".join(map(str, o.get("hooks", [])))),
            ("span statistic", o.get("stat")), ("features tested", o.get("n_tested")),
            ("passing (q < α and split-half)", o.get("n_passing")), ("α", o.get("alpha")),
            ("bootstrap replicates", o.get("n_bootstrap")),
            ("mean chosen − rejected length (tokens)", o.get("mean_length_diff", float("nan")))]
    if result.method == "paper":
        rows.insert(1, ("method", "paper (feature-conditioned, Bergen et al. App. B.1)"))
        rows.insert(4, ("feature clusters", o.get("n_feature_clusters")))
    else:
        rows.insert(1, ("method", "paired (per-feature paired statistics)"))
        rows.insert(4, ("feature clusters", result.clusters["cluster"].nunique() if len(result.clusters) else 0))
    return rows


def next_steps_html(result: AuditResult, concept_set_dir: str, command: str) -> str:
    """The box that says what to do with this report: mark concepts, then train with them."""
    missing = ("" if result.saes else
               "<p><small>This result carries no SAEs, so saving it writes no concept set; make one with "
               "<code>result.to_concept_set(top=N, saes={hook: sae}).save(dir)</code>.</small></p>")
    return ('<div class="next" id="next"><h2>What to do next</h2><ol>'
            f"<li>Read the concepts below, then edit <code>{esc(concept_set_dir)}/concepts.yaml</code>: set "
            "<code>action: suppress</code>, <code>amplify</code> or <code>allow</code> per concept (each starts as "
            "<code>allow</code>; a concept's name there, <code>hook:feature</code>, is in its section).</li>"
            f"<li>Train with it:<pre><code>{esc(command)}</code></pre></li></ol>{missing}</div>")


def _method_note(result: AuditResult) -> str:
    o = result.options
    if result.method == "paper":
        return ("<p>Method <b>paper</b>: a feature is active in a response when its firing frequency exceeds "
                f"τ = {fmt(o.get('tau', 0.01))}. Per pair and feature cluster, u = mean over members of "
                "1{chosen active} − 1{rejected active}; a cluster's predicted DPO shift is the dataset-wide "
                "mean ū. Split halves by index parity; Δ_min (the smaller half's Δ) ranks. Per-feature rows "
                "below use the same active indicator.</p>")
    return ("<p>Δ is the mean paired chosen − rejected difference of the span statistic; d = Δ/sd of the "
            "paired differences (d<sub>z</sub>); z the paired z, q the Benjamini–Hochberg q-value; "
            "'agree' means both fixed split halves give Δ of the same sign. Δ<sub>len</sub> is Δ at equal "
            "completion lengths. The predicted DPO effect follows the sign of Δ.</p>")


def _plots_html(result: AuditResult) -> str:
    concepts = result.concepts
    uris = [(volcano_plot(concepts), "volcano plot"), (_figure(draw_delta_histogram, concepts), "histogram of delta"),
            (length_control_plot(concepts), "length control scatter"),
            (data_cluster_plot(result), "per data cluster signals")]
    return '<div class="plots">' + "".join(_img(u, alt) for u, alt in uris if u) + "</div>"


def _data_cluster_parts(result: AuditResult, index: ReportIndex) -> str:
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


def render_report(result: AuditResult, *, max_concepts: int = 100, title: str = "Dataset anatomy",
                  prediction: PredictionCheck | None = None, next_command: str | None = None,
                  concept_set_dir: str | None = None) -> str:
    """The full HTML page of `result` (a string; `AuditResult.save` writes it as report.html), with
    the section of a `check_prediction` result when `prediction` is given.

    On top, what DPO will learn from this data (`dpo_summary_html`) and what to do next; below, the
    ranked concepts and the detail sections, collapsed (`<details>`: a link into one opens it), the
    views with nothing to show left out.

    `concept_set_dir` is where the ConceptSet export lies (`AuditResult.save` passes
    `<audit dir>/concept_set`); `next_command` the training command the page suggests (None:
    `train_command(concept_set_dir)`).
    """
    summary = "".join(f"<tr><td>{esc(k)}</td><td>{fmt(v)}</td></tr>" for k, v in summary_rows(result))
    if result.concepts.empty or not {"hook", "feature", "rank"} <= set(result.concepts.columns):
        return html_page(title, f'<h1>{esc(title)}</h1><table class="summary">{summary}</table>'
                                "<p>No feature was tested (none fired often enough): nothing to rank.</p>")
    index = build_index(result, max_concepts)
    concept_set_dir = concept_set_dir or "<audit dir>/concept_set"
    command = next_command if next_command is not None else train_command(concept_set_dir)
    n = len(result.concepts)
    n_clusters = len(index.clusters)
    # (id, title, hint shown while closed, body, open)
    blocks: list[tuple[str, str, str, str, bool]] = [
        ("about", "Audit settings and method", f"{fmt(result.options.get('n_pairs'))} pairs, "
         f"{fmt(result.options.get('n_tested'))} features tested, method {result.method}",
         f'<table class="summary">{summary}</table>{_method_note(result)}', False),
        ("plots", "Plots", "volcano, Δ distribution, length control, data clusters", _plots_html(result), False),
        ("concepts", f"Ranked concepts (top {min(max_concepts, n)} of {n})", "click a header to sort",
         "<p>Click a feature for its contexts and pairs, a cluster for its members.</p>" + concepts_table(index), True),
    ]
    if n_clusters:
        body = clusters_table(index)
        if result.method != "paper":
            heat = _heatmaps_html(result, index)
            body += f"<h3>Cluster heatmaps</h3>{heat}" if "<img" in heat else ""
        name = "Feature clusters (co-firing, Leiden)" if result.method == "paper" else "Feature clusters"
        blocks.append(("clusters", name, f"{n_clusters} clusters of two or more co-firing features", body, False))
    data_views = _data_cluster_parts(result, index)
    if data_views:
        name = ("Data cluster × feature cluster (inside vs outside)" if result.method == "paper"
                else "Data clusters")
        blocks.append(("data-clusters", name, "signals inside groups of similar prompts", data_views, False))
    blocks.append(("concept-details", "Concept details", f"{len(index.listed)} concepts: where each fires, its pairs",
                   "".join(concept_section(index, r) for _, r in index.listed.iterrows()), False))
    if n_clusters:
        blocks.append(("cluster-details", "Cluster details", "members, co-firing, examples", cluster_sections(index),
                       False))
    toc = [("learn", "What DPO will learn"), ("next", "What to do next"), *((b[0], b[1].split(" (")[0]) for b in blocks)]
    toc += [("prediction", "Prediction check")] if prediction is not None else []
    sections = [
        f"<h1>{esc(title)}</h1>", dpo_summary_html(index), next_steps_html(result, concept_set_dir, command),
        '<nav class="toc">' + "".join(f'<a href="#{k}">{esc(v)}</a>' for k, v in toc) + "</nav>",
        *(details_html(sid, name, body, hint, open_=is_open) for sid, name, hint, body, is_open in blocks),
    ]
    if prediction is not None:
        sections.append(prediction_section(prediction))
    return html_page(title, "".join(sections))
