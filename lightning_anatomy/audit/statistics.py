"""Per-feature paired statistics of chosen vs. rejected span features, vectorised over features.

Every statistic is computed from a handful of column reductions of the sparse chosen (C) and
rejected (R) matrices [n_pairs, n_features], never from a Python loop over features and never by
densifying them:

- column sums / sums of squares (E[c], E[r], E[c²], E[r²]) and the cross moment E[c·r] give the
  mean and variance of the paired difference d = c − r without materialising C − R;
- products with a few dense vectors (split halves, completion-length difference) give the
  split-half Δs and the length-controlled regression;
- the bootstrap multiplies chunks of resampling-count vectors with C and R (sparse × dense).

Definitions (the per-pair difference is d_i = c_i − r_i, n pairs):

- `delta` (Δ) = mean(d); `cohens_d` = mean(d)/sd(d) — Cohen's d_z of the *paired* differences
  (sd with ddof=1), not the pooled-sd d of two independent groups;
- `z` = mean(d)/(sd(d)/√n), the paired z; `p_value` its two-sided normal p;
- `welch_z` = (mean(c) − mean(r))/√(var(c)/n + var(r)/n), the unpaired Welch statistic;
- `ci_low`/`ci_high`: percentile bootstrap CI of Δ, resampling pairs;
- split-half: the pairs are split once into two fixed seeded halves; `delta_half1`/`delta_half2`
  are Δ on each; `split_half_agree` when both are non-zero with the same sign; `delta_min` is the
  smaller |Δ_half| signed like Δ;
- length control: OLS of d on x = len(chosen) − len(rejected) with intercept; `delta_len_ctrl`
  is the intercept (the disparity left at equal lengths) and `z_len_ctrl` its t-ratio;
- `q_value`: Benjamini–Hochberg over every tested feature (`add_decisions`);
- `predicted_shift` = Δ: DPO raises the log-odds of chosen over rejected, so a concept that leans
  to chosen (Δ > 0) is pushed up and one that leans to rejected pushed down, in proportion to the
  lean (the paper's predictor); `predicted_direction` is "amplify" / "suppress" where the feature
  passes (q < alpha and split-half agreement) and "none" otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.special import ndtr

STAT_COLUMNS = (
    "n_fire_chosen", "n_fire_rejected", "mean_chosen", "mean_rejected", "delta", "sd_diff", "cohens_d",
    "z", "p_value", "welch_z", "ci_low", "ci_high", "delta_half1", "delta_half2", "split_half_agree",
    "delta_min", "delta_len_ctrl", "z_len_ctrl",
)
DECISION_COLUMNS = ("q_value", "passes", "predicted_shift", "predicted_direction")

# Relative tolerance below which a variance is treated as exactly zero (float64 round-off of
# E[x²] − E[x]² when every value is equal).
_ZERO_VAR_RTOL = 1e-10
# Resampling-count chunk and the budget of bootstrap means held at once (float32 entries).
_BOOT_CHUNK = 64
_BOOT_BUDGET = 1 << 23


def _as_csr(matrix: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    return matrix.tocsr() if sp.issparse(matrix) else sp.csr_matrix(np.asarray(matrix))


def _column_reduce(matrix: sp.csr_matrix, values: np.ndarray, n_cols: int) -> np.ndarray:
    """Column sums of `values` laid out like `matrix.data` (float64, no copy of the matrix)."""
    out = np.zeros(n_cols, dtype=np.float64)
    step = 1 << 24
    for start in range(0, len(matrix.indices), step):
        stop = start + step
        out += np.bincount(matrix.indices[start:stop], weights=values[start:stop], minlength=n_cols)
    return out


def column_moments(matrix: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Σx, Σx², number of non-zero entries) per column, in float64 / int64."""
    n_cols = matrix.shape[1]
    data = matrix.data.astype(np.float64, copy=False)
    s1 = _column_reduce(matrix, data, n_cols)
    s2 = _column_reduce(matrix, data * data, n_cols)
    nz = np.bincount(matrix.indices[matrix.data != 0], minlength=n_cols).astype(np.int64)
    return s1, s2, nz


def cross_moment(a: sp.csr_matrix, b: sp.csr_matrix) -> np.ndarray:
    """Σ a·b per column (elementwise product of two sparse matrices with the same shape)."""
    prod = a.multiply(b).tocsr()
    return _column_reduce(prod, prod.data.astype(np.float64, copy=False), a.shape[1])


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num/den, with 0/0 = 0 and x/0 = ±inf (a constant non-zero difference is infinitely sure)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    ok = den > 0
    np.divide(num, den, out=out, where=ok)
    out[~ok & (num > 0)] = np.inf
    out[~ok & (num < 0)] = -np.inf
    return out


def _variance(s1: np.ndarray, s2: np.ndarray, n: int) -> np.ndarray:
    """Sample variance (ddof=1) from Σx and Σx²; round-off below the tolerance becomes 0."""
    mean = s1 / n
    ss = s2 - n * mean * mean
    ss[ss <= _ZERO_VAR_RTOL * s2] = 0.0
    return np.maximum(ss, 0.0) / max(n - 1, 1)


