"""Feature clusters over *all* SAE features from binary co-firing (Bergen et al. 2026, App. B.1).

An SAE splits one concept over several latents, so the paper predicts DPO's effect per cluster
of latents that fire together. Clusters come from a token × feature binary firing matrix X
(one row per corpus token, 1 where the feature's activation exceeds the threshold):

- features firing on fewer than `min_tokens` tokens (and features that fire on every token,
  entropy 0) are left out;
- for each pair (g, h) the mutual information of their binary firing, normalised by
  √(H_g·H_h) (NMI ∈ [0, 1]);
- the top `top_fraction` (1 %) of all off-diagonal pairs by NMI become weighted edges; a pair
  that co-fires less often than independence predicts (n_gh·N ≤ n_g·n_h, never co-firing
  included) has no co-firing to cluster on and is never an edge;
- Leiden communities (`leidenalg`, modularity via RBConfiguration at `resolution`, seeded);
  communities under `min_cluster_size` (4) features are dropped. With `target_size` the
  resolution is not given but chosen per hook by a rule blind to the preferences: the grid
  resolution whose kept clusters have a mean size nearest a target ("auto": the paper's ≈ 80
  features per cluster at 65,536 features, scaled by √(d_sae/65,536); `choose_resolution`).

Scale: 65,536 features would make a dense NMI matrix of 4.3e9 entries, so none is built. The
co-occurrence counts XᵀX are computed one block of `block_size` features at a time
(`X[:, block]ᵀ · X`, scipy sparse, exact int32 counts; 256 features by default), the NMI of each block's co-firing pairs
is computed, and only the candidates that can still be in the top 1 % are kept (a running
threshold from `np.argpartition`). Memory: X (8 bytes per firing) plus one block's product plus
the kept edges (16 bytes each).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp

CLUSTER_COLUMNS = ("hook", "cluster", "feature")


def binary_firing(firing: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    """`firing` as a token-major int32 CSR of ones (any non-zero entry counts as a firing)."""
    x = sp.csr_matrix(firing)
    x.eliminate_zeros()
    x.sum_duplicates()
    out = sp.csr_matrix((np.ones(x.nnz, dtype=np.int32), x.indices.astype(np.int32, copy=False), x.indptr),
                        shape=x.shape)
    return out


def _plogp_ratio(count: np.ndarray, expected: np.ndarray, n: float) -> np.ndarray:
    """p·log(p/e) for p = count/n and e = expected/n, with 0·log 0 = 0."""
    out = np.zeros_like(count, dtype=np.float64)
    ok = (count > 0) & (expected > 0)
    c = count[ok].astype(np.float64)
    out[ok] = (c / n) * np.log(c / expected[ok])
    return out


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """H(p) in nats of a Bernoulli(p), elementwise (0 at p ∈ {0, 1})."""
    p = np.asarray(p, dtype=np.float64)
    out = np.zeros_like(p)
    ok = (p > 0) & (p < 1)
    q = p[ok]
    out[ok] = -(q * np.log(q) + (1 - q) * np.log1p(-q))
    return out


def pair_nmi(n11: np.ndarray, n_g: np.ndarray, n_h: np.ndarray, n_obs: int) -> np.ndarray:
    """MI(g; h)/√(H_g·H_h) of two binary variables from their co-occurrence and marginal counts."""
    n11 = np.asarray(n11, dtype=np.float64)
    n_g = np.asarray(n_g, dtype=np.float64)
    n_h = np.asarray(n_h, dtype=np.float64)
    n = float(n_obs)
    mi = (_plogp_ratio(n11, n_g * n_h / n, n)
          + _plogp_ratio(n_g - n11, n_g * (n - n_h) / n, n)
          + _plogp_ratio(n_h - n11, (n - n_g) * n_h / n, n)
          + _plogp_ratio(n - n_g - n_h + n11, (n - n_g) * (n - n_h) / n, n))
    denom = np.sqrt(binary_entropy(n_g / n) * binary_entropy(n_h / n))
    out = np.zeros_like(mi)
    np.divide(np.maximum(mi, 0.0), denom, out=out, where=denom > 0)
    return out


def cofiring_edges(
    firing: sp.spmatrix | np.ndarray,
    *,
    min_tokens: int = 10,
    top_fraction: float = 0.01,
    block_size: int = 256,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The top-`top_fraction` co-firing pairs of the columns of `firing` [n_tokens, d_sae].

    Returns (kept feature ids [K], i [E], j [E], nmi [E]) with i < j indexing the kept features,
    sorted by NMI descending (ties by i, then j). No dense K × K matrix is ever built.
    """
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int | np.integer) or min_tokens < 1:
        raise ValueError(f"min_tokens={min_tokens!r} is invalid: a feature must fire on at least 1 token to enter "
                         "the co-firing graph; pass an integer >= 1 (paper: features that fire often enough)")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction={top_fraction!r} is invalid: the fraction of feature pairs kept as edges "
                         "must be in (0, 1] (paper: 0.01)")
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} is invalid: pass the number of features per block (>= 1)")
    x = binary_firing(firing)
    n_obs = x.shape[0]
    counts = np.bincount(x.indices, minlength=x.shape[1]).astype(np.int64)
    kept = np.flatnonzero((counts >= min_tokens) & (counts < n_obs))
    empty = np.zeros(0, dtype=np.int64)
    if len(kept) < 2:
        return kept, empty, empty.copy(), np.zeros(0)
    if len(kept) < x.shape[1]:
        x = x[:, kept]
    n_k = counts[kept]
    k = len(kept)
    quota = max(1, math.ceil(top_fraction * k * (k - 1) / 2))
    cand_i, cand_j, cand_v = [], [], []
    held = 0
    floor = -np.inf  # NMI a new pair must beat once `quota` candidates are held

    def prune(i: np.ndarray, j: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(v) <= quota:
            return i, j, v
        top = np.argpartition(-v, quota - 1)[:quota]
        return i[top], j[top], v[top]

    for b0 in range(0, k, block_size):
        b1 = min(k, b0 + block_size)
        block = (x[:, b0:b1].T.tocsr() @ x).tocoo()  # [b, K] exact co-occurrence counts
        upper = block.col > block.row + b0
        rows = block.row[upper].astype(np.int64) + b0
        cols = block.col[upper].astype(np.int64)
        n11 = block.data[upper].astype(np.int64)
        del block
        positive = n11 * n_obs > n_k[rows] * n_k[cols]
        rows, cols, n11 = rows[positive], cols[positive], n11[positive]
        v = pair_nmi(n11, n_k[rows], n_k[cols], n_obs)
        keep = v > floor
        cand_i.append(rows[keep])
        cand_j.append(cols[keep])
        cand_v.append(v[keep])
        held += int(keep.sum())
        if held > 2 * quota:
            i, j, v = prune(np.concatenate(cand_i), np.concatenate(cand_j), np.concatenate(cand_v))
            cand_i, cand_j, cand_v, held = [i], [j], [v], len(v)
            floor = float(v.min()) if len(v) >= quota else -np.inf
    i, j, v = (np.concatenate(a) if a else empty for a in (cand_i, cand_j, cand_v))
    i, j, v = prune(i, j, v.astype(np.float64))
    order = np.lexsort((j, i, -v))
    return kept, i[order], j[order], v[order]


def leiden_communities(n_nodes: int, i: np.ndarray, j: np.ndarray, weight: np.ndarray, *,
                       resolution: float = 1.0, seed: int = 0) -> np.ndarray:
    """A community id per node from seeded Leiden on the weighted undirected graph (i, j, weight)."""
    import igraph as ig
    import leidenalg

    if n_nodes == 0:
        return np.zeros(0, dtype=np.int64)
    if len(i) == 0:
        return np.arange(n_nodes, dtype=np.int64)
    graph = ig.Graph(n=int(n_nodes), edges=np.column_stack([i, j]).astype(np.int64), directed=False)
    graph.es["weight"] = np.asarray(weight, dtype=np.float64)
    partition = leidenalg.find_partition(
        graph, leidenalg.RBConfigurationVertexPartition, weights="weight",
        resolution_parameter=float(resolution), seed=int(seed), n_iterations=-1,
    )
    return np.asarray(partition.membership, dtype=np.int64)


PAPER_D_SAE = 65536  # the paper's SAE width ...
PAPER_CLUSTER_SIZE = 80.0  # ... and its mean features per cluster
RESOLUTION_GRID = tuple(float(2.0 ** k) for k in range(-4, 11))  # 1/16 … 1024


def target_cluster_size(d_sae: int, min_cluster_size: int = 4) -> float:
    """The "auto" target size: the paper's 80 features per cluster at 65,536 features, scaled by
    √(d_sae / 65,536) (≈ 7 at 512 features), never below `min_cluster_size`."""
    return max(float(min_cluster_size), PAPER_CLUSTER_SIZE * math.sqrt(d_sae / PAPER_D_SAE))


def _mean_kept_size(labels: np.ndarray, min_cluster_size: int) -> float:
    sizes = np.bincount(labels)
    kept = sizes[sizes >= min_cluster_size]
    return float(kept.mean()) if len(kept) else 0.0


def choose_resolution(n_nodes: int, i: np.ndarray, j: np.ndarray, weight: np.ndarray, *, target_size: float,
                      min_cluster_size: int = 4, seed: int = 0) -> float:
    """The Leiden resolution whose kept clusters (≥ `min_cluster_size`) have a mean size nearest
    `target_size` (in log ratio), scanning `RESOLUTION_GRID` upwards (ties: the smaller resolution).

    A rule on the co-firing graph alone (no look at the preference outcome), deterministic for a
    seed. Clusters only shrink as the resolution grows, so the scan stops at the first resolution
    whose mean size falls below the target (at most 15 Leiden runs).
    """
    best, best_gap = RESOLUTION_GRID[0], math.inf
    for resolution in RESOLUTION_GRID:
        size = _mean_kept_size(leiden_communities(n_nodes, i, j, weight, resolution=resolution, seed=seed),
                               min_cluster_size)
        gap = abs(math.log(size / target_size)) if size > 0 else math.inf
        if gap < best_gap:
            best, best_gap = resolution, gap
        if size < target_size:
            break
    return best


def cofiring_clusters(
    firing: Mapping[str, sp.spmatrix | np.ndarray],
    *,
    min_tokens: int = 10,
    top_fraction: float = 0.01,
    min_cluster_size: int = 4,
    resolution: float = 1.0,
    seed: int = 0,
    block_size: int = 256,
    target_size: float | str | None = None,
) -> pd.DataFrame:
    """Feature clusters of every hook (`{hook: token × feature firing}`), as (hook, cluster, feature).

    Cluster ids are unique across hooks: numbered by hook, then by size (largest first), then by
    the smallest member; members are listed in feature order. Features outside every kept
    cluster have no row.

    `target_size`: None uses `resolution` as given; a number (features per cluster) or "auto"
    (`target_cluster_size` of the hook's d_sae) picks each hook's resolution by
    `choose_resolution` instead. The resolution used per hook is in `.attrs["resolution"]`.
    """
    if isinstance(min_cluster_size, bool) or not isinstance(min_cluster_size, int | np.integer) or min_cluster_size < 1:
        raise ValueError(f"min_cluster_size={min_cluster_size!r} is invalid: pass an integer >= 1 (paper: 4)")
    if not (isinstance(resolution, int | float) and resolution > 0):
        raise ValueError(f"leiden_resolution={resolution!r} is invalid: pass a number > 0 (1.0 = modularity)")
    check_target_size(target_size)
    records: list[tuple[str, int, int]] = []
    used: dict[str, float] = {}
    next_id = 0
    for hook, x in firing.items():
        kept, i, j, w = cofiring_edges(x, min_tokens=min_tokens, top_fraction=top_fraction, block_size=block_size)
        if target_size is not None:
            target = target_cluster_size(x.shape[1], min_cluster_size) if target_size == "auto" else float(target_size)
            resolution = choose_resolution(len(kept), i, j, w, target_size=target, min_cluster_size=min_cluster_size,
                                           seed=seed)
        used[hook] = float(resolution)
        labels = leiden_communities(len(kept), i, j, w, resolution=resolution, seed=seed)
        groups = [np.sort(kept[labels == c]) for c in np.unique(labels)]
        groups = [g for g in groups if len(g) >= min_cluster_size]
        groups.sort(key=lambda g: (-len(g), int(g[0])))
        for g in groups:
            records.extend((hook, next_id, int(f)) for f in g)
            next_id += 1
    out = pd.DataFrame(records, columns=list(CLUSTER_COLUMNS)).astype({"cluster": np.int64, "feature": np.int64})
    out.attrs["resolution"] = used
    return out


def check_target_size(target_size: object) -> None:
    """A ValueError unless `target_size` is None, "auto" or a number > 1."""
    if target_size is None or target_size == "auto":
        return
    if isinstance(target_size, bool) or not isinstance(target_size, int | float) or not target_size > 1:
        raise ValueError(f"cluster_target_size={target_size!r} is invalid: pass None (use leiden_resolution), "
                         "'auto' (80 features per cluster at 65,536, scaled by sqrt(d_sae/65536)) or a number > 1")
