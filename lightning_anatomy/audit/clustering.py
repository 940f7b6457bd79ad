"""Structure in an audit: feature clusters (co-firing) and data clusters (prompt k-means).

Single features are noisy and redundant (an SAE splits one concept over several latents), and a
dataset mixes topics whose signals cancel globally. So:

- *feature clusters*: the top-N features of a hook are linked when their binary firing over all
  chosen and rejected spans co-occurs more than chance (mutual information, kept where the
  association is positive and the G-test 2·N·MI passes at 1% Bonferroni-corrected over the
  N(N−1)/2 pairs — uncorrected, chance edges pull noise into real clusters); greedy modularity
  communities of that graph are the clusters (deterministic: nodes and edges are added in a fixed
  order). A cluster's per-pair value is the mean of its members' span values.
- *data clusters*: k-means (scipy `kmeans2`, seeded, k-means++) over a truncated SVD of the
  row-normalised prompt features of all hooks.
"""

from __future__ import annotations

import warnings

import networkx as nx
import numpy as np
import pandas as pd
import scipy.sparse as sp
from networkx.algorithms.community import greedy_modularity_communities
from scipy.cluster.vq import kmeans2
from scipy.sparse.linalg import svds
from scipy.stats import chi2

from lightning_anatomy.concepts.span_features import SpanFeatures

# Family-wise error rate of the co-firing edges of one hook (Bonferroni over the feature pairs).
_EDGE_FWER = 0.01


