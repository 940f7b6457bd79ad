"""The tilt predictor: DPO's effect on every feature cluster at once, as an exponential tilt.

DPO's optimum is the exponential tilt of the reference, π*(y) ∝ π₀(y)·exp(r(y)/β). The paper's
predictor (`predictor="paper"`) predicts each cluster from its own mean chosen − rejected
disparity ū_m, as if the clusters were independent; where concepts correlate (style attributes
ride together, Bergen et al. §6) a cluster that only rides along with a rewarded one gets no
prediction, and a cluster the pairs vary independently but the model emits together with others
is predicted alone. The tilt predictor (`predictor="tilt"`) instead:

1. fits a Bradley–Terry reward on the clusters' activities, r(y) = w·a(y), by maximum likelihood
   on the pairs: P(chosen ≻ rejected) = σ(w·(a_chosen − a_rejected)), with an L2 penalty
   (λ/2)·‖w‖² on the mean negative log-likelihood. λ is picked from a log grid
   (`L2_GRID`, 1e-5 … 1e2) by the mean held-out pair log-likelihood of a seeded K-fold split of
   the pairs, with the one-standard-error rule (the strongest penalty whose held-out
   log-likelihood is within one standard error of the best's, so that noise without a
   preference signal shrinks w to ≈ 0), then w is refitted on all pairs. The solver is damped
   Newton in float64 (strictly convex for λ > 0; deterministic);
2. predicts each cluster's change as the change of its mean activity under the tilt
   exp(t·w·a) of a sample of responses a_1..a_N (`tilt_shift`): the full self-normalised tilt
   Σ_i softmax(t·r)_i·a_i − mean(a), and its first order Cov(a_m, w·a)·t. All clusters move
   jointly through the sample's own correlations, a common drift included.

The sample (`tilt_sample`) is by default the base policy's own rollouts where they exist
(`check_prediction` samples them), otherwise the dataset's responses (chosen and rejected of every
pair). A cluster that never fires in the rollouts cannot be predicted from them (its activity has
no variance there), so it falls back to the dataset's responses; `sample` names, per cluster,
which one was used. `tilt_sample="dataset"` uses the dataset's responses for every cluster, and
`"both"` pools the rollouts and the dataset's responses into one sample (each response one row),
so that a concept the base model shows rarely but the pairs carry often still has weight to move:
where DPO leaves the base model's support, a tilt of its rollouts alone can only reweight what
they already contain.

t (`tilt_scale`, default 1): at DPO's exact optimum t = 1/β, but a finite run moves less; the
first-order prediction is linear in t, so the Pearson R² does not depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import expit  # the numerically stable σ

if TYPE_CHECKING:  # pragma: no cover
    import os

    import pandas as pd

    from lightning_anatomy.audit.result import AuditResult
    from lightning_anatomy.concepts.span_features import SpanFeatures

PREDICTORS = ("paper", "tilt")
L2_GRID = tuple(float(10.0 ** k) for k in range(-5, 3))  # per-pair penalty λ: 1e-5 … 1e2
SAMPLES = ("rollouts", "dataset", "both")  # what the tilt reweights: see the module docstring


def check_predictor(name: object, option: str = "predictor") -> str:
    """`name` if it is a known predictor, else a ValueError naming it and the choices."""
    if not isinstance(name, str) or name not in PREDICTORS:
        raise ValueError(f"{option}={name!r} is invalid: choose one of {', '.join(PREDICTORS)} ('paper': each "
                         "cluster's own mean disparity; 'tilt': a joint Bradley–Terry reward propagated as a tilt)")
    return name


def check_predictors(names: Sequence[object], option: str = "predictors") -> list[str]:
    """`names` as a list if they are known predictors, at least one and each once, else a ValueError
    naming `option` (the Python argument or the CLI key)."""
    names = list(names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{option}={names!r} is invalid: pass distinct names from {PREDICTORS}")
    return [check_predictor(name, option) for name in names]


def check_sample(name: object, option: str = "tilt_sample") -> str:
    """`name` if it is a known tilt sample, else a ValueError naming it and the choices."""
    if not isinstance(name, str) or name not in SAMPLES:
        raise ValueError(f"{option}={name!r} is invalid: choose one of {', '.join(SAMPLES)} ('rollouts': the base "
                         "policy's rollouts, the dataset's responses for a cluster they never show; 'dataset': the "
                         "pairs' responses; 'both': the two pooled)")
    return name


# ------------------------------------------------------------------------------ Bradley–Terry


def bt_objective(w: np.ndarray, diff: np.ndarray, l2: float) -> float:
    """Mean negative log-likelihood of the pairs under σ(w·diff) plus (l2/2)·‖w‖²."""
    z = diff @ w
    return float(np.mean(np.logaddexp(0.0, -z)) + 0.5 * l2 * float(w @ w))


def fit_bradley_terry_fixed(diff: np.ndarray, l2: float, *, tol: float = 1e-12, max_iter: int = 100,
                            init: np.ndarray | None = None) -> np.ndarray:
    """The L2-regularised Bradley–Terry weights for one penalty `l2` > 0 (damped Newton, float64).

    `diff` [n_pairs, n_clusters]: chosen − rejected cluster activity per pair; `init` a start
    (the objective is strictly convex, so the optimum does not depend on it).
    """
    x = np.asarray(diff, dtype=np.float64)
    n, m = x.shape
    if not l2 > 0:
        raise ValueError(f"l2={l2!r} is invalid: the penalty must be > 0 (it keeps the fit unique)")
    w = np.zeros(m) if init is None else np.asarray(init, dtype=np.float64).copy()
    value = bt_objective(w, x, l2)
    for _ in range(max_iter):
        z = x @ w
        p = expit(-z)  # 1 − σ(z)
        grad = -(x.T @ p) / n + l2 * w
        if float(np.max(np.abs(grad), initial=0.0)) < tol:
            break
        s = p * (1.0 - p)
        hess = (x.T * s) @ x / n + l2 * np.eye(m)
        step = np.linalg.solve(hess, grad)
        decrement = float(grad @ step)
        if decrement < 1e-14:  # within float64 reach of the optimum: the full Newton step, then stop
            w = w - step
            break
        size = 1.0
        while True:  # Armijo backtracking
            trial = w - size * step
            new = bt_objective(trial, x, l2)
            if new <= value - 0.25 * size * decrement or size < 1e-10:
                break
            size *= 0.5
        if new > value:  # no progress at float64 precision: at the optimum
            break
        w, value = trial, new
        if decrement < 1e-20:  # the Newton decrement bounds the remaining gap in the objective
            break
    return w


@dataclass(frozen=True)
class BradleyTerryFit:
    """The fitted reward weights (one per cluster), the chosen penalty and its cross-validation."""

    weights: np.ndarray
    l2: float
    cv_loglik: dict[float, float] = field(default_factory=dict)  # λ -> mean held-out log-lik per pair
    n_pairs: int = 0
    n_folds: int = 0


def fit_bradley_terry(diff: np.ndarray, *, l2_grid: Sequence[float] = L2_GRID, n_folds: int = 5,
                      seed: int = 0) -> BradleyTerryFit:
    """Bradley–Terry weights with λ chosen by K-fold held-out pair log-likelihood (module docstring)."""
    x = np.asarray(diff, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"the Bradley–Terry fit needs a [n_pairs >= 2, n_clusters] disparity matrix, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("the pairs' cluster activity differences contain NaN or inf")
    grid = sorted({float(g) for g in l2_grid})
    if not grid or grid[0] <= 0:
        raise ValueError(f"l2_grid={tuple(l2_grid)!r} is invalid: pass penalties > 0")
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise ValueError(f"tilt_folds={n_folds!r} is invalid: pass an integer >= 2")
    n = x.shape[0]
    k = min(n_folds, n)
    order = np.random.default_rng([seed, 0xB7]).permutation(n)
    folds = np.array_split(order, k)
    scores: dict[float, float] = {}
    per_pair: dict[float, np.ndarray] = {}
    starts = [np.zeros(x.shape[1]) for _ in folds]
    for lam in reversed(grid):  # strongest penalty first; each fold warm-starts from the previous λ
        held_ll = np.empty(n)
        for f, held in enumerate(folds):
            train = np.setdiff1d(order, held, assume_unique=True)
            starts[f] = fit_bradley_terry_fixed(x[train], lam, init=starts[f])
            held_ll[held] = -np.logaddexp(0.0, -(x[held] @ starts[f]))
        per_pair[lam] = held_ll
        scores[lam] = float(held_ll.mean())
    best = max(grid, key=lambda g: (scores[g], g))
    # one-standard-error rule: the strongest penalty whose held-out log-likelihood is within one
    # standard error (over pairs, of its difference to the best) of the best's
    within = [g for g in grid if scores[best] - scores[g]
              <= float(np.std(per_pair[best] - per_pair[g])) / np.sqrt(n) + 1e-12]
    lam = max(within)
    return BradleyTerryFit(weights=fit_bradley_terry_fixed(x, lam), l2=lam, cv_loglik=scores, n_pairs=n, n_folds=k)


# ------------------------------------------------------------------------------ the tilt


def tilt_shift(sample: np.ndarray, weights: np.ndarray, *, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(full, first order): each column's mean change under the tilt exp(scale·w·a) of `sample` [N, M].

    full = Σ_i softmax(scale·r)_i·a_i − mean(a); first order = Cov(a_m, r)·scale (population
    covariance), r = sample @ weights.
    """
    a = np.asarray(sample, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] != w.shape[0]:
        raise ValueError(f"tilt_shift needs a [N >= 1, {w.shape[0]}] sample, got {a.shape}")
    r = scale * (a @ w)
    p = np.exp(r - r.max())
    p /= p.sum()
    mean = a.mean(axis=0)
    full = p @ a - mean
    first = (a - mean).T @ (r - r.mean()) / a.shape[0]
    return full, first


