"""The paper's style mechanisms as benchmark conditions, package-found and oracle (issue 22, item 4).

Both intervention benchmarks (`interventions.py`, controlled; `interventions_smollm2.py`, real
text) add the same conditions, so a miss can be read as the mechanism's or the read-out's:

- `token_filtering_sae` / `token_filtering_direction`: `TokenFiltering` on the audit's SAE
  features (a token is dropped where one fires) / on the difference-of-means direction (above a
  quantile of its token scores picked on the tuning seed);
- `inoculation`: `interventions.inoculate` on the pairs whose chosen completion carries the
  package-found concept (an SAE feature fires on one of its tokens); the reference scores the
  original prompt;
- `reward_shaping_auto`: `RewardShaping(lam="auto")` on the paper's scoring (per side the max over
  completion tokens of the SAE features, z-scored over the data set);
- `oracle_<mechanism>`: the same mechanism with the ground truth as its read-out (the marker's
  text as the token mask, the carrier label as the inoculation flag and as the shaping score):
  the ceiling of that mechanism on that data.

The read-out quality beside them, against the ground truth: the token-level AUROC of the
package's token score on the marker's tokens, and the pair-level AUROC of ΔA (package) for the
pairs whose chosen side carries the property more than the rejected one against the others.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PACKAGE_CONDITIONS = ("token_filtering_sae", "token_filtering_direction", "inoculation", "reward_shaping_auto")
ORACLE_CONDITIONS = ("oracle_token_filtering", "oracle_inoculation", "oracle_reward_shaping")
CONDITIONS = (*PACKAGE_CONDITIONS, *ORACLE_CONDITIONS)
NOTES = {
    "token_filtering": "TokenFiltering on the audit's SAE features (threshold 0: the feature fires) or the "
                       "difference-of-means direction (Quantile picked on the tuning seed); oracle: the marker's text "
                       "as the pattern",
    "inoculation": "inoculate(rows, flagged, instruction): flagged = pairs whose chosen completion has a token where "
                   "an audit SAE feature fires; oracle: the ground-truth carrier label; the reference scores the "
                   "original prompt",
    "reward_shaping_auto": "RewardShaping(lam='auto') on ΔA = z-scored max over completion tokens of the audit's SAE "
                           "features (the paper's scoring); oracle: ΔA = carrier label of chosen − of rejected",
    "not_applicable": "a condition the data cannot run, with why (e.g. a perfectly confounded oracle score: the "
                      "explain-away λ is infinite, ConfoundedConceptError)",
    "readout": "token_auroc: AUROC of the package's token score for the marker's tokens (both sides, every completion "
               "token); pair_auroc: AUROC of the package's ΔA for pairs where chosen carries the property more than "
               "rejected (ground-truth Δ > 0) vs the others; mean over seeds with the per-seed values",
}


class NotApplicable(Exception):
    """A condition this data cannot run (recorded with its reason instead of a result)."""


# ------------------------------------------------------------------------------ read-out quality
def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """P(a positive scores above a negative), ties ½ (Mann–Whitney); None when a class is empty."""
    pos, neg = np.asarray(positives, dtype=np.float64), np.asarray(negatives, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def marker_token_masks(pairs: Sequence[Any], tokenizer: Any, pattern: str) -> dict[int, tuple[list[bool], list[bool]]]:
    """Ground truth per completion token: does it overlap a match of `pattern` (a regular expression)?"""
    from lightning_anatomy.interventions.token_filter import compile_patterns, pattern_hits

    compiled = compile_patterns([pattern])
    return {p.row_id: (pattern_hits(tokenizer, p.chosen_ids, compiled)[0],
                       pattern_hits(tokenizer, p.rejected_ids, compiled)[0]) for p in pairs}


def token_auroc(scores: Mapping[int, tuple[Sequence[float], Sequence[float]]],
                truth: Mapping[int, tuple[Sequence[bool], Sequence[bool]]]) -> float | None:
    """Token-level AUROC of per-token scores for the ground-truth marker tokens."""
    pos: list[float] = []
    neg: list[float] = []
    for rid, sides in truth.items():
        for side_scores, side_truth in zip(scores[rid], sides):
            for s, t in zip(side_scores, side_truth):
                (pos if t else neg).append(float(s))
    return auroc(pos, neg)


def pair_readout_auroc(delta: Mapping[int, float], true_delta: Mapping[int, float]) -> float | None:
    """Pair-level AUROC of the package's ΔA for the pairs whose chosen side carries the property
    more than the rejected one (ground-truth Δ > 0) against the others (Δ ≤ 0)."""
    pos = [delta[r] for r, t in true_delta.items() if t > 0]
    neg = [delta[r] for r, t in true_delta.items() if t <= 0]
    return auroc(pos, neg)


def readout_summary(per_seed: Sequence[Any]) -> dict[str, Any]:
    """The read-outs' quality over seeds: the mean of each measure over the seeds where it is defined
    (None where none is), beside the per-seed entries (a dict of `Readouts.quality()`, possibly with
    its `seed` or an `error`, or the reason there is none as a string)."""
    measured = [r for r in per_seed if isinstance(r, dict)]
    mean: dict[str, float | None] = {}
    for k in dict.fromkeys(k for r in measured for k in r if k not in ("seed", "error")):
        values = [r[k] for r in measured if r.get(k) is not None]
        mean[k] = float(np.mean(values)) if values else None
    return {"mean": mean, "per_seed": list(per_seed)}


# ------------------------------------------------------------------------------ package read-outs
@dataclass
class Readouts:
    """One seed's package-found read-outs on the training pairs, measured once with the base model."""

    sae_token_scores: dict[int, tuple[list[float], list[float]]]  # max over the picked SAE features
    direction_token_scores: dict[int, tuple[list[float], list[float]]]
    sae_delta: dict[int, float]  # the paper's ΔA: z-scored max over completion tokens
    true_delta: dict[int, float]
    token_truth: dict[int, tuple[list[bool], list[bool]]] | None  # None: the concept sits in no completion token

    def flagged(self) -> set[int]:
        """Pairs whose chosen completion has a token where a picked SAE feature fires."""
        return {rid for rid, (chosen, _) in self.sae_token_scores.items() if any(s > 0 for s in chosen)}

    def quality(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {"pair_auroc_sae": pair_readout_auroc(self.sae_delta, self.true_delta),
                                        "flagged_fraction": len(self.flagged()) / max(1, len(self.sae_token_scores))}
        if self.token_truth is not None:
            out["token_auroc_sae"] = token_auroc(self.sae_token_scores, self.token_truth)
            out["token_auroc_direction"] = token_auroc(self.direction_token_scores, self.token_truth)
        return out


def measure_readouts(model: Any, pairs: Sequence[Any], tokenizer: Any, *, hook: str, sae: Any, features: Sequence[int],
                     direction: Any, true_delta: Mapping[int, float], marker_pattern: str | None,
                     batch_size: int = 16) -> Readouts:
    """The package-found token scores and ΔA of one seed, and the ground truth they are judged by."""
    from lightning_anatomy.interventions import compute_concept_scores
    from lightning_anatomy.interventions.token_filter import (
        direction_score,
        measure_token_scores,
        sae_feature_score,
    )

    if not features:
        raise NotApplicable("the audit picked no SAE feature for the concept")
    scorers = {f"f{f}": sae_feature_score(sae, hook, int(f)) for f in features}
    vector = next(iter(direction.select(action="suppress"))).vector
    scorers["direction"] = direction_score(hook, vector)
    pad = tokenizer.pad_token_id
    scores = measure_token_scores(model, pairs, scorers, pad_token_id=pad, batch_size=batch_size)
    sae_scores = {rid: tuple([max(vals) for vals in zip(*(scores[f"f{f}"][rid][i] for f in features))]
                             for i in (0, 1)) for rid in scores["direction"]}
    delta = compute_concept_scores(model, pairs, hook=hook, sae=sae, feature=[int(f) for f in features],
                                   tokenizer_pad_id=pad, batch_size=batch_size, reduce="max", zscore=True)
    truth = marker_token_masks(pairs, tokenizer, marker_pattern) if marker_pattern is not None else None
    return Readouts(sae_scores, scores["direction"], delta, dict(true_delta), truth)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ conditions
def token_filtering_sae(hook: str, sae: Any, features: Sequence[int]) -> list[Any]:
    from lightning_anatomy import TokenFiltering

    if not features:
        raise NotApplicable("the audit picked no SAE feature for the concept")
    return [TokenFiltering(concepts={f"f{f}": (hook, int(f)) for f in features}, saes={hook: sae})]


def token_filtering_direction(direction: Any, quantile: float) -> list[Any]:
    from lightning_anatomy import TokenFiltering
    from lightning_anatomy.interventions.token_filter import Quantile

    return [TokenFiltering(concepts=direction, threshold=Quantile(quantile))]


def oracle_token_filtering(marker_pattern: str | None) -> list[Any]:
    from lightning_anatomy import TokenFiltering

    if marker_pattern is None:
        raise NotApplicable("the spurious property sits in the prompt, not in completion tokens: nothing to filter")
    return [TokenFiltering(patterns=[marker_pattern])]


def inoculated(rows: Sequence[Any], flagged: Callable[[Any], bool] | set[int], instruction: str) -> list[Any]:
    """The rows with `instruction` appended to the flagged pairs' user turn (reference: original prompt)."""
    from lightning_anatomy.interventions import inoculate

    try:
        return list(inoculate(rows, flagged, instruction, sides="chosen"))
    except ValueError as err:  # e.g. a flag that selects no pair
        raise NotApplicable(str(err)) from None


def shaping_auto(delta: Mapping[int, float]) -> list[Any]:
    """`RewardShaping(lam="auto")`; a perfectly confounded score is recorded as not applicable."""
    from lightning_anatomy.callbacks import RewardShaping
    from lightning_anatomy.interventions import ConfoundedConceptError

    try:
        return [RewardShaping(dict(delta), lam="auto")]
    except ConfoundedConceptError as err:  # the package's message names the remedy; the table needs the fact
        side = "higher" if "positive" in str(err) else "lower"
        raise NotApplicable(f"perfectly confounded (ConfoundedConceptError): every pair whose score differs has it "
                            f"{side} in chosen, so the explain-away λ is infinite") from None


def marker_pattern_of(marker: str) -> str:
    """The regular expression of a literal marker's visible text (its leading space is a separate token)."""
    return re.escape(marker.strip())