def cofiring_mutual_information(firing: sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
    """Mutual information (nats) between the binary columns of `firing` [n_obs, k].

    Returns (mi [k, k], positive [k, k]) where `positive` marks pairs that fire together more often
    than independence predicts. Computed from the co-occurrence counts BᵀB (one sparse product).
    """
    b = sp.csr_matrix(firing, dtype=np.float64)
    b.data[:] = 1.0
    n_obs = b.shape[0]
    n11 = np.asarray((b.T @ b).todense(), dtype=np.float64)
    n1 = np.diag(n11).copy()
    n10 = n1[:, None] - n11
    n01 = n1[None, :] - n11
    n00 = n_obs - n11 - n10 - n01
    p_i = n1 / n_obs
    mi = np.zeros_like(n11)
    for cell, pa, pb in ((n11, p_i[:, None], p_i[None, :]), (n10, p_i[:, None], 1 - p_i[None, :]),
                         (n01, 1 - p_i[:, None], p_i[None, :]), (n00, 1 - p_i[:, None], 1 - p_i[None, :])):
        p = cell / n_obs
        expected = pa * pb
        ok = (p > 0) & (expected > 0)
        mi += np.where(ok, p * np.log(np.where(ok, p, 1.0) / np.where(ok, expected, 1.0)), 0.0)
    mi = np.maximum(mi, 0.0)
    positive = n11 * n_obs > n1[:, None] * n1[None, :]
    np.fill_diagonal(mi, 0.0)
    np.fill_diagonal(positive, False)
    return mi, positive


def feature_clusters(
    features: SpanFeatures,
    concepts: pd.DataFrame,
    *,
    stat: str = "max",
    top_n: int = 200,
    n_clusters: int | None = None,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Cluster each hook's top-`top_n` features (in `concepts` order) by co-firing.

    Returns (assignments with columns hook, feature, cluster — cluster ids unique across hooks,
    numbered by hook then by the best-ranked member — and the MI matrices per hook, rows/columns in
    the order of the assignment rows of that hook). `n_clusters` caps the number of communities
    per hook where the co-firing graph is connected enough (networkx `best_n`).
    """
    if top_n < 1:
        raise ValueError(f"top_n (features per hook to cluster) must be >= 1, got {top_n}")
    if n_clusters is not None and n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1 or None, got {n_clusters}")
    rows: list[dict] = []
    mis: dict[str, np.ndarray] = {}
    next_id = 0
    for hook in features.hooks:
        top = concepts.loc[concepts["hook"] == hook, "feature"].to_numpy(np.int64)[:top_n]
        if len(top) == 0:
            continue
        firing = sp.vstack([features.get(hook, "chosen", stat)[:, top], features.get(hook, "rejected", stat)[:, top]])
        mi, positive = cofiring_mutual_information(firing)
        graph = nx.Graph()
        graph.add_nodes_from(range(len(top)))
        g_stat = 2.0 * firing.shape[0] * mi
        threshold = chi2.isf(_EDGE_FWER / max(1, len(top) * (len(top) - 1) // 2), df=1)
        ii, jj = np.nonzero(np.triu(positive & (g_stat > threshold), k=1))
        graph.add_weighted_edges_from((int(i), int(j), float(mi[i, j])) for i, j in zip(ii, jj))
        if graph.number_of_edges():
            communities = greedy_modularity_communities(graph, weight="weight", best_n=n_clusters)
        else:
            communities = [{i} for i in range(len(top))]
        ordered = sorted((sorted(c) for c in communities), key=lambda c: c[0])
        order = [i for c in ordered for i in c]
        for members in ordered:
            for i in members:
                rows.append({"hook": hook, "feature": int(top[i]), "cluster": next_id})
            next_id += 1
        mis[hook] = mi[np.ix_(order, order)]
    return pd.DataFrame(rows, columns=["hook", "feature", "cluster"]), mis


def cluster_matrices(
    features: SpanFeatures, assignments: pd.DataFrame, span: str, stat: str
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Per-pair cluster values [n_pairs, n_clusters]: the mean of the members' span values.

    Returns (matrix, cluster ids in column order). One sparse product per hook (X · M with M the
    column-normalised membership matrix).
    """
    clusters = np.unique(assignments["cluster"].to_numpy(np.int64))
    col_of = {int(c): i for i, c in enumerate(clusters)}
    blocks = []
    for hook, part in assignments.groupby("hook", sort=False):
        x = features.get(hook, span, stat)
        sizes = part.groupby("cluster")["feature"].transform("size").to_numpy(np.float64)
        member = sp.csr_matrix(
            (1.0 / sizes, (part["feature"].to_numpy(np.int64), [col_of[int(c)] for c in part["cluster"]])),
            shape=(x.shape[1], len(clusters)),
        )
        blocks.append(x @ member)
    total = blocks[0]
    for b in blocks[1:]:
        total = total + b
    return sp.csr_matrix(total), clusters


def data_clusters(
    features: SpanFeatures, *, stat: str = "max", n_clusters: int = 8, n_components: int = 16, seed: int = 0
) -> np.ndarray:
    """A data-cluster id per pair (0 = the largest cluster) from k-means over prompt features.

    Rows of each hook's prompt matrix are L2-normalised (a topic, not a length), the hooks are
    stacked side by side, reduced by a seeded truncated SVD and clustered by seeded k-means++.
    Pairs without any prompt feature all land in one cluster.
    """
    n = features.n_pairs
    if n_clusters < 1:
        raise ValueError(f"n_data_clusters must be >= 1, got {n_clusters}")
    k = min(n_clusters, n)
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    blocks = []
    for hook in features.hooks:
        x = sp.csr_matrix(features.get(hook, "prompt", stat), dtype=np.float64)
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        blocks.append(sp.diags(np.where(norms > 0, 1.0 / np.maximum(norms, 1e-300), 0.0)) @ x)
    x = sp.hstack(blocks).tocsr()
    rank = min(n_components, min(x.shape) - 1)
    if x.nnz == 0 or rank < 1:
        return np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng([seed, 0xC1])
    u, s, _ = svds(x, k=rank, v0=rng.standard_normal(min(x.shape)))
    points = u * s
    with warnings.catch_warnings():  # an empty cluster is fine: ids are renumbered below
        warnings.simplefilter("ignore")
        _, labels = kmeans2(points, k, minit="++", rng=np.random.default_rng([seed, 0xC2]), missing="warn")
    # Renumber by size (ties by first appearance) so ids are stable and dense.
    uniq, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], first[i]))
    remap = np.empty(labels.max() + 1, dtype=np.int64)
    remap[uniq[order]] = np.arange(len(uniq))
    return remap[labels]