@dataclass(frozen=True)
class TiltPrediction:
    """Per cluster (in the given column order): the full tilt, its first order, and the sample used."""

    full: np.ndarray
    first_order: np.ndarray
    sample: np.ndarray  # "rollouts", "dataset" or "both" per cluster
    fit: BradleyTerryFit


def tilt_predict(
    chosen: np.ndarray,
    rejected: np.ndarray,
    *,
    rollouts: np.ndarray | None = None,
    sample: str = "rollouts",
    scale: float = 1.0,
    n_folds: int = 5,
    seed: int = 0,
    l2_grid: Sequence[float] = L2_GRID,
) -> TiltPrediction:
    """The tilt prediction from the pairs' cluster activities [n_pairs, M] (chosen, rejected).

    With `sample="rollouts"` the tilt runs on `rollouts` [N, M] (the base policy's cluster
    activities) when given; clusters that never fire there, and every cluster without rollouts, use
    the dataset's responses (chosen and rejected stacked). `sample="dataset"` ignores the rollouts;
    `sample="both"` tilts the rollouts and the dataset's responses pooled (it needs `rollouts`).
    """
    c = np.asarray(chosen, dtype=np.float64)
    r = np.asarray(rejected, dtype=np.float64)
    if c.shape != r.shape or c.ndim != 2:
        raise ValueError(f"chosen and rejected cluster activities must share a 2-d shape, got {c.shape} and {r.shape}")
    if not (isinstance(scale, int | float) and np.isfinite(scale) and scale > 0):
        raise ValueError(f"tilt_scale={scale!r} is invalid: pass a number > 0 (1: the Bradley–Terry reward as is)")
    check_sample(sample)
    a = None
    if rollouts is not None:
        a = np.asarray(rollouts, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != c.shape[1]:
            raise ValueError(f"rollouts must be [n_rollouts, {c.shape[1]}] cluster activities, got {a.shape}")
    if sample == "both" and (a is None or not a.shape[0]):
        raise ValueError("tilt_sample='both' pools the base policy's rollouts with the dataset's responses, but no "
                         "rollouts were given; use check_prediction (it samples them) or tilt_sample='dataset'")
    fit = fit_bradley_terry(c - r, l2_grid=l2_grid, n_folds=n_folds, seed=seed)
    dataset = np.vstack([c, r])
    if sample == "both":
        full, first = tilt_shift(np.vstack([a, dataset]), fit.weights, scale=scale)
        return TiltPrediction(full=full, first_order=first, sample=np.full(c.shape[1], "both", dtype=object), fit=fit)
    full, first = tilt_shift(dataset, fit.weights, scale=scale)
    used = np.full(c.shape[1], "dataset", dtype=object)
    if sample == "rollouts" and a is not None and a.shape[0]:
        fires = np.any(a != 0, axis=0)
        full_r, first_r = tilt_shift(a, fit.weights, scale=scale)
        full = np.where(fires, full_r, full)
        first = np.where(fires, first_r, first)
        used[fires] = "rollouts"
    return TiltPrediction(full=full, first_order=first, sample=used, fit=fit)


def pair_cluster_activity(
    features: SpanFeatures, assignments: pd.DataFrame, clusters: Sequence[int], *, tau: float,
    measure: str = "active",
) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) [n_pairs, len(clusters)]: each pair's cluster activity, measured as on rollouts.

    Read through `ClusterReader` (`audit.rollouts`) from the span firing frequencies ("freq"), or,
    for a loaded paper audit that kept only 1{freq > τ} ("active"), from those at the audit's τ.
    """
    from lightning_anatomy.audit.rollouts import ClusterReader

    reader = ClusterReader(assignments, dict(features.d_sae), clusters, tau=tau, measure=measure)
    hooks = list(reader.maps)
    if all((h, s, "freq") in features.matrices for h in hooks for s in ("chosen", "rejected")):
        stat = "freq"
    elif all((h, s, "active") in features.matrices for h in hooks for s in ("chosen", "rejected")):
        kept_tau = features.meta.get("active_tau")
        if kept_tau is None:
            raise ValueError("the saved audit kept only 1{freq > τ} per span and not its τ (saved before the tilt "
                             "predictor could read it back); re-run the audit, or use the in-memory audit")
        if measure != "active" or not np.isclose(float(kept_tau), tau):
            raise ValueError(f"the audit kept only 1{{freq > {kept_tau}}} per span; the tilt predictor with "
                             f"measure={measure!r}, tau={tau} needs the firing frequencies: pass tau={kept_tau} "
                             "and measure='active', or use the in-memory audit")
        stat = "active"
    else:
        raise ValueError("predictor 'tilt' needs the audit's span firing frequencies (stat 'freq') for the pairs; "
                         "use the audit result in memory or one saved with its features")
    chosen = reader.values({h: features.get(h, "chosen", stat) for h in hooks})
    rejected = reader.values({h: features.get(h, "rejected", stat) for h in hooks})
    return chosen, rejected


def predictions_for(audit_result: AuditResult | str | os.PathLike, predictor: str) -> pd.DataFrame:
    """`audit_result.cluster_predictions` (hook, cluster, predicted_shift, n_features) as `predictor`
    predicts them: "paper" each cluster's own Δ, "tilt" the tilt of the dataset's responses (the
    audit's pairs at its τ); the audit's own predictor's table as is. Rows without a finite
    prediction are dropped."""
    import os

    check_predictor(predictor)
    if isinstance(audit_result, str | os.PathLike):
        from lightning_anatomy.audit.result import AuditResult

        audit_result = AuditResult.load(audit_result)
    options = dict(getattr(audit_result, "options", {}) or {})
    table = audit_result.cluster_predictions
    if predictor != str(options.get("predictor", "paper")) and len(table):
        ids = table["cluster"].to_numpy(np.int64)
        if predictor == "paper":
            shift = audit_result.clusters.set_index("cluster")["delta"].loc[ids].to_numpy(np.float64)
        else:
            if audit_result.features is None:
                raise ValueError("predictor='tilt' refits the reward on the audit's pairs, but this audit carries no "
                                 "span features; pass the in-memory audit or one saved with its features")
            chosen, rejected = pair_cluster_activity(audit_result.features, audit_result.feature_clusters, ids,
                                                     tau=float(options.get("tau", 0.01)))
            shift = tilt_predict(chosen, rejected, scale=float(options.get("tilt_scale", 1.0)),
                                 n_folds=int(options.get("tilt_folds", 5)), seed=int(options.get("seed", 0))).full
        table = table.assign(predicted_shift=shift)
    keep = np.isfinite(table["predicted_shift"].to_numpy(np.float64))
    return table[keep].reset_index(drop=True)
