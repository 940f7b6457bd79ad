"""`AuditOptions`: every setting of the audit (both methods), checked at once before any work.

`validate` refuses a bad value with one `ValueError` naming the option and what it needs; given
the `SpanFeatures`, it also checks that they hold what the options will read.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from lightning_anatomy.audit.cofiring import check_target_size
from lightning_anatomy.audit.tilt import PREDICTORS
from lightning_anatomy.concepts.span_features import STATS, SpanFeatures

METHODS = ("paired", "paper")


@dataclass(frozen=True)
class AuditOptions:
    """Every audit setting, checked at once (`validate`) so a bad one fails before any work.

    The fields marked (paper) act in the paper method only (their defaults are the paper's;
    `seed` also seeds Leiden and k-means); the prediction fields act in either method.

    Args:
        method: "paired" (per-feature paired statistics on `stat`) or "paper" (the paper's
            feature-conditioned cluster audit on firing frequencies).
        stat: span statistic compared between chosen and rejected ("max": the per-span max
            activation; "freq": the fraction of span tokens where it fires; "mean"). None: "max"
            for "paired"; "paper" always uses "freq".
        n_bootstrap: bootstrap replicates of the CI (0 skips the CI).
        seed: seed of the bootstrap, the split halves, Leiden and k-means.
        alpha: the false-discovery rate for `passes` (q < alpha and split-half agreement).
        confidence: level of the bootstrap CI.
        min_fire_count: a feature is tested only if it fires in at least this many spans (chosen +
            rejected); below ~5 the normal approximation of the paired z misleads.
        length_control: regress the difference on the completion-length difference.
        top_n_cluster: features per hook (best ranked first) entering the co-firing clustering.
        n_clusters: cap on feature clusters per hook (None: modularity decides).
        n_data_clusters: k of the prompt k-means (1 disables the local table); the paper picks K
            per dataset, 8 here.
        min_cluster_pairs: data clusters smaller than this are left out of the local table.
        top_k_trace: concepts traced to their pairs.
        trace_pairs: pairs listed per traced concept.
        snippet_chars: characters of context kept per traced snippet.
        cluster_label_members: with labels on, the best-ranked tested members labelled per feature
            cluster, for the top `top_k_trace` clusters (paper method: the cluster table's names).
        tau: (paper) a feature is active in a span when its firing frequency exceeds τ.
        cofire_top_fraction: (paper) fraction of all feature pairs kept as co-firing edges, by NMI.
        cofire_min_tokens: (paper) a feature enters the co-firing graph only if it fires on at
            least this many corpus tokens ("fire often enough"; our choice).
        min_cluster_size: (paper) Leiden communities with fewer features are dropped.
        leiden_resolution: (paper) RBConfiguration resolution (1.0 = modularity).
        cofire_block_size: (paper) features per block of the sparse XᵀX (memory / speed only,
            same result).
        silent_percentile: (paper) pairs with total symmetric activity below this percentile are
            set aside.
        local_min_features: (paper) the filter |T_m| ≥ 10 of the local table.
        local_min_pairs: (paper) the filter n_k ≥ 25 of the local table.
        cluster_examples: (paper) example pairs kept per feature cluster (report).
        cluster_target_size: (paper) None clusters at `leiden_resolution`; "auto" or a number of
            features per cluster picks each hook's resolution by a rule that never sees the
            preferences: the resolution (powers of 2 from 1/16 to 1024) whose kept clusters have
            a mean size nearest the target; "auto" is the paper's ≈ 80 features per cluster at
            65,536 features scaled by √(d_sae/65,536), about 7 at 512
            (`audit.cofiring.choose_resolution`).
        predictor: what `predicted_shift` of the cluster table holds. "paper": each cluster's own
            mean chosen − rejected disparity (Δ). "tilt": a Bradley–Terry reward fitted jointly on
            all clusters' activities, propagated as the tilt exp(t·w·a) of the dataset's
            responses (`audit.tilt`); the table also gets `predicted_shift_first_order`,
            `tilt_weight` and `tilt_sample`, and Δ stays in `delta`.
        tilt_scale: t of the tilt (1: the fitted reward as is; DPO's exact optimum is 1/β).
        tilt_folds: K of the K-fold pair cross-validation that picks the L2 strength.
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


__all__ = ["METHODS", "AuditOptions"]