def two_sided_p(z: np.ndarray) -> np.ndarray:
    """Two-sided normal p-value of z (inf gives 0, NaN gives 1)."""
    z = np.asarray(z, dtype=np.float64)
    p = 2.0 * ndtr(-np.abs(z))
    return np.where(np.isnan(p), 1.0, p)


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """BH-adjusted q-values (step-up, monotone, clipped at 1); NaN p-values count as 1."""
    p = np.asarray(p_values, dtype=np.float64)
    p = np.where(np.isnan(p), 1.0, p)
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    ranked = p[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    q = np.empty(m, dtype=np.float64)
    q[order] = np.minimum(ranked, 1.0)
    return q


def split_halves(n_pairs: int, seed: int) -> np.ndarray:
    """Boolean mask of the first half of a fixed seeded split of the pairs (⌊n/2⌋ pairs)."""
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n_pairs)
    mask = np.zeros(n_pairs, dtype=bool)
    mask[perm[: n_pairs // 2]] = True
    return mask


def _bootstrap_ci(
    chosen: sp.csr_matrix,
    rejected: sp.csr_matrix,
    columns: np.ndarray,
    n_bootstrap: int,
    seed: int,
    confidence: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of the mean paired difference for `columns`, resampling pairs.

    The resampling counts of replicate chunk j come from the generator seeded (seed, j), so every
    column block sees the same replicates and the result does not depend on the block size.
    """
    n = chosen.shape[0]
    m = len(columns)
    low = np.full(m, np.nan)
    high = np.full(m, np.nan)
    if n_bootstrap <= 0 or m == 0 or n == 0:
        return low, high
    block = max(1, min(m, _BOOT_BUDGET // n_bootstrap))
    tail = (1.0 - confidence) / 2.0
    offsets = None
    for b0 in range(0, m, block):
        cols = columns[b0 : b0 + block]
        diff_t = (chosen[:, cols] - rejected[:, cols]).T.tocsr()  # [cols, n], sparse
        means = np.empty((len(cols), n_bootstrap), dtype=np.float32)  # rows contiguous for the quantile
        for j, r0 in enumerate(range(0, n_bootstrap, _BOOT_CHUNK)):
            reps = min(_BOOT_CHUNK, n_bootstrap - r0)
            rng = np.random.default_rng([seed, 0xB007, j])
            idx = rng.integers(0, n, size=(reps, n))
            if offsets is None or len(offsets) != reps:
                offsets = (np.arange(reps) * n)[:, None]
            counts = np.bincount((idx + offsets).ravel(), minlength=reps * n).reshape(reps, n)
            means[:, r0 : r0 + reps] = (diff_t @ counts.T.astype(np.float64)) / n
        low[b0 : b0 + len(cols)], high[b0 : b0 + len(cols)] = np.quantile(means, [tail, 1.0 - tail], axis=1)
    return low, high


def paired_statistics(
    chosen: sp.spmatrix | np.ndarray,
    rejected: sp.spmatrix | np.ndarray,
    *,
    length_diff: np.ndarray | None = None,
    min_fire_count: int = 1,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    halves: np.ndarray | None = None,
) -> pd.DataFrame:
    """Statistics of every column firing in at least `min_fire_count` spans (chosen + rejected).

    `chosen`/`rejected` are [n_pairs, n_features] (sparse or dense, rows are pairs);
    `length_diff` the per-pair chosen − rejected completion length (None: no length control);
    `halves` a boolean mask of the first split half (default: `split_halves(n, seed)`).
    Returns one row per tested column with `feature` (the column index) and `STAT_COLUMNS`.
    """
    c = _as_csr(chosen)
    r = _as_csr(rejected)
    if c.shape != r.shape:
        raise ValueError(f"chosen {c.shape} and rejected {r.shape} feature matrices differ in shape; "
                         "both must be [n_pairs, n_features] with rows in the same pair order")
    n, n_cols = c.shape
    if n < 2:
        raise ValueError(f"paired statistics need at least 2 pairs, got {n}; audit more rows")
    if min_fire_count < 1:
        raise ValueError(f"min_fire_count must be >= 1, got {min_fire_count}")

    sc1, sc2, nzc = column_moments(c)
    sr1, sr2, nzr = column_moments(r)
    cols = np.flatnonzero(nzc + nzr >= min_fire_count)
    scr = cross_moment(c, r)

    sc1, sc2, sr1, sr2, scr = (a[cols] for a in (sc1, sc2, sr1, sr2, scr))
    sd1 = sc1 - sr1
    sd2 = sc2 + sr2 - 2.0 * scr
    mean_c, mean_r = sc1 / n, sr1 / n
    delta = sd1 / n
    var_d = _variance(sd1, sd2, n)
    sd_d = np.sqrt(var_d)
    cohens_d = _ratio(delta, sd_d)
    z = _ratio(delta, sd_d / np.sqrt(n))
    welch_z = _ratio(mean_c - mean_r, np.sqrt(_variance(sc1, sc2, n) / n + _variance(sr1, sr2, n) / n))

    half = split_halves(n, seed) if halves is None else np.asarray(halves, dtype=bool)
    if half.shape != (n,) or half.all() or not half.any():
        raise ValueError(f"halves must be a boolean mask of length {n} with both halves non-empty")
    w1 = half / half.sum()
    w2 = (~half) / (~half).sum()
    d1 = (c.T @ w1 - r.T @ w1)[cols]
    d2 = (c.T @ w2 - r.T @ w2)[cols]
    agree = (np.sign(d1) == np.sign(d2)) & (d1 != 0)
    delta_min = np.sign(delta) * np.minimum(np.abs(d1), np.abs(d2))

    delta_lc, z_lc = _length_controlled(c, r, cols, sd1, sd2, length_diff)
    ci_low, ci_high = _bootstrap_ci(c, r, cols, n_bootstrap, seed, confidence)

    return pd.DataFrame({
        "feature": cols.astype(np.int64),
        "n_fire_chosen": nzc[cols], "n_fire_rejected": nzr[cols],
        "mean_chosen": mean_c, "mean_rejected": mean_r, "delta": delta, "sd_diff": sd_d,
        "cohens_d": cohens_d, "z": z, "p_value": two_sided_p(z), "welch_z": welch_z,
        "ci_low": ci_low, "ci_high": ci_high, "delta_half1": d1, "delta_half2": d2,
        "split_half_agree": agree, "delta_min": delta_min,
        "delta_len_ctrl": delta_lc, "z_len_ctrl": z_lc,
    })


def _length_controlled(
    c: sp.csr_matrix,
    r: sp.csr_matrix,
    cols: np.ndarray,
    sd1: np.ndarray,
    sd2: np.ndarray,
    length_diff: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Intercept and its t-ratio of the OLS fit d = a + b·x per column (x = length difference).

    NaN when there is no length or when x is constant (the intercept is then not identified).
    """
    n = c.shape[0]
    m = len(cols)
    if length_diff is None:
        return np.full(m, np.nan), np.full(m, np.nan)
    x = np.asarray(length_diff, dtype=np.float64)
    if x.shape != (n,):
        raise ValueError(f"length_diff has shape {x.shape}, expected ({n},): one value per pair")
    x_mean = x.mean()
    sxx = float(((x - x_mean) ** 2).sum())
    if n < 3 or sxx <= 1e-12 * max(1.0, float((x * x).sum())):
        return np.full(m, np.nan), np.full(m, np.nan)
    sxy = (c.T @ x - r.T @ x)[cols] - n * x_mean * (sd1 / n)
    syy = sd2 - sd1 * sd1 / n
    slope = sxy / sxx
    intercept = sd1 / n - slope * x_mean
    sse = syy - slope * sxy
    sse[sse <= _ZERO_VAR_RTOL * np.maximum(sd2, 0.0)] = 0.0
    sigma2 = np.maximum(sse, 0.0) / (n - 2)
    se = np.sqrt(sigma2 * (1.0 / n + x_mean * x_mean / sxx))
    scale = np.sqrt(np.maximum(sd2, 0.0) / n)
    intercept = np.where(np.abs(intercept) <= 1e-9 * scale, 0.0, intercept)
    return intercept, _ratio(intercept, se)


def add_decisions(table: pd.DataFrame, *, alpha: float = 0.05, keys: Sequence[str] = ("hook", "feature"),
                  rank_by: str = "z") -> pd.DataFrame:
    """Add BH q-values (across all rows), the pass flag, the predicted DPO effect; sort by evidence.

    Rows that pass (split-half agreement and q < alpha) come first, then by |`rank_by`|
    descending ("z", or "delta_min" as the paper's method ranks); ties break on the `keys`
    columns so the order is deterministic. A `rank` column (1 = strongest) is prepended.
    """
    if rank_by not in ("z", "delta_min"):
        raise ValueError(f"rank_by={rank_by!r} is invalid: rank by 'z' or 'delta_min'")
    out = table.copy()
    out["q_value"] = benjamini_hochberg(out["p_value"].to_numpy(np.float64))
    out["passes"] = out["split_half_agree"].to_numpy(bool) & (out["q_value"].to_numpy() < alpha)
    out["predicted_shift"] = out["delta"].astype(np.float64)
    sign = np.sign(out["delta"].to_numpy(np.float64))
    direction = np.where(sign > 0, "amplify", np.where(sign < 0, "suppress", "none"))
    out["predicted_direction"] = np.where(out["passes"].to_numpy(bool), direction, "none")
    keys = [k for k in keys if k in out.columns]
    out["_abs_z"] = np.abs(out[rank_by].to_numpy(np.float64))
    out = out.sort_values(["passes", "_abs_z", *keys], ascending=[False, False, *([True] * len(keys))],
                          kind="mergesort").drop(columns="_abs_z")
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out.reset_index(drop=True)
