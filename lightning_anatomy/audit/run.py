"""`audit_dataset` (rows + lens + tokenizer) and `audit_features` (span features only).

Two methods. `method="paired"` (the default): validate every option before anything heavy, test
every feature that fires often enough on the span statistic (BH across all of them), cluster the
top features by co-firing and test the clusters, cluster the pairs by prompt and test every
(data cluster × feature cluster), trace the top concepts to their pairs.

Both methods add, per listed concept and per feature cluster, how confounded it is with the
preference (`confounding_columns`: the explain-away λ and the pair AUROC of the same per-pair ΔA).

`method="paper"` (Bergen et al. 2026, App. B.1, the feature-conditioned audit whose cluster
predictions matched DPO's real effect at R² 0.9): firing frequencies thresholded at τ, feature
clusters over all features from token-level co-firing (`audit.cofiring`), the per-cluster
disparity u and its global mean as the prediction, silent bucket + spherical k-means data
clusters and the inside-vs-outside table (`audit.feature_conditioned`), ranked by Δ_min.

The options and their checks are `audit.options.AuditOptions`; where the paper method's feature
clusters come from (a given table, a firing corpus, the lens with a cache) is `audit.paper_clusters`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from lightning_anatomy.audit import feature_conditioned as fc
from lightning_anatomy.audit.clustering import cluster_matrices, data_clusters, feature_clusters
from lightning_anatomy.audit.options import METHODS, AuditOptions  # noqa: F401 (METHODS: re-exported)
from lightning_anatomy.audit.paper_clusters import (  # noqa: F401 (check_feature_clusters: re-exported)
    check_feature_clusters,
    lens_cofiring_clusters,
    paper_clusters,
)
from lightning_anatomy.audit.result import AuditResult
from lightning_anatomy.audit.statistics import STAT_COLUMNS, add_decisions, paired_statistics
from lightning_anatomy.audit.tilt import pair_cluster_activity, tilt_predict
from lightning_anatomy.audit.tracing import snippet, trace_pairs
from lightning_anatomy.concepts.span_features import SpanFeatures
from lightning_anatomy.interventions.explain_away import confounding

REPORT_CONCEPTS = 100  # concepts the report lists (render_report's max_concepts): all get a label
_CONFOUNDING_BLOCK = 256  # columns of ΔA densified at once


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


def confounding_columns(chosen: sp.spmatrix, rejected: sp.spmatrix, columns: Sequence[int]) -> pd.DataFrame:
    """Per column of ΔA = chosen − rejected ([n_pairs, n] rows are pairs): how confounded it is with
    the preference, from the same per-pair values the audit's statistics use.

    `explain_away_lambda`: the Bradley–Terry MLE of ΔA on the preferences (±inf when every differing
    pair leans one way: perfect confounding, `perfectly_confounded`; NaN when ΔA is 0 in every pair,
    which says nothing about λ); `pair_auroc`: P(ΔA > 0) + ½·P(ΔA = 0), "chosen has more of it";
    `differing_pairs`: how many pairs have ΔA ≠ 0 (a λ of ∞ on 3 of them is a rare feature, on 300
    a confound).
    """
    cols = np.asarray(columns, dtype=np.int64)
    lam = np.full(len(cols), np.nan)
    auroc = np.full(len(cols), np.nan)
    differing = np.zeros(len(cols), dtype=np.int64)
    c, r = sp.csr_matrix(chosen), sp.csr_matrix(rejected)  # no copy of a CSR matrix; a column slice is one pass
    for b0 in range(0, len(cols), _CONFOUNDING_BLOCK):
        block = cols[b0:b0 + _CONFOUNDING_BLOCK]
        diff = (c[:, block].astype(np.float64) - r[:, block].astype(np.float64)).toarray()  # as the statistics: float64
        differing[b0:b0 + len(block)] = (diff != 0).sum(axis=0)
        for j in range(diff.shape[1]):
            d = diff[:, j]
            if not d.any():  # no pair differs: AUROC ½, λ undefined (an error in explain_away_lambda)
                auroc[b0 + j] = 0.5
                continue
            conf = confounding(d)
            lam[b0 + j], auroc[b0 + j] = conf["lambda"], conf["auroc"]
    return pd.DataFrame({"explain_away_lambda": lam, "pair_auroc": auroc,
                         "perfectly_confounded": pd.array(np.isinf(lam), dtype="boolean"),
                         "differing_pairs": pd.array(differing, dtype="Int64")})


Sides = tuple[sp.spmatrix, sp.spmatrix, np.ndarray]  # (chosen, rejected, the ids of their columns)


def _add_confounding(table: pd.DataFrame, key: str, sides: Mapping[str, Sides] | Sides,
                     rows: int | None = None) -> pd.DataFrame:
    """`table` with the confounding columns (`result.CONFOUNDING`) for its first `rows` rows (None:
    all), NA below them.

    `sides`: one (chosen, rejected, ids) for every row, or one per hook (`{hook: ...}`); a row's
    `table[key]` is its column id among `ids`."""
    out = table.copy()
    lam = np.full(len(out), np.nan)
    auroc = np.full(len(out), np.nan)
    flag = pd.array([pd.NA] * len(out), dtype="boolean")
    differing = pd.array([pd.NA] * len(out), dtype="Int64")
    head = out.head(len(out) if rows is None else rows)
    for hook, part in head.groupby("hook", sort=False):
        chosen, rejected, ids = sides[hook] if isinstance(sides, Mapping) else sides
        col_of = {int(i): k for k, i in enumerate(ids)}
        got = confounding_columns(chosen, rejected, [col_of[int(i)] for i in part[key]])
        pos = out.index.get_indexer(part.index)
        lam[pos], auroc[pos] = got["explain_away_lambda"].to_numpy(), got["pair_auroc"].to_numpy()
        flag[pos] = got["perfectly_confounded"].array
        differing[pos] = got["differing_pairs"].array
    out["explain_away_lambda"], out["pair_auroc"], out["perfectly_confounded"] = lam, auroc, flag
    out["differing_pairs"] = differing
    return out


def _feature_confounding(table: pd.DataFrame, features: SpanFeatures, stat: str, opts: AuditOptions) -> pd.DataFrame:
    """The confounding columns of the concepts the report lists (and every traced one), on `stat`."""
    matrices = {hook: (features.get(hook, "chosen", stat), features.get(hook, "rejected", stat),
                       np.arange(features.d_sae[hook])) for hook in features.hooks}
    return _add_confounding(table, "feature", matrices, rows=max(REPORT_CONCEPTS, opts.top_k_trace))


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
    clusters = _add_confounding(clusters, "cluster", (chosen, rejected, ids))
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

    concepts = _feature_confounding(_feature_table(features, opts, labels, stat=opts.stat), features, opts.stat, opts)
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


def _paper_audit(
    features: SpanFeatures, opts: AuditOptions, row_map: dict[int, Any] | None, labels: Mapping | None,
    contexts: list[dict[str, Any]] | None, saes: Mapping[str, Any] | None,
    token_firing: Mapping[str, Any] | None, given_clusters: pd.DataFrame | None,
) -> AuditResult:
    """The feature-conditioned audit (module docstring); per-feature rows on 1{freq > τ}."""
    assign = paper_clusters(features, opts, token_firing, given_clusters)
    act = fc.active_features(features, opts.tau, stat=opts.stat)
    parity = np.arange(features.n_pairs) % 2 == 0  # split halves by index parity
    concepts = _feature_table(act, opts, labels, stat="active", halves=parity, rank_by="delta_min")
    concepts = _feature_confounding(concepts, act, "active", opts)
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
        clusters = _add_confounding(clusters, "cluster", (chosen, rejected, ids))
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
        extra["feature_clusters"] = feature_clusters if feature_clusters is not None else lens_cofiring_clusters(
            lens, tokenizer, pairs, opts, corpus=cofire_corpus, max_tokens=cofire_max_tokens, batch_size=batch_size,
            threshold=threshold, max_length=max_length, out_dir=out_dir, firing=features.token_firing)
    result = audit_features(features, rows=rows, labels=labels, saes=saes or None, **extra, **options)
    result.options.update(max_length=max_length, max_prompt_length=max_prompt_length, batch_size=batch_size,
                          threshold=threshold)
    if label_concepts and len(result.traces):
        _annotate(result, lens, tokenizer, labels or {}, batch_size=batch_size, max_length=max_length)
    return result


def _to_label(result: AuditResult) -> dict[str, tuple[list[int], list[int]]]:
    """{hook: (features, row ids of the pairs to read them on)}: the traced concepts on their traced
    pairs, the other concepts the report lists (`REPORT_CONCEPTS`) on their two strongest pairs,
    and (paper method) the best-ranked tested members of the top `top_k_trace` feature
    clusters on the clusters' example pairs, so that the cluster table names what they are."""
    plan: dict[str, tuple[dict[int, None], dict[int, None]]] = {}
    for hook, part in result.traces.groupby("hook", sort=False):
        feats, rows = plan.setdefault(str(hook), ({}, {}))
        feats.update(dict.fromkeys(int(f) for f in part["feature"]))
        rows.update(dict.fromkeys(int(r) for r in part["row_id"]))
    if result.features is not None:  # every concept the report lists, read on its 2 strongest pairs
        for hook, part in result.concepts.head(REPORT_CONCEPTS).groupby("hook", sort=False):
            if str(hook) not in result.features.d_sae:
                continue
            feats, rows = plan.setdefault(str(hook), ({}, {}))
            extra = [int(f) for f in part["feature"] if int(f) not in feats]
            if extra:
                traced = trace_pairs(result.features, str(hook), extra, stat=result.stat, k=2)
                feats.update(dict.fromkeys(int(f) for f in traced["feature"]))
                rows.update(dict.fromkeys(int(r) for r in traced["row_id"]))
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
