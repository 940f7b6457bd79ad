"""The paper's feature-conditioned ("global") statistics over feature clusters (App. B.1).

Per pair i and feature cluster m (members T_m at one hook), from the firing frequencies of the
chosen (c) and rejected (r) completions and the threshold τ (0.01):

- thresholded signed disparity u_im = mean_{f∈T_m} (1{c_f > τ} − 1{r_f > τ}) ∈ [−1, 1];
- symmetric activity s_im = mean_{f∈T_m} (1{c_f > τ} + 1{r_f > τ}) / 2 ∈ [0, 1];
- the global prediction of cluster m is its dataset-wide mean disparity ū_m (DPO raises what
  chosen responses do more often than rejected ones, in proportion to the lean).

Data clusters: pairs whose total symmetric activity Σ_m s_im is below the `silent_percentile`
(5th) percentile, or zero, form the silent bucket (id −1) and are set aside; the others are
grouped by seeded spherical k-means (cosine) on their L2-normalised activity vectors s_i.

Inside vs. outside, per (data cluster k × feature cluster m), over the non-silent pairs:
Δ = mean u inside k − mean u outside k, Welch z = Δ/√(var_in/n_in + var_out/n_out), Cohen's d =
Δ / pooled sd (ddof 1), the split-half by index parity (pairs at even and at odd positions of
the audit), `split_half_agree` when both halves' Δ are non-zero with one sign, Δ_min the smaller
half's |Δ| signed like Δ. A row passes the default filters when |T_m| ≥ `min_features` (10),
n_k ≥ `min_pairs` (25) and the halves agree; rows are ranked passing first, then by |Δ_min|.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp

from lightning_anatomy.concepts.span_features import SpanFeatures

LOCAL_COLUMNS = (
    "rank", "data_cluster", "n_pairs", "hook", "cluster", "size", "mean_inside", "mean_outside", "delta",
    "welch_z", "cohens_d", "delta_even", "delta_odd", "split_half_agree", "delta_min", "passes", "global_delta",
)
SILENT = -1


def active(matrix: sp.spmatrix, tau: float) -> sp.csr_matrix:
    """1{x > τ} of a sparse matrix (float32 CSR)."""
    m = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    m.data = (m.data > tau).astype(np.float32)
    m.eliminate_zeros()
    return m


def active_features(features: SpanFeatures, tau: float, *, stat: str = "freq") -> SpanFeatures:
    """A copy of `features` with (hook, span, "active") = 1{stat > τ} for chosen and rejected."""
    matrices = dict(features.matrices)
    for hook in features.hooks:
        for span in ("chosen", "rejected"):
            matrices[(hook, span, "active")] = active(features.get(hook, span, stat), tau)
    return SpanFeatures(row_ids=features.row_ids, lengths=features.lengths, matrices=matrices,
                        d_sae=dict(features.d_sae), threshold=features.threshold,
                        meta={**features.meta, "active_tau": float(tau), "active_stat": stat})


def membership(assignments: pd.DataFrame, hook: str, d_sae: int, clusters: np.ndarray) -> sp.csr_matrix:
    """[d_sae, len(clusters)] with 1/|T_m| where feature f belongs to cluster m (column order `clusters`)."""
    col_of = {int(c): i for i, c in enumerate(clusters)}
    part = assignments[assignments["hook"] == hook]
    sizes = part.groupby("cluster")["feature"].transform("size").to_numpy(np.float64)
    cols = [col_of[int(c)] for c in part["cluster"]]
    return sp.csr_matrix((1.0 / sizes, (part["feature"].to_numpy(np.int64), cols)), shape=(d_sae, len(clusters)))


def cluster_sides(
    features: SpanFeatures, assignments: pd.DataFrame, tau: float, *, stat: str = "freq"
) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """(C, R, cluster ids): per pair the mean over members of 1{c_f > τ} and of 1{r_f > τ}.

    C − R is the disparity u and (C + R)/2 the symmetric activity s, both [n_pairs, n_clusters].
    """
    clusters = np.unique(assignments["cluster"].to_numpy(np.int64))
    n = features.n_pairs
    c_total = sp.csr_matrix((n, len(clusters)))
    r_total = sp.csr_matrix((n, len(clusters)))
    for hook in dict.fromkeys(assignments["hook"]):
        m = membership(assignments, hook, features.d_sae[hook], clusters)
        c_total = c_total + active(features.get(hook, "chosen", stat), tau) @ m
        r_total = r_total + active(features.get(hook, "rejected", stat), tau) @ m
    return sp.csr_matrix(c_total), sp.csr_matrix(r_total), clusters


def silent_bucket(activity: sp.spmatrix, percentile: float = 5.0) -> np.ndarray:
    """True for pairs whose total symmetric activity is below the `percentile`-th percentile or 0."""
    total = np.asarray(activity.sum(axis=1)).ravel()
    if total.size == 0:
        return np.zeros(0, dtype=bool)
    cut = np.percentile(total, percentile) if percentile > 0 else -np.inf
    return (total < cut) | (total <= 0)


def spherical_kmeans(points: sp.spmatrix, k: int, *, seed: int = 0, max_iter: int = 100) -> np.ndarray:
    """Seeded spherical k-means (k-means++ seeding on cosine distance) of the rows of `points`.

    Rows are L2-normalised first (all rows must be non-zero); centroids are normalised means.
    Returns labels renumbered by cluster size (0 = largest; ties by first appearance).
    """
    x = sp.csr_matrix(points, dtype=np.float64)
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    if np.any(norms <= 0):
        raise ValueError("spherical k-means needs non-zero rows; put all-zero pairs in the silent bucket")
    x = sp.diags(1.0 / norms) @ x
    n = x.shape[0]
    k = int(min(k, n))
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x5B])
    centres = [int(rng.integers(n))]
    best = np.asarray(x @ x[centres[0]].T.toarray()).ravel()
    for _ in range(1, k):
        dist = np.maximum(1.0 - best, 0.0)
        total = dist.sum()
        nxt = int(rng.choice(n, p=dist / total)) if total > 0 else int(rng.integers(n))
        centres.append(nxt)
        best = np.maximum(best, np.asarray(x @ x[nxt].T.toarray()).ravel())
    c = x[centres].toarray()
    labels = np.full(n, -1, dtype=np.int64)
    for _ in range(max_iter):
        new = np.asarray(x @ c.T).argmax(axis=1).astype(np.int64)
        if np.array_equal(new, labels):
            break
        labels = new
        z = sp.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))
        sums = np.asarray((z @ x).todense())
        size = np.linalg.norm(sums, axis=1)
        empty = size <= 0
        c = np.where(empty[:, None], c, sums / np.where(empty, 1.0, size)[:, None])
    uniq, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], first[i]))
    remap = np.empty(k, dtype=np.int64)
    remap[uniq[order]] = np.arange(len(uniq))
    return remap[labels]


def data_clusters(
    activity: sp.spmatrix, *, n_clusters: int = 8, silent_percentile: float = 5.0, seed: int = 0
) -> np.ndarray:
    """A data-cluster id per pair: −1 for the silent bucket, else spherical k-means of the activity."""
    silent = silent_bucket(activity, silent_percentile)
    labels = np.full(activity.shape[0], SILENT, dtype=np.int64)
    live = np.flatnonzero(~silent)
    if len(live):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            labels[live] = spherical_kmeans(sp.csr_matrix(activity)[live], n_clusters, seed=seed)
    return labels


def _group_moments(values: sp.csr_matrix, groups: np.ndarray, n_groups: int, rows: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count [G], Σx [G, M], Σx² [G, M]) of the rows `rows` of `values` grouped by `groups`."""
    z = sp.csr_matrix((np.ones(len(rows)), (groups[rows], rows)), shape=(n_groups, values.shape[0]))
    count = np.asarray(z.sum(axis=1)).ravel()
    s1 = np.asarray((z @ values).todense())
    s2 = np.asarray((z @ values.multiply(values)).todense())
    return count, s1, s2


