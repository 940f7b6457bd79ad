"""`audit_dataset` (rows + lens + tokenizer) and `audit_features` (span features only).

The order of work: validate every option before anything heavy, test every feature that fires
often enough (BH across all of them), cluster the top features by co-firing and test the
clusters, cluster the pairs by prompt and test every (data cluster × feature cluster), trace the
top concepts to their pairs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from lightning_anatomy.audit.clustering import cluster_matrices, data_clusters, feature_clusters
from lightning_anatomy.audit.result import AuditResult
from lightning_anatomy.audit.statistics import STAT_COLUMNS, add_decisions, paired_statistics
from lightning_anatomy.audit.tracing import trace_pairs
from lightning_anatomy.concepts.span_features import STATS, SpanFeatures


@dataclass(frozen=True)
class AuditOptions:
    """Every audit setting, checked at once (`validate`) so a bad one fails before any work.

    stat: span statistic compared between chosen and rejected ("max": the per-span max
        activation, as in the paper; "freq": the fraction of span tokens where it fires; "mean").
    n_bootstrap: bootstrap replicates of the CI (0 skips the CI).
    alpha: the false-discovery rate for `passes` (q < alpha and split-half agreement).
    min_fire_count: a feature is tested only if it fires in at least this many spans (chosen +
        rejected); below ~5 the normal approximation of the paired z misleads.
    length_control: regress the difference on the completion-length difference.
    top_n_cluster: features per hook (best ranked first) entering the co-firing clustering.
    n_clusters: cap on feature clusters per hook (None: modularity decides).
    n_data_clusters: k of the prompt k-means (1 disables the local table).
    min_cluster_pairs: data clusters smaller than this are left out of the local table.
    top_k_trace: concepts traced to their pairs; trace_pairs: pairs listed per traced concept.
    """

    stat: str = "max"
    n_bootstrap: int = 1000
    seed: int = 0
    alpha: float = 0.05
    confidence: float = 0.95
    min_fire_count: int = 5
    length_control: bool = True
    top_n_cluster: int = 200
    n_clusters: int | None = None
    n_data_clusters: int = 8
    min_cluster_pairs: int = 20
    top_k_trace: int = 10
    trace_pairs: int = 5
    snippet_chars: int = 200

    def validate(self, features: SpanFeatures | None = None) -> None:
        def bad(name: str, value: Any, need: str) -> ValueError:
            return ValueError(f"audit option {name}={value!r} is invalid: {need}")

        if self.stat not in STATS:
            raise bad("stat", self.stat, f"choose one of {', '.join(STATS)}")
        for name, low in (("n_bootstrap", 0), ("min_fire_count", 1), ("top_n_cluster", 1), ("n_data_clusters", 1),
                          ("min_cluster_pairs", 4), ("top_k_trace", 0), ("trace_pairs", 1), ("snippet_chars", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise bad(name, value, f"must be an integer >= {low}")
        if self.n_clusters is not None and (not isinstance(self.n_clusters, int | np.integer) or self.n_clusters < 1):
            raise bad("n_clusters", self.n_clusters, "must be an integer >= 1 or None")
        if not 0 < self.alpha < 1:
            raise bad("alpha", self.alpha, "must be in (0, 1)")
        if not 0 < self.confidence < 1:
            raise bad("confidence", self.confidence, "must be in (0, 1), e.g. 0.95")
        if features is None:
            return
        if features.n_pairs < 4:
            raise ValueError(f"the audit needs at least 4 pairs (split halves of 2), got {features.n_pairs}")
        spans = ("chosen", "rejected") + (("prompt",) if self.n_data_clusters > 1 else ())
        for hook in features.hooks:
            for span in spans:
                if (hook, span, self.stat) not in features.matrices:
                    fix = " (or pass n_data_clusters=1 to skip data clusters)" if span == "prompt" else ""
                    raise ValueError(f"span features lack (hook={hook!r}, span={span!r}, stat={self.stat!r}); "
                                     f"extract that statistic or pick a stat that was extracted{fix}")
        if self.length_control and not {"chosen", "rejected"} <= set(features.lengths):
            raise ValueError("length_control needs features.lengths['chosen'] and ['rejected']; "
                             "pass length_control=False for features without span lengths")


def _length_diff(features: SpanFeatures, options: AuditOptions) -> np.ndarray | None:
    if not options.length_control:
        return None
    return features.lengths["chosen"].astype(np.float64) - features.lengths["rejected"].astype(np.float64)


def _feature_table(features: SpanFeatures, options: AuditOptions, labels: Mapping | None) -> pd.DataFrame:
    length_diff = _length_diff(features, options)
    parts = []
    for hook in features.hooks:
        stats = paired_statistics(
            features.get(hook, "chosen", options.stat), features.get(hook, "rejected", options.stat),
            length_diff=length_diff, min_fire_count=options.min_fire_count, n_bootstrap=options.n_bootstrap,
            seed=options.seed, confidence=options.confidence,
        )
        stats.insert(0, "hook", hook)
        parts.append(stats)
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["hook", "feature", *STAT_COLUMNS])
    table = add_decisions(table, alpha=options.alpha, keys=("hook", "feature"))
    table.insert(3, "label", [_label(labels, h, f) for h, f in zip(table["hook"], table["feature"])])
    return table


def _label(labels: Mapping | None, hook: str, feature: int) -> str:
    if not labels:
        return ""
    return str(labels.get((hook, int(feature)), labels.get(f"{hook}:{int(feature)}", "")))


def _cluster_tables(
    features: SpanFeatures, concepts: pd.DataFrame, options: AuditOptions
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, np.ndarray], pd.DataFrame, pd.DataFrame]:
    """(clusters, local, cofiring MI, feature-cluster assignments, data-cluster assignments)."""
    assign, cofiring = feature_clusters(features, concepts, stat=options.stat, top_n=options.top_n_cluster,
                                        n_clusters=options.n_clusters)
    labels = (data_clusters(features, stat=options.stat, n_clusters=options.n_data_clusters, seed=options.seed)
              if options.n_data_clusters > 1 else np.zeros(features.n_pairs, dtype=np.int64))
    data_assign = pd.DataFrame({"row_id": np.asarray(features.row_ids, dtype=np.int64), "data_cluster": labels})
    if assign.empty:
        empty = pd.DataFrame(columns=["rank", "hook", "cluster", *STAT_COLUMNS])
        return empty, empty.assign(data_cluster=[]), cofiring, assign, data_assign

    chosen, ids = cluster_matrices(features, assign, "chosen", options.stat)
    rejected, _ = cluster_matrices(features, assign, "rejected", options.stat)
    hook_of = assign.groupby("cluster")["hook"].first()
    members = assign.groupby("cluster")["feature"].apply(lambda s: [int(f) for f in s])
    length_diff = _length_diff(features, options)

    def table(rows: np.ndarray | None, seed: int) -> pd.DataFrame:
        c, r = (chosen, rejected) if rows is None else (chosen[rows], rejected[rows])
        ld = None if length_diff is None else (length_diff if rows is None else length_diff[rows])
        out = paired_statistics(c, r, length_diff=ld, min_fire_count=1, n_bootstrap=options.n_bootstrap,
                                seed=seed, confidence=options.confidence)
        cluster = ids[out.pop("feature").to_numpy()]
        out.insert(0, "cluster", cluster)
        out.insert(0, "hook", hook_of.loc[cluster].to_numpy())
        out.insert(2, "size", [len(members.loc[k]) for k in cluster])
        out.insert(3, "features", [members.loc[k] for k in cluster])
        return out

    clusters = add_decisions(table(None, options.seed), alpha=options.alpha, keys=("hook", "cluster"))
    local_parts = []
    for g in np.unique(labels):
        rows = np.flatnonzero(labels == g)
        if len(rows) < options.min_cluster_pairs:
            continue
        part = table(rows, options.seed)
        part.insert(0, "n_pairs", len(rows))
        part.insert(0, "data_cluster", int(g))
        local_parts.append(part)
    if local_parts:
        local = add_decisions(pd.concat(local_parts, ignore_index=True), alpha=options.alpha,
                              keys=("data_cluster", "hook", "cluster"))
        glob = clusters.set_index("cluster")
        local["global_delta"] = glob.loc[local["cluster"], "delta"].to_numpy()
        local["global_z"] = glob.loc[local["cluster"], "z"].to_numpy()
        local["global_passes"] = glob.loc[local["cluster"], "passes"].to_numpy(bool)
        local["local_only"] = local["passes"].to_numpy(bool) & ~local["global_passes"].to_numpy(bool)
        local["sign_flip"] = local["passes"].to_numpy(bool) & local["global_passes"].to_numpy(bool) & (
            np.sign(local["delta"].to_numpy()) != np.sign(local["global_delta"].to_numpy()))
    else:
        local = pd.DataFrame(columns=["rank", "data_cluster", "n_pairs", "hook", "cluster", *STAT_COLUMNS])
    return clusters, local, cofiring, assign, data_assign


def audit_features(
    features: SpanFeatures,
    *,
    rows: Sequence[Any] | Mapping[int, Any] | None = None,
    labels: Mapping | None = None,
    contexts: list[dict[str, Any]] | None = None,
    saes: Mapping[str, Any] | None = None,
    **options: Any,
) -> AuditResult:
    """Audit precomputed span features (no model needed); options as in `AuditOptions`.

    `rows` (the `PreferenceRow`s, or a mapping row_id -> row) give the text of traced pairs;
    `labels` maps (hook, feature) -> a human label; `saes` ({hook: sae}) enables the ConceptSet
    export.
    """
    unknown = sorted(set(options) - set(AuditOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown audit option(s) {', '.join(unknown)}; "
                        f"valid options: {', '.join(AuditOptions.__dataclass_fields__)}")
    opts = AuditOptions(**options)
    opts.validate(features)
    row_map = _row_map(rows)

    concepts = _feature_table(features, opts, labels)
    clusters, local, cofiring, assign, data_assign = _cluster_tables(features, concepts, opts)
    cluster_of = {(h, int(f)): int(c) for h, f, c in assign[["hook", "feature", "cluster"]].itertuples(index=False)}
    concepts.insert(4, "cluster", [cluster_of.get((h, int(f)), -1) for h, f in zip(concepts["hook"], concepts["feature"])])

    traced = concepts.head(opts.top_k_trace)
    traces = [trace_pairs(features, hook, part["feature"].tolist(), stat=opts.stat, k=opts.trace_pairs,
                          rows=row_map, snippet_chars=opts.snippet_chars)
              for hook, part in traced.groupby("hook", sort=False)]
    traces = pd.concat(traces, ignore_index=True) if traces else trace_pairs(features, features.hooks[0], [])

    meta = asdict(opts) | {"n_pairs": features.n_pairs, "hooks": features.hooks, "d_sae": dict(features.d_sae),
                           "n_tested": int(len(concepts)), "n_passing": int(concepts["passes"].sum())}
    if opts.length_control:
        meta["mean_length_diff"] = float(_length_diff(features, opts).mean())
    return AuditResult(concepts=concepts, clusters=clusters, local=local, traces=traces,
                       feature_clusters=assign, data_clusters=data_assign, options=meta, cofiring=cofiring,
                       contexts=list(contexts or []), features=features, rows=row_map, saes=saes)


def _row_map(rows: Sequence[Any] | Mapping[int, Any] | None) -> dict[int, Any] | None:
    if rows is None:
        return None
    if isinstance(rows, Mapping):
        return {int(k): v for k, v in rows.items()}
    return {int(r.row_id): r for r in rows}


def audit_dataset(
    rows: Sequence[Any],
    lens: Any,
    tokenizer: Any,
    *,
    max_length: int = 512,
    max_prompt_length: int | None = None,
    batch_size: int = 8,
    threshold: float = 0.0,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    trainer_kwargs: dict[str, Any] | None = None,
    labels: Mapping | None = None,
    label_concepts: bool = True,
    **options: Any,
) -> AuditResult:
    """Audit preference rows through a `ConceptLens`: tokenize, extract span features, test.

    With `label_concepts`, the traced concepts get a heuristic label (`concepts.labels`) and
    their example pairs token-level contexts (the firing tokens marked), read from the traced
    pairs only; `labels` ({(hook, feature): text}) override them.

    Sequences are cut to `max_length` tokens, prompts to `max_prompt_length` (their end kept;
    None: min(256, max_length // 2)). `out_dir` keeps resumable extraction shards (a rerun
    continues where it stopped); every other
    option is an `AuditOptions` field (stat="max", n_bootstrap=1000, seed=0, min_fire_count=5,
    n_clusters=None, top_k_trace=10, ...), validated before the model runs.
    """
    from lightning_anatomy.concepts.extraction import extract_span_features
    from lightning_anatomy.data.tokenize import resolve_pad_token_id, tokenize_rows

    unknown = sorted(set(options) - set(AuditOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown audit option(s) {', '.join(unknown)}; valid options: max_length, "
                        f"max_prompt_length, batch_size, threshold, out_dir, progress, trainer_kwargs, labels, label_concepts, "
                        f"{', '.join(AuditOptions.__dataclass_fields__)}")
    AuditOptions(**options).validate()
    if len(rows) < 4:
        raise ValueError(f"the audit needs at least 4 rows, got {len(rows)}")
    if max_prompt_length is None and isinstance(max_length, int):
        max_prompt_length = max(1, min(256, max_length // 2))
    pairs = tokenize_rows(rows, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    features = extract_span_features(pairs, lens, batch_size=batch_size, threshold=threshold, out_dir=out_dir,
                                     progress=progress, trainer_kwargs=trainer_kwargs,
                                     pad_token_id=resolve_pad_token_id(tokenizer))
    saes = dict(getattr(lens, "saes", {}) or {})
    result = audit_features(features, rows=rows, labels=labels, saes=saes or None, **options)
    result.options.update(max_length=max_length, max_prompt_length=max_prompt_length, batch_size=batch_size,
                          threshold=threshold)
    if label_concepts and len(result.traces):
        _annotate(result, lens, tokenizer, labels or {}, batch_size=batch_size, max_length=max_length)
    return result


def _annotate(result: AuditResult, lens: Any, tokenizer: Any, given: Mapping, *, batch_size: int,
              max_length: int) -> None:
    """Heuristic labels and marked top contexts for the traced concepts, from the pairs traced at
    each hook (one encode pass per hook for every traced feature)."""
    from lightning_anatomy.concepts.labels import feature_contexts, label_features

    rows = result.rows or {}
    n_ctx = int(result.options.get("trace_pairs", 5))
    for hook, part in result.traces.groupby("hook", sort=False):
        feature_ids = [int(f) for f in dict.fromkeys(part["feature"])]
        texts = [rows[int(r)] for r in dict.fromkeys(part["row_id"]) if int(r) in rows]
        if not texts:
            continue
        contexts = feature_contexts(lens, tokenizer, texts, hook, feature_ids, k=max(n_ctx, 10), window=8,
                                    batch_size=batch_size, max_length=max_length, mark_fraction=0.5)
        auto = label_features(lens, tokenizer, texts, hook, feature_ids, contexts=contexts)
        for f in feature_ids:
            if (hook, f) not in given and f"{hook}:{f}" not in given:
                hit = (result.concepts["hook"] == hook) & (result.concepts["feature"] == f)
                result.concepts.loc[hit, "label"] = auto.get(f, "")
            for c in contexts[f][:n_ctx]:
                result.contexts.append({"hook": hook, "feature": f, "source": c.source, "token": c.token,
                                        "activation": float(c.activation), "text": c.text})
