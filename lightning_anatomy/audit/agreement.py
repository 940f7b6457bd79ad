"""How well predicted concept shifts match observed ones: R², its bootstrap CI, sign agreement.

Two R²s, because they answer different questions:

- `r_squared`: the squared Pearson correlation (the paper's measure; equal to the R² of an OLS
  fit *with* intercept). Blind to scale and offset: 1 when observed = a + b·predicted, b ≠ 0.
- `r_squared_through_origin`: R² of the OLS fit observed = b·predicted *without* intercept,
  against the mean of observed (1 − Σ(o − b·p)² / Σ(o − ō)²). The predictor says a concept with
  no chosen−rejected lean does not move, so a common offset (every cluster drifting one way) is a
  miss here while Pearson forgives it; it can be negative.

Both are undefined (None / NaN) with fewer than two points or a constant series.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _pair(predicted: Sequence[float] | np.ndarray, observed: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(predicted, dtype=np.float64)
    y = np.asarray(observed, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"r_squared needs two 1-d series of equal length, got shapes {x.shape} and {y.shape}")
    return x, y


def r_squared(predicted: Sequence[float] | np.ndarray, observed: Sequence[float] | np.ndarray) -> float | None:
    """Squared Pearson correlation of two equal-length series; None where it is undefined
    (fewer than two points, or either series constant)."""
    x, y = _pair(predicted, observed)
    if x.size < 2:
        return None
    xc, yc = x - x.mean(), y - y.mean()
    sxx, syy = float(xc @ xc), float(yc @ yc)
    if sxx <= 1e-300 or syy <= 1e-300:
        return None
    return min(1.0, float(xc @ yc) ** 2 / (sxx * syy))


def r_squared_through_origin(predicted: Sequence[float] | np.ndarray, observed: Sequence[float] | np.ndarray
                             ) -> float | None:
    """R² of observed ≈ b·predicted (no intercept) against the mean of observed; None if undefined."""
    x, y = _pair(predicted, observed)
    if x.size < 2:
        return None
    sxx = float(x @ x)
    yc = y - y.mean()
    syy = float(yc @ yc)
    if sxx <= 1e-300 or syy <= 1e-300:
        return None
    b = float(x @ y) / sxx
    resid = y - b * x
    return 1.0 - float(resid @ resid) / syy


def bootstrap_r_squared_ci(
    predicted: Sequence[float] | np.ndarray,
    observed: Sequence[float] | np.ndarray,
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the squared Pearson correlation, resampling the points (clusters).

    Resamples where R² is undefined (e.g. one distinct point drawn) are skipped; (NaN, NaN) when
    none is defined or `n_bootstrap` is 0.
    """
    x, y = _pair(predicted, observed)
    if n_bootstrap <= 0 or x.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng([seed, 0xB2])
    idx = rng.integers(0, x.size, size=(n_bootstrap, x.size))
    xs, ys = x[idx], y[idx]
    xc = xs - xs.mean(axis=1, keepdims=True)
    yc = ys - ys.mean(axis=1, keepdims=True)
    sxx, syy, sxy = (xc * xc).sum(1), (yc * yc).sum(1), (xc * yc).sum(1)
    ok = (sxx > 1e-300) & (syy > 1e-300)
    if not ok.any():
        return float("nan"), float("nan")
    r2 = np.minimum(sxy[ok] ** 2 / (sxx[ok] * syy[ok]), 1.0)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(r2, [tail, 1.0 - tail])
    return float(lo), float(hi)


def sign_agreement(predicted: Sequence[float] | np.ndarray, observed: Sequence[float] | np.ndarray) -> float:
    """Fraction of points with a non-zero prediction whose observed change has the same sign
    (no change counts as a miss); NaN when every prediction is 0."""
    x, y = _pair(predicted, observed)
    called = x != 0
    if not called.any():
        return float("nan")
    return float(np.mean(np.sign(y[called]) == np.sign(x[called])))
