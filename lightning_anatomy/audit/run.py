"""`audit_dataset` (rows + lens + tokenizer) and `audit_features` (span features only).

Two methods. `method="paired"` (the default): validate every option before anything heavy, test
every feature that fires often enough on the span statistic (BH across all of them), cluster the
top features by co-firing and test the clusters, cluster the pairs by prompt and test every
(data cluster × feature cluster), trace the top concepts to their pairs.

`method="paper"` (Bergen et al. 2026, App. B.1, the feature-conditioned audit whose cluster
predictions matched DPO's real effect at R² 0.9): firing frequencies thresholded at τ, feature
clusters over all features from token-level co-firing (`audit.cofiring`), the per-cluster
disparity u and its global mean as the prediction, silent bucket + spherical k-means data
clusters and the inside-vs-outside table (`audit.feature_conditioned`), ranked by Δ_min.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from lightning_anatomy.audit import feature_conditioned as fc
from lightning_anatomy.audit.clustering import cluster_matrices, data_clusters, feature_clusters
from lightning_anatomy.audit.cofiring import CLUSTER_COLUMNS, check_target_size, cofiring_clusters
from lightning_anatomy.audit.result import AuditResult
from lightning_anatomy.audit.statistics import STAT_COLUMNS, add_decisions, paired_statistics
from lightning_anatomy.audit.tilt import PREDICTORS, pair_cluster_activity, tilt_predict
from lightning_anatomy.audit.tracing import snippet, trace_pairs
from lightning_anatomy.concepts.span_features import STATS, SpanFeatures

METHODS = ("paired", "paper")


@dataclass(frozen=True)
class AuditOptions:
    """Every audit setting, checked at once (`validate`) so a bad one fails before any work.

    method: "paired" (per-feature paired statistics on `stat`) or "paper" (the paper's
        feature-conditioned cluster audit on firing frequencies; the options below marked paper).
    stat: span statistic compared between chosen and rejected ("max": the per-span max
        activation; "freq": the fraction of span tokens where it fires; "mean"). None: "max"
        for "paired"; "paper" always uses "freq".
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
    cluster_label_members: with labels on, the best-ranked tested members labelled per feature
        cluster, for the top `top_k_trace` clusters (paper method: the cluster table's names).

    Paper method (defaults are the paper's; `seed` also seeds Leiden and k-means):
    tau: a feature is active in a span when its firing frequency exceeds τ (0.01).
    cofire_top_fraction: fraction of all feature pairs kept as co-firing edges, by NMI (0.01).
    cofire_min_tokens: a feature enters the co-firing graph only if it fires on at least this many
        corpus tokens ("fire often enough"; 10, our choice).
    min_cluster_size: Leiden communities with fewer features are dropped (4).
    leiden_resolution: RBConfiguration resolution (1.0 = modularity).
    cofire_block_size: features per block of the sparse XᵀX (memory / speed only, same result).
    silent_percentile: pairs with total symmetric activity below this percentile are set aside (5).
    n_data_clusters: K of the spherical k-means (8 here; the paper picks K per dataset).
    local_min_features / local_min_pairs: the filters |T_m| ≥ 10 and n_k ≥ 25 of the local table.
    cluster_examples: example pairs kept per feature cluster (report).
    cluster_target_size: None (default) clusters at `leiden_resolution`; "auto" or a number of
        features per cluster picks each hook's resolution by a rule that never sees the
        preferences: the resolution (powers of 2 from 1/16 to 1024) whose kept clusters have a
        mean size nearest the target; "auto" is the paper's ≈ 80 features per cluster at 65,536
        features scaled by √(d_sae/65,536), about 7 at 512 (`audit.cofiring.choose_resolution`).

    Prediction (either method):
    predictor: what `predicted_shift` of the cluster table holds. "paper" (default): each
        cluster's own mean chosen − rejected disparity (Δ). "tilt": a Bradley–Terry reward fitted
        jointly on all clusters' activities, propagated as the tilt exp(t·w·a) of the dataset's
        responses (`audit.tilt`); the table also gets `predicted_shift_first_order`,
        `tilt_weight` and `tilt_sample`, and Δ stays in `delta`.
    tilt_scale: t of the tilt (1: the fitted reward as is; DPO's exact optimum is 1/β).
    tilt_folds: K of the K-fold pair cross-validation that picks the L2 strength (5).
    """

    method: str = "paired"
    stat: str | None = None
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
    cluster_label_members: int = 3
    tau: float = 0.01
    cofire_top_fraction: float = 0.01
    cofire_min_tokens: int = 10
    min_cluster_size: int = 4
    leiden_resolution: float = 1.0
    cofire_block_size: int = 256
    silent_percentile: float = 5.0
    local_min_features: int = 10
    local_min_pairs: int = 25
    cluster_examples: int = 3
    cluster_target_size: float | str | None = None
    predictor: str = "paper"
    tilt_scale: float = 1.0
    tilt_folds: int = 5

    def resolved(self) -> AuditOptions:
        """These options with `stat` filled in for the method."""
        if self.stat is not None:
            return self
        return replace(self, stat="freq" if self.method == "paper" else "max")

    def validate(self, features: SpanFeatures | None = None) -> None:
        def bad(name: str, value: Any, need: str) -> ValueError:
            return ValueError(f"audit option {name}={value!r} is invalid: {need}")

        if self.method not in METHODS:
            raise bad("method", self.method, f"choose one of {', '.join(METHODS)}")
        if self.predictor not in PREDICTORS:
            raise bad("predictor", self.predictor, f"choose one of {', '.join(PREDICTORS)}")
        if not (isinstance(self.tilt_scale, int | float) and not isinstance(self.tilt_scale, bool)
                and np.isfinite(self.tilt_scale) and self.tilt_scale > 0):
            raise bad("tilt_scale", self.tilt_scale, "must be a number > 0 (1: the fitted reward as is)")
        if isinstance(self.tilt_folds, bool) or not isinstance(self.tilt_folds, int | np.integer) or self.tilt_folds < 2:
            raise bad("tilt_folds", self.tilt_folds, "must be an integer >= 2")
        check_target_size(self.cluster_target_size)
        if self.stat is not None and self.stat not in STATS:
            raise bad("stat", self.stat, f"choose one of {', '.join(STATS)}")
        if self.method == "paper" and self.stat not in (None, "freq"):
            raise bad("stat", self.stat, "method='paper' compares firing frequencies; drop stat or pass stat='freq'")
        for name, low in (("cofire_min_tokens", 1), ("min_cluster_size", 1), ("cofire_block_size", 1),
                          ("local_min_features", 1), ("local_min_pairs", 1), ("cluster_examples", 0),
                          ("cluster_label_members", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise bad(name, value, f"must be an integer >= {low}")
        if not (isinstance(self.tau, int | float) and 0 <= self.tau < 1):
            raise bad("tau", self.tau, "the firing-frequency threshold must be in [0, 1) (paper: 0.01)")
        if not (isinstance(self.cofire_top_fraction, int | float) and 0 < self.cofire_top_fraction <= 1):
            raise bad("cofire_top_fraction", self.cofire_top_fraction, "must be in (0, 1] (paper: 0.01)")
        if not (isinstance(self.leiden_resolution, int | float) and self.leiden_resolution > 0):
            raise bad("leiden_resolution", self.leiden_resolution, "must be > 0 (1.0 = modularity)")
        if not (isinstance(self.silent_percentile, int | float) and 0 <= self.silent_percentile < 100):
            raise bad("silent_percentile", self.silent_percentile, "must be in [0, 100) (paper: 5)")
        stat = self.resolved().stat
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
        prompt = self.n_data_clusters > 1 and self.method == "paired"
        spans = ("chosen", "rejected") + (("prompt",) if prompt else ())
        for hook in features.hooks:
            for span in spans:
                if (hook, span, stat) not in features.matrices:
                    fix = " (or pass n_data_clusters=1 to skip data clusters)" if span == "prompt" else ""
                    raise ValueError(f"span features lack (hook={hook!r}, span={span!r}, stat={stat!r}); "
                                     f"extract that statistic or pick a stat that was extracted{fix}")
        if self.predictor == "tilt":
            for hook in features.hooks:
                for span in ("chosen", "rejected"):
                    if (hook, span, "freq") not in features.matrices:
                        raise ValueError(f"predictor='tilt' reads each pair's cluster activity from firing "
                                         f"frequencies, but the span features lack (hook={hook!r}, span={span!r}, "
                                         "stat='freq'); extract 'freq' or pass predictor='paper'")
        if self.length_control and not {"chosen", "rejected"} <= set(features.lengths):
            raise ValueError("length_control needs features.lengths['chosen'] and ['rejected']; "
                             "pass length_control=False for features without span lengths")


def _length_diff(features: SpanFeatures, options: AuditOptions) -> np.ndarray | None:
    if not options.length_control:
        return None
    return features.lengths["chosen"].astype(np.float64) - features.lengths["rejected"].astype(np.float64)


def _feature_table(features: SpanFeatures, options: AuditOptions, labels: Mapping | None, *, stat: str,
                   halves: np.ndarray | None = None, rank_by: str = "z") -> pd.DataFrame:
    length_diff = _length_diff(features, options)
    parts = []
    for hook in features.hooks:
        stats = paired_statistics(
            features.get(hook, "chosen", stat), features.get(hook, "rejected", stat),
            length_diff=length_diff, min_fire_count=options.min_fire_count, n_bootstrap=options.n_bootstrap,
            seed=options.seed, confidence=options.confidence, halves=halves,
        )
        stats.insert(0, "hook", hook)
        parts.append(stats)
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["hook", "feature", *STAT_COLUMNS])
    table = add_decisions(table, alpha=options.alpha, keys=("hook", "feature"), rank_by=rank_by)
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
    token_firing: Mapping[str, sp.spmatrix] | None = None,
    feature_clusters: pd.DataFrame | None = None,
    **options: Any,
) -> AuditResult:
    """Audit precomputed span features (no model needed); options as in `AuditOptions`.

    `rows` (the `PreferenceRow`s, or a mapping row_id -> row) give the text of traced pairs;
    `labels` maps (hook, feature) -> a human label; `saes` ({hook: sae}) enables the ConceptSet
    export. `method="paper"` needs the co-firing corpus `token_firing` ({hook: binary token ×
    feature matrix}, see `concepts.token_firing`) or ready `feature_clusters` (hook, cluster,
    feature), e.g. those of an earlier audit.
    """
    unknown = sorted(set(options) - set(AuditOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown audit option(s) {', '.join(unknown)}; "
                        f"valid options: {', '.join(AuditOptions.__dataclass_fields__)}")
    opts = AuditOptions(**options)
    opts.validate(features)
    opts = opts.resolved()
    row_map = _row_map(rows)
    if opts.method == "paper":
        return _paper_audit(features, opts, row_map, labels, contexts, saes, token_firing, feature_clusters)
    if token_firing is not None or feature_clusters is not None:
        raise ValueError("token_firing / feature_clusters belong to method='paper'; pass method='paper' or drop them")

    concepts = _feature_table(features, opts, labels, stat=opts.stat)
    clusters, local, cofiring, assign, data_assign = _cluster_tables(features, concepts, opts)
    _add_cluster_column(concepts, assign)
    clusters, tilt_meta = _apply_predictor(clusters, features, assign, opts)
    traces = _traces(features, concepts, opts, opts.stat, row_map)
    meta = _meta(features, opts, concepts) | tilt_meta
    return AuditResult(concepts=concepts, clusters=clusters, local=local, traces=traces,
                       feature_clusters=assign, data_clusters=data_assign, options=meta, cofiring=cofiring,
                       contexts=list(contexts or []), features=features, rows=row_map, saes=saes)


def _apply_predictor(clusters: pd.DataFrame, features: SpanFeatures, assign: pd.DataFrame,
                     opts: AuditOptions) -> tuple[pd.DataFrame, dict[str, Any]]:
    """With predictor="tilt": `predicted_shift` (and the direction) from the tilt of the dataset's
    responses, plus its first order, the reward weights and the sample; else unchanged."""
    if opts.predictor != "tilt" or clusters.empty:
        return clusters, {}
    ids = clusters["cluster"].to_numpy(np.int64)
    chosen, rejected = pair_cluster_activity(features, assign, ids, tau=opts.tau)
    pred = tilt_predict(chosen, rejected, scale=opts.tilt_scale, n_folds=opts.tilt_folds, seed=opts.seed)
    sign = np.sign(pred.full)
    direction = np.where(sign > 0, "amplify", np.where(sign < 0, "suppress", "none"))
    out = clusters.assign(predicted_shift=pred.full, predicted_shift_first_order=pred.first_order,
                          tilt_weight=pred.fit.weights, tilt_sample=pred.sample.astype(str))
    out["predicted_direction"] = np.where(out["passes"].to_numpy(bool), direction, "none")
    return out, {"tilt_l2": pred.fit.l2, "tilt_sample": "dataset", "tilt_n_pairs": pred.fit.n_pairs}


def _add_cluster_column(concepts: pd.DataFrame, assign: pd.DataFrame) -> None:
    cluster_of = {(h, int(f)): int(c) for h, f, c in assign[["hook", "feature", "cluster"]].itertuples(index=False)}
    concepts.insert(4, "cluster", [cluster_of.get((h, int(f)), -1) for h, f in zip(concepts["hook"], concepts["feature"])])


def _traces(features: SpanFeatures, concepts: pd.DataFrame, opts: AuditOptions, stat: str,
            row_map: Mapping[int, Any] | None) -> pd.DataFrame:
    traced = concepts.head(opts.top_k_trace)
    traces = [trace_pairs(features, hook, part["feature"].tolist(), stat=stat, k=opts.trace_pairs,
                          rows=row_map, snippet_chars=opts.snippet_chars)
              for hook, part in traced.groupby("hook", sort=False)]
    return pd.concat(traces, ignore_index=True) if traces else trace_pairs(features, features.hooks[0], [])


def _meta(features: SpanFeatures, opts: AuditOptions, concepts: pd.DataFrame) -> dict[str, Any]:
    meta = asdict(opts) | {"n_pairs": features.n_pairs, "hooks": features.hooks, "d_sae": dict(features.d_sae),
                           "n_tested": int(len(concepts)), "n_passing": int(concepts["passes"].sum())}
    if opts.length_control:
        meta["mean_length_diff"] = float(_length_diff(features, opts).mean())
    return meta


def check_feature_clusters(assign: Any, features: SpanFeatures) -> pd.DataFrame:
    """`assign` as a clean (hook, cluster, feature) table; errors name the bad column, hook or feature."""
    if not isinstance(assign, pd.DataFrame):
        raise TypeError(f"feature_clusters must be a pandas DataFrame (hook, cluster, feature), got {type(assign).__name__}")
    missing = [c for c in CLUSTER_COLUMNS if c not in assign.columns]
    if missing:
        raise ValueError(f"feature_clusters lacks column(s) {missing}; pass a table with hook, cluster, feature "
                         "(e.g. AuditResult.feature_clusters)")
    out = assign[list(CLUSTER_COLUMNS)].astype({"cluster": np.int64, "feature": np.int64}).reset_index(drop=True)
    unknown = sorted(set(out["hook"]) - set(features.hooks))
    if unknown:
        raise ValueError(f"feature_clusters names hook(s) {unknown} that are not in the audited features "
                         f"{features.hooks}")
    for hook, part in out.groupby("hook"):
        bad = part["feature"][(part["feature"] < 0) | (part["feature"] >= features.d_sae[hook])]
        if len(bad):
            raise ValueError(f"feature_clusters: feature {int(bad.iloc[0])} is out of range for hook {hook!r} "
                             f"(d_sae={features.d_sae[hook]})")
    if out.duplicated(["hook", "feature"]).any():
        raise ValueError("feature_clusters lists a (hook, feature) twice; each feature belongs to one cluster")
    if (out.groupby("cluster")["hook"].nunique() > 1).any():
        raise ValueError("feature_clusters: a cluster spans several hooks; a cluster's features share one hook")
    return out


def _paper_clusters(features: SpanFeatures, opts: AuditOptions, token_firing: Mapping[str, Any] | None,
                    given: pd.DataFrame | None) -> pd.DataFrame:
    if given is not None:
        return check_feature_clusters(given, features)
    if token_firing is None:
        raise ValueError("method='paper' clusters features by token-level co-firing: pass token_firing={hook: "
                         "binary token x feature matrix} (concepts.token_firing) or feature_clusters=<table of an "
                         "earlier audit>; audit_dataset(..., method='paper') computes it from the model")
    missing = [h for h in features.hooks if h not in token_firing]
    if missing:
        raise ValueError(f"token_firing lacks hook(s) {missing}; give one firing matrix per audited hook")
    for hook in features.hooks:
        width = token_firing[hook].shape[1]
        if width != features.d_sae[hook]:
            raise ValueError(f"token_firing[{hook!r}] has {width} columns but the hook's SAE has "
                             f"d_sae={features.d_sae[hook]}; collect it with the audit's SAE")
    return cofiring_clusters({h: token_firing[h] for h in features.hooks}, min_tokens=opts.cofire_min_tokens,
                             top_fraction=opts.cofire_top_fraction, min_cluster_size=opts.min_cluster_size,
                             resolution=opts.leiden_resolution, seed=opts.seed, block_size=opts.cofire_block_size,
                             target_size=opts.cluster_target_size)


def _paper_audit(
    features: SpanFeatures, opts: AuditOptions, row_map: dict[int, Any] | None, labels: Mapping | None,
    contexts: list[dict[str, Any]] | None, saes: Mapping[str, Any] | None,
    token_firing: Mapping[str, Any] | None, given_clusters: pd.DataFrame | None,
) -> AuditResult:
    """The feature-conditioned audit (module docstring); per-feature rows on 1{freq > τ}."""
    assign = _paper_clusters(features, opts, token_firing, given_clusters)
    act = fc.active_features(features, opts.tau, stat=opts.stat)
    parity = np.arange(features.n_pairs) % 2 == 0  # split halves by index parity
    concepts = _feature_table(act, opts, labels, stat="active", halves=parity, rank_by="delta_min")
    _add_cluster_column(concepts, assign)

    empty_local = pd.DataFrame(columns=list(fc.LOCAL_COLUMNS))
    data_assign = pd.DataFrame({"row_id": np.asarray(features.row_ids, dtype=np.int64),
                                "data_cluster": np.full(features.n_pairs, fc.SILENT, dtype=np.int64)})
    examples = pd.DataFrame(columns=["cluster", "rank", "row_id", "u", "prompt", "chosen", "rejected"])
    if assign.empty:
        clusters = pd.DataFrame(columns=["rank", "hook", "cluster", "size", "features", *STAT_COLUMNS])
        local = empty_local
    else:
        chosen, rejected, ids = fc.cluster_sides(features, assign, opts.tau, stat=opts.stat)
        hook_of = assign.groupby("cluster")["hook"].first()
        members = assign.groupby("cluster")["feature"].apply(lambda s: [int(f) for f in s])
        table = paired_statistics(chosen, rejected, length_diff=_length_diff(features, opts), min_fire_count=1,
                                  n_bootstrap=opts.n_bootstrap, seed=opts.seed, confidence=opts.confidence,
                                  halves=parity)
        cluster = ids[table.pop("feature").to_numpy()]
        table.insert(0, "cluster", cluster)
        table.insert(0, "hook", hook_of.loc[cluster].to_numpy())
        table.insert(2, "size", [len(members.loc[k]) for k in cluster])
        table.insert(3, "features", [members.loc[k] for k in cluster])
        clusters = add_decisions(table, alpha=opts.alpha, keys=("hook", "cluster"), rank_by="delta_min")
        clusters, tilt_meta = _apply_predictor(clusters, act, assign, opts)

        disparity = chosen - rejected
        global_delta = np.asarray(disparity.mean(axis=0)).ravel()
        labels_k = fc.data_clusters((chosen + rejected) * 0.5, n_clusters=opts.n_data_clusters,
                                    silent_percentile=opts.silent_percentile, seed=opts.seed)
        data_assign["data_cluster"] = labels_k
        local = fc.inside_outside(disparity, labels_k, cluster_ids=ids, cluster_hooks=hook_of.loc[ids].to_numpy(),
                                  cluster_sizes=[len(members.loc[k]) for k in ids], global_delta=global_delta,
                                  min_features=opts.local_min_features, min_pairs=opts.local_min_pairs)
        if opts.cluster_examples:
            examples = fc.cluster_examples(disparity, ids, global_delta, features.row_ids, k=opts.cluster_examples)
            for side in ("prompt", "chosen", "rejected"):
                examples[side] = [_snippet(row_map, rid, side, opts.snippet_chars) for rid in examples["row_id"]]
    traces = _traces(act, concepts, opts, "active", row_map)
    resolution = assign.attrs.get("resolution")
    meta = _meta(features, opts, concepts) | ({} if assign.empty else tilt_meta) | (
        {"leiden_resolution_used": dict(resolution)} if resolution else {}) | {
        "stat": "active", "source_stat": opts.stat,
                                               "n_feature_clusters": int(assign["cluster"].nunique()),
                                               "n_silent": int((data_assign["data_cluster"] == fc.SILENT).sum())}
    return AuditResult(concepts=concepts, clusters=clusters, local=local, traces=traces,
                       feature_clusters=assign, data_clusters=data_assign, options=meta, cofiring={},
                       contexts=list(contexts or []), features=act, rows=row_map, saes=saes,
                       cluster_examples=examples)


def _snippet(row_map: Mapping[int, Any] | None, row_id: int, side: str, limit: int) -> str:
    row = (row_map or {}).get(int(row_id))
    if row is None:
        return ""
    return snippet(getattr(row, side), limit, from_end=side == "prompt")


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
    method: str = "paired",
    cofire_corpus: Sequence[str] | Sequence[Sequence[int]] | None = None,
    cofire_max_tokens: int | None = None,
    feature_clusters: pd.DataFrame | None = None,
    **options: Any,
) -> AuditResult:
    """Audit preference rows through a `ConceptLens`: tokenize, extract span features, test.

    `method="paper"`: the feature-conditioned audit of Bergen et al. (module docstring). Its
    co-firing corpus is the pairs' prompt, chosen and rejected tokens (read from the extraction's
    own forwards, `extract_span_features(token_firing=True)`; cut to the first `cofire_max_tokens`
    tokens it takes one more pass), or `cofire_corpus` (texts, tokenized with `tokenizer`, or
    token-id lists); `feature_clusters` (hook, cluster, feature) reuses clusters. With `out_dir`
    the clusters are cached in `<out_dir>/cofiring/` under a key of the model, SAE and corpus
    digests and the settings.

    With `label_concepts`, the traced concepts get a heuristic label (`concepts.labels`) and
    their example pairs token-level contexts (the firing tokens marked), read from the traced
    pairs only; `labels` ({(hook, feature): text}) override them.

    Sequences are cut to `max_length` tokens, prompts to `max_prompt_length` (their end kept;
    None: min(256, max_length // 2)). `out_dir` keeps resumable extraction shards (a rerun
    continues where it stopped); every other
    option is an `AuditOptions` field (stat="max", n_bootstrap=1000, seed=0, min_fire_count=5,
    n_clusters=None, top_k_trace=10, ...), validated before the model runs.
    """
    from lightning_anatomy.concepts.extraction import extract_span_features, recorded_token_firing
    from lightning_anatomy.data.tokenize import resolve_pad_token_id, tokenize_rows

    unknown = sorted(set(options) - set(AuditOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown audit option(s) {', '.join(unknown)}; valid options: max_length, "
                        f"max_prompt_length, batch_size, threshold, out_dir, progress, trainer_kwargs, labels, label_concepts, "
                        f"cofire_corpus, cofire_max_tokens, feature_clusters, "
                        f"{', '.join(AuditOptions.__dataclass_fields__)}")
    options["method"] = method
    opts = AuditOptions(**options)
    opts.validate()
    if method != "paper" and (cofire_corpus is not None or cofire_max_tokens is not None or feature_clusters is not None):
        raise ValueError("cofire_corpus / cofire_max_tokens / feature_clusters belong to method='paper'; "
                         "pass method='paper' or drop them")
    if cofire_max_tokens is not None and (isinstance(cofire_max_tokens, bool) or not isinstance(cofire_max_tokens, int)
                                          or cofire_max_tokens < 1):
        raise ValueError(f"cofire_max_tokens={cofire_max_tokens!r} is invalid: pass a positive integer or None (all)")
    if len(rows) < 4:
        raise ValueError(f"the audit needs at least 4 rows, got {len(rows)}")
    if max_prompt_length is None and isinstance(max_length, int):
        max_prompt_length = max(1, min(256, max_length // 2))
    pairs = tokenize_rows(rows, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    # The paper method's default co-firing corpus (the pairs' own tokens) comes from the
    # extraction's forwards; an out_dir keeps whatever its extraction already holds.
    recorded = recorded_token_firing(out_dir)
    wants_firing = method == "paper" and feature_clusters is None and cofire_corpus is None and cofire_max_tokens is None
    features = extract_span_features(pairs, lens, batch_size=batch_size, threshold=threshold, out_dir=out_dir,
                                     progress=progress, trainer_kwargs=trainer_kwargs,
                                     pad_token_id=resolve_pad_token_id(tokenizer),
                                     token_firing=wants_firing if recorded is None else recorded)
    saes = dict(getattr(lens, "saes", {}) or {})
    extra: dict[str, Any] = {}
    if method == "paper":
        extra["feature_clusters"] = feature_clusters if feature_clusters is not None else _cofiring_clusters_of(
            lens, tokenizer, pairs, opts, corpus=cofire_corpus, max_tokens=cofire_max_tokens, batch_size=batch_size,
            threshold=threshold, max_length=max_length, out_dir=out_dir, firing=features.token_firing)
    result = audit_features(features, rows=rows, labels=labels, saes=saes or None, **extra, **options)
    result.options.update(max_length=max_length, max_prompt_length=max_prompt_length, batch_size=batch_size,
                          threshold=threshold)
    if label_concepts and len(result.traces):
        _annotate(result, lens, tokenizer, labels or {}, batch_size=batch_size, max_length=max_length)
    return result


def _cofiring_clusters_of(
    lens: Any, tokenizer: Any, pairs: Sequence[Any], opts: AuditOptions, *, corpus: Sequence[Any] | None,
    max_tokens: int | None, batch_size: int, threshold: float, max_length: int, out_dir: str | os.PathLike | None,
    firing: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Feature clusters from the co-firing corpus through the lens (cached under out_dir when given);
    `firing`: the pairs' token firing the extraction kept, used instead of a second pass."""
    from lightning_anatomy.concepts.token_firing import pair_span_firing, sequence_firing
    from lightning_anatomy.data.tokenize import resolve_pad_token_id
    from lightning_anatomy.digests import combined_digest, model_digest, pairs_digest
    from lightning_anatomy.files import atomic_write_file

    pad = resolve_pad_token_id(tokenizer)
    sequences = None
    if corpus is not None:
        items = list(corpus)
        if not items:
            raise ValueError("cofire_corpus is empty; pass texts or token-id lists, or None for the dataset's spans")
        sequences = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] if isinstance(t, str)
                     else [int(i) for i in t] for t in items]
    settings = {k: getattr(opts, k) for k in ("cofire_min_tokens", "cofire_top_fraction", "min_cluster_size",
                                              "leiden_resolution", "seed")}
    if opts.cluster_target_size is not None:  # (absent otherwise: earlier caches keep their keys)
        settings["cluster_target_size"] = opts.cluster_target_size
    key = combined_digest("cofiring-clusters-v1", model_digest(lens.model),
                          {h: model_digest(sae) for h, sae in lens.saes.items()},
                          pairs_digest(pairs) if sequences is None else combined_digest(sequences, length=64),
                          float(threshold), max_tokens, settings)
    cache = None if out_dir is None else Path(out_dir) / "cofiring" / f"clusters-{key}.parquet"
    if cache is not None and cache.is_file():
        return pd.read_parquet(cache)
    if sequences is not None:
        firing = sequence_firing(lens, sequences, pad_token_id=pad, batch_size=batch_size, threshold=threshold,
                                 max_tokens=max_tokens)
    elif firing is None or max_tokens is not None:  # else: the same corpus, already read by the extraction
        firing = pair_span_firing(lens, pairs, pad_token_id=pad, batch_size=batch_size, threshold=threshold,
                                  max_tokens=max_tokens)
    clusters = cofiring_clusters(firing, min_tokens=opts.cofire_min_tokens, top_fraction=opts.cofire_top_fraction,
                                 min_cluster_size=opts.min_cluster_size, resolution=opts.leiden_resolution,
                                 seed=opts.seed, block_size=opts.cofire_block_size,
                                 target_size=opts.cluster_target_size)
    if cache is not None:
        atomic_write_file(cache, lambda tmp: clusters.to_parquet(tmp, index=False))
    return clusters


def _to_label(result: AuditResult) -> dict[str, tuple[list[int], list[int]]]:
    """{hook: (features, row ids of the pairs to read them on)}: the traced concepts on their traced
    pairs, and (paper method) the best-ranked tested members of the top `top_k_trace` feature
    clusters on the clusters' example pairs, so that the cluster table names what they are."""
    plan: dict[str, tuple[dict[int, None], dict[int, None]]] = {}
    for hook, part in result.traces.groupby("hook", sort=False):
        feats, rows = plan.setdefault(str(hook), ({}, {}))
        feats.update(dict.fromkeys(int(f) for f in part["feature"]))
        rows.update(dict.fromkeys(int(r) for r in part["row_id"]))
    n_members = int(result.options.get("cluster_label_members", 0))
    if n_members and result.options.get("method") == "paper" and len(result.clusters):
        rank = {(str(h), int(f)): int(r) for h, f, r in result.concepts[["hook", "feature", "rank"]].itertuples(index=False)}
        examples = result.cluster_examples
        for _, row in result.clusters.head(int(result.options.get("top_k_trace", 10))).iterrows():
            hook, cluster = str(row["hook"]), int(row["cluster"])
            tested = sorted((int(f) for f in row["features"] if (hook, int(f)) in rank), key=lambda f: rank[(hook, f)])
            pairs = examples.loc[examples["cluster"] == cluster, "row_id"] if len(examples) else []
            if tested and len(pairs):
                feats, rows = plan.setdefault(hook, ({}, {}))
                feats.update(dict.fromkeys(tested[:n_members]))
                rows.update(dict.fromkeys(int(r) for r in pairs))
    return {hook: (list(f), list(r)) for hook, (f, r) in plan.items()}


def _annotate(result: AuditResult, lens: Any, tokenizer: Any, given: Mapping, *, batch_size: int,
              max_length: int) -> None:
    """Heuristic labels and marked top contexts for the traced concepts (and the top clusters' best
    members), read on their pairs (one encode pass per hook for every feature to label)."""
    from lightning_anatomy.concepts.labels import feature_contexts, label_features

    rows = result.rows or {}
    n_ctx = int(result.options.get("trace_pairs", 5))
    for hook, (feature_ids, row_ids) in _to_label(result).items():
        texts = [rows[r] for r in row_ids if r in rows]
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
