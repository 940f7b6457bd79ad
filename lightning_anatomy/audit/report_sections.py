"""The report's detail sections, one per listed concept (evidence, where it fires, its pairs, its
cluster) and one per feature cluster (members, co-firing block, examples, per data cluster), each
with a link back to its table row.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lightning_anatomy.audit.report_cluster_views import MAX_HEATMAP_SIDE
from lightning_anatomy.audit.report_html import anchor, esc, fmt, table_html
from lightning_anatomy.audit.report_index import ReportIndex, member_list, plain_text
from lightning_anatomy.audit.report_plots import _img, heatmap

if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.audit.result import AuditResult

MAX_CLUSTER_HEATMAPS = 30  # per-cluster co-firing heatmaps drawn (best-ranked multi-member clusters)


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
                    (("prompt", "pr"), ("chosen", "ch"), ("rejected", "rj")) if plain_text(row.get(side)))
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
            f"</h3>{stats}<h4>Members (best-ranked first)</h4><p>{member_list(index, hook, members, None, True)}</p>"
            f"{img}{_examples_html(index.result, c)}{_cluster_local_html(index, hook, c)}{_back(sid)}</section>")


def cluster_sections(index: ReportIndex) -> str:
    """Every cluster's section, the first `MAX_CLUSTER_HEATMAPS` with their co-firing heatmap."""
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
