"""What the report knows about each concept and cluster, computed once per page: labels (or the
tokens a concept fires on), contexts, traced pairs, cluster members best-ranked first, and the links
between a table row and its section (`ReportIndex`, `build_index`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lightning_anatomy.audit.report_html import anchor, esc

if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.audit.result import AuditResult


def plain_text(v: Any) -> str:
    """A stripped string, or "" for anything else (a missing label or text is NaN in a table)."""
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
        tokens = list(dict.fromkeys(plain_text(c.get("token")) for c in self.contexts.get((hook, feature), [])
                                    if plain_text(c.get("token"))))[:3]
        if tokens:
            return "fires on " + ", ".join(f"“{t}”" for t in tokens), False
        return f"feature {feature}", False

    def label_html(self, hook: str, feature: int) -> str:
        """`label` as escaped HTML; a concept with neither label nor contexts is marked "unlabelled",
        with a tooltip that says which concepts get labels and how to pass one."""
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
        """`text` (default: the feature id) linked to the concept's section when it is listed, else plain."""
        shown = esc(text if text is not None else feature)
        if (hook, feature) in self.listed_keys:
            return f'<a href="#{anchor("concept", hook, feature)}">{shown}</a>'
        return shown

    def cluster_link(self, hook: str, cluster: int, text: str | None = None) -> str:
        """`text` (default: "c<id>") linked to the cluster's section when it has one, else plain."""
        shown = esc(text if text is not None else f"c{cluster}")
        if (hook, cluster) in self.cluster_keys:
            return f'<a href="#{anchor("cluster", hook, cluster)}">{shown}</a>'
        return shown


def _real_labels(concepts: pd.DataFrame) -> dict[tuple[str, int], str]:
    if "label" not in concepts.columns:
        return {}
    return {(str(h), int(f)): plain_text(lbl) for h, f, lbl in concepts[["hook", "feature", "label"]].itertuples(index=False)
            if plain_text(lbl)}


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


def member_list(index: ReportIndex, hook: str, members: Sequence[int], limit: int | None = 8,
                labels: bool = False) -> str:
    """A cluster's members as links to their sections (the first `limit`, None: all, then "… (+n)"),
    each with its label when `labels` (the cluster table and the cluster sections share it)."""
    shown = list(members) if limit is None else list(members)[:limit]
    items = []
    for f in shown:
        item = index.concept_link(hook, f)
        if labels and (hook, f) in index.labels:
            item += f" <small>({esc(index.labels[(hook, f)])})</small>"
        items.append(item)
    more = f" … (+{len(members) - len(shown)})" if len(members) > len(shown) else ""
    return ", ".join(items) + more