def _welch(n_in, s1_in, s2_in, n_out, s1_out, s2_out):
    """(mean_in, mean_out, Δ, Welch z, Cohen's d) from group counts and sums (ddof 1)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        m_in = s1_in / n_in[:, None]
        m_out = s1_out / n_out[:, None]
        ss_in = np.maximum(s2_in - n_in[:, None] * m_in ** 2, 0.0)
        ss_out = np.maximum(s2_out - n_out[:, None] * m_out ** 2, 0.0)
        v_in = ss_in / np.maximum(n_in - 1, 1)[:, None]
        v_out = ss_out / np.maximum(n_out - 1, 1)[:, None]
        delta = m_in - m_out
        se = np.sqrt(v_in / n_in[:, None] + v_out / n_out[:, None])
        pooled = np.sqrt((ss_in + ss_out) / np.maximum(n_in + n_out - 2, 1)[:, None])
        z = np.where(se > 0, delta / np.where(se > 0, se, 1.0), np.sign(delta) * np.inf)
        d = np.where(pooled > 0, delta / np.where(pooled > 0, pooled, 1.0), np.sign(delta) * np.inf)
    z = np.where(delta == 0, 0.0, z)
    d = np.where(delta == 0, 0.0, d)
    return m_in, m_out, delta, z, d


def inside_outside(
    disparity: sp.spmatrix,
    labels: np.ndarray,
    *,
    cluster_ids: np.ndarray,
    cluster_hooks: np.ndarray,
    cluster_sizes: np.ndarray,
    global_delta: np.ndarray,
    min_features: int = 10,
    min_pairs: int = 25,
) -> pd.DataFrame:
    """The data cluster × feature cluster table (columns `LOCAL_COLUMNS`; see the module docstring).

    `disparity` is u [n_pairs, n_clusters]; `labels` the data cluster per pair (−1 silent, left out
    of inside and outside); pair positions give the index parity of the split halves.
    """
    u = sp.csr_matrix(disparity, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    live = np.flatnonzero(labels >= 0)
    k = int(labels.max()) + 1 if len(live) else 0
    if k < 2:  # one data cluster has no outside
        return pd.DataFrame(columns=list(LOCAL_COLUMNS))
    parts = {}
    for name, rows in (("all", live), ("even", live[live % 2 == 0]), ("odd", live[live % 2 == 1])):
        n_in, s1_in, s2_in = _group_moments(u, labels, k, rows)
        n_tot, s1_tot, s2_tot = len(rows), s1_in.sum(0, keepdims=True), s2_in.sum(0, keepdims=True)
        parts[name] = _welch(n_in, s1_in, s2_in, n_tot - n_in, s1_tot - s1_in, s2_tot - s2_in) + (n_in,)
    m_in, m_out, delta, z, d, n_in = parts["all"]
    d_even, d_odd = np.nan_to_num(parts["even"][2]), np.nan_to_num(parts["odd"][2])
    agree = (np.sign(d_even) == np.sign(d_odd)) & (d_even != 0)
    delta_min = np.sign(delta) * np.minimum(np.abs(d_even), np.abs(d_odd))
    kk, mm = np.meshgrid(np.arange(k), np.arange(len(cluster_ids)), indexing="ij")
    kk, mm = kk.ravel(), mm.ravel()
    table = pd.DataFrame({
        "data_cluster": kk.astype(np.int64), "n_pairs": n_in[kk].astype(np.int64),
        "hook": np.asarray(cluster_hooks)[mm], "cluster": np.asarray(cluster_ids, dtype=np.int64)[mm],
        "size": np.asarray(cluster_sizes, dtype=np.int64)[mm],
        "mean_inside": m_in.ravel(), "mean_outside": m_out.ravel(), "delta": delta.ravel(),
        "welch_z": z.ravel(), "cohens_d": d.ravel(), "delta_even": d_even.ravel(), "delta_odd": d_odd.ravel(),
        "split_half_agree": agree.ravel(), "delta_min": delta_min.ravel(),
        "global_delta": np.asarray(global_delta, dtype=np.float64)[mm],
    })
    table["passes"] = ((table["size"] >= min_features) & (table["n_pairs"] >= min_pairs)
                       & table["split_half_agree"].astype(bool))
    table = table[table["n_pairs"] > 0]
    return rank_rows(table, keys=("data_cluster", "cluster"))[list(LOCAL_COLUMNS)]


def rank_rows(table: pd.DataFrame, *, keys: tuple[str, ...]) -> pd.DataFrame:
    """Passing rows first, then |Δ_min| descending (ties by `keys`); a 1-based `rank` column first."""
    out = table.assign(_a=np.abs(table["delta_min"].to_numpy(np.float64)))
    out = out.sort_values(["passes", "_a", *keys], ascending=[False, False, *([True] * len(keys))],
                          kind="mergesort").drop(columns="_a")
    out = out.drop(columns=[c for c in ("rank",) if c in out.columns])
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out.reset_index(drop=True)


def cluster_examples(
    disparity: sp.spmatrix, cluster_ids: np.ndarray, global_delta: np.ndarray, row_ids: np.ndarray, *, k: int = 3
) -> pd.DataFrame:
    """Per feature cluster the `k` pairs whose u leans most with the cluster's ū (cluster, rank, row_id, u)."""
    u = sp.csc_matrix(disparity, dtype=np.float64)
    records = []
    for j, cluster in enumerate(cluster_ids):
        col = np.asarray(u[:, j].todense()).ravel()
        sign = np.sign(global_delta[j]) or 1.0
        lean = sign * col
        order = np.argsort(-lean, kind="stable")
        order = order[lean[order] > 0][:k]
        records.extend({"cluster": int(cluster), "rank": r, "row_id": int(row_ids[i]), "u": float(col[i])}
                       for r, i in enumerate(order, start=1))
    return pd.DataFrame(records, columns=["cluster", "rank", "row_id", "u"])
