"""The explain-away λ of reward shaping: how much of the preference a concept score alone explains.

Reward shaping trains on −log σ(β·Δθ + λ·ΔA). The λ that makes the concept's own share of the
preference "already paid" is the maximum-likelihood Bradley–Terry coefficient of ΔA on the
preferences (every pair says chosen ≻ rejected):

    λ̂ = argmax_λ Σᵢ log σ(λ·ΔAᵢ).

The objective is concave in λ; its derivative Σᵢ ΔAᵢ·σ(−λ·ΔAᵢ) falls strictly wherever some
ΔAᵢ ≠ 0, so the maximum is unique and finite exactly when ΔA takes both signs. When every non-zero
ΔA has one sign the concept alone orders every pair (perfect confounding): the likelihood keeps
rising as |λ| grows, and no per-pair method (reward shaping, token filtering, inoculation) can tell
the concept from the preference. `ConfoundedConceptError` says so and names the
representation-level methods instead. Pairs with ΔA = 0 carry no information about λ (their term
is log ½ for every λ).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
from scipy.special import expit  # the numerically stable σ

REPRESENTATION_METHODS = ("ConceptProjection", "ConceptBlocking", "ConceptSteering")
_MAX_ITER = 200


class ConfoundedConceptError(ValueError):
    """The concept score orders every informative pair the same way: the explain-away λ is infinite."""


def _as_float64(delta_scores: Mapping[int, float] | Iterable[float]) -> np.ndarray:
    values = delta_scores.values() if isinstance(delta_scores, Mapping) else delta_scores
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().double().numpy()
    try:
        out = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise ValueError(
            "explain_away_lambda: delta_scores must be numbers (a {row_id: ΔA} dict, a list, an array or a tensor)"
        ) from None
    return out


def _gradient(lam: float, d: np.ndarray) -> float:
    """d/dλ Σ log σ(λ·d) = Σ d·σ(−λ·d), with σ computed stably (float64)."""
    return float(np.sum(d * expit(-lam * d)))


def _curvature(lam: float, d: np.ndarray) -> float:
    """−d²/dλ² of the log-likelihood: Σ d²·σ(λd)·σ(−λd) (positive)."""
    s = expit(lam * d)
    return float(np.sum(d * d * s * (1.0 - s)))


def explain_away_lambda(delta_scores: Mapping[int, float] | Iterable[float]) -> float:
    """λ̂ = argmax_λ Σᵢ log σ(λ·ΔAᵢ): the Bradley–Terry MLE of the concept score on the preferences.

    The value to pass as `RewardShaping(lam=...)` (what `lam="auto"` does): with it the concept's
    share of each pair's margin counts as already learned, so DPO has no reason to push the concept
    itself. Computed on the values as given (no rescaling: z-score them first, e.g.
    `compute_concept_scores(..., zscore=True)`, if λ should be on that scale), by a safeguarded
    Newton solve on a bracket in float64; deterministic.

    Args:
        delta_scores: ΔA per pair (score of chosen − score of rejected): a `{row_id: ΔA}` mapping,
            a sequence, an array or a tensor.

    Returns:
        The finite λ̂ (positive when the concept is more present in chosen completions).

    Raises:
        ValueError: no scores, a non-finite score, or only zeros (no information about λ).
        ConfoundedConceptError: every non-zero ΔA has the same sign, so the MLE is infinite.
    """
    d = _as_float64(delta_scores)
    if d.size == 0:
        raise ValueError("explain_away_lambda got no scores; pass ΔA for the training pairs (compute_concept_scores)")
    if not np.isfinite(d).all():
        bad = int(np.flatnonzero(~np.isfinite(d))[0])
        raise ValueError(f"explain_away_lambda: score {bad} is {d[bad]!r}; scores must be finite numbers")
    d = d[d != 0.0]
    if d.size == 0:
        raise ValueError(
            "explain_away_lambda: every ΔA is 0, which says nothing about λ (each pair's likelihood is σ(0) for "
            "every λ); the concept score does not differ between chosen and rejected completions"
        )
    n_pos, n_neg = int((d > 0).sum()), int((d < 0).sum())
    if n_pos == 0 or n_neg == 0:
        side = "chosen" if n_neg == 0 else "rejected"
        raise ConfoundedConceptError(
            f"explain_away_lambda: all {d.size} non-zero ΔA are {'positive' if n_neg == 0 else 'negative'} (the "
            f"concept is higher in the {side} completion of every pair that differs), so the maximum-likelihood λ is "
            "infinite: the concept alone orders every pair (perfect confounding) and per-pair methods (reward "
            "shaping, token filtering, inoculation) cannot separate it from the preference. Use a representation-"
            f"level method instead: {', '.join(REPRESENTATION_METHODS)}"
        )
    # The gradient falls strictly from Σ|d|·½·sign at 0; bracket its root by doubling.
    g0 = _gradient(0.0, d)
    if g0 == 0.0:
        return 0.0
    direction = 1.0 if g0 > 0 else -1.0
    scale = 1.0 / float(np.max(np.abs(d)))
    lo, hi = 0.0, direction * scale
    while _gradient(hi, d) * direction > 0:
        lo, hi = hi, hi * 2.0
        if not math.isfinite(hi):  # cannot happen with both signs present, kept as a guard
            raise ConfoundedConceptError("explain_away_lambda: the likelihood did not turn; the MLE is infinite")
    a, b = (lo, hi) if lo < hi else (hi, lo)  # g(a) > 0 > g(b)
    lam = 0.5 * (a + b)
    for _ in range(_MAX_ITER):
        g = _gradient(lam, d)
        if g == 0.0:
            return lam
        if g > 0:
            a = lam
        else:
            b = lam
        h = _curvature(lam, d)
        step = lam + g / h if h > 0 else 0.5 * (a + b)
        if not a < step < b:  # Newton left the bracket: bisect
            step = 0.5 * (a + b)
        if abs(step - lam) <= 1e-15 * max(1.0, abs(lam)) or b - a <= 1e-15 * max(1.0, abs(lam)):
            return step
        lam = step
    return lam


def pair_auroc(delta_scores: Mapping[int, float] | Iterable[float]) -> float:
    """The pair-level AUROC of ΔA for "chosen": P(score of chosen > score of rejected), ties ½.

    1.0 (or 0.0) means the concept alone orders every pair (perfect confounding, where
    `explain_away_lambda` raises); 0.5 means it is independent of the preference.
    """
    d = _as_float64(delta_scores)
    if d.size == 0 or not np.isfinite(d).all():
        raise ValueError("pair_auroc needs at least one finite ΔA")
    return float(((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size)


def confounding(delta_scores: Mapping[int, float] | Iterable[float]) -> dict[str, float]:
    """`{"lambda": explain-away λ (±inf when perfectly confounded), "auroc": pair_auroc}` for a report."""
    auroc = pair_auroc(delta_scores)
    try:
        lam = explain_away_lambda(delta_scores)
    except ConfoundedConceptError:
        lam = math.inf if auroc > 0.5 else -math.inf
    return {"lambda": lam, "auroc": auroc}


__all__ = ["REPRESENTATION_METHODS", "ConfoundedConceptError", "confounding", "explain_away_lambda", "pair_auroc"]
