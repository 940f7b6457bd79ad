"""Where the paper method's feature clusters come from (Bergen et al. 2026, App. B.1).

A table given by the caller, e.g. an earlier audit's (`check_feature_clusters` checks it), the
token-level co-firing of a corpus given as firing matrices (`paper_clusters`), or the co-firing
read through the lens on the pairs or a text corpus, cached under `out_dir`
(`lens_cofiring_clusters`, what `audit_dataset(method="paper")` runs). The clustering itself is
`audit.cofiring`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lightning_anatomy.audit.cofiring import CLUSTER_COLUMNS, cofiring_clusters
from lightning_anatomy.audit.options import AuditOptions
from lightning_anatomy.concepts.span_features import SpanFeatures


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


def paper_clusters(features: SpanFeatures, opts: AuditOptions, token_firing: Mapping[str, Any] | None,
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


def lens_cofiring_clusters(
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


__all__ = ["check_feature_clusters", "lens_cofiring_clusters", "paper_clusters"]
