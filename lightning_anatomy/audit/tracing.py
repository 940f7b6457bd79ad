"""Which pairs make a concept's disparity: per-pair contributions and text snippets.

A concept's Δ is the mean of the per-pair differences d_i = chosen_i − rejected_i, so pair i
contributes d_i/n to it. The pairs that lean the same way as Δ the most are the ones a user
reads to decide what the concept is, and the ones a data filter would drop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from lightning_anatomy.concepts.span_features import SpanFeatures

TRACE_COLUMNS = (
    "hook", "feature", "rank", "row_id", "chosen_value", "rejected_value", "contribution", "share",
    "prompt", "chosen", "rejected",
)


def span_values(
    features: SpanFeatures, hook: str, feature_ids: Sequence[int], stat: str
) -> tuple[np.ndarray, np.ndarray]:
    """Dense (chosen, rejected) span values [n_pairs, len(feature_ids)] (float64) of a few features."""
    ids = np.asarray(feature_ids, dtype=np.int64)
    width = features.d_sae.get(hook)
    if width is None:
        raise KeyError(f"hook {hook!r} is not in the audited features; audited hooks: {features.hooks}")
    bad = ids[(ids < 0) | (ids >= width)]
    if len(bad):
        raise IndexError(f"feature {int(bad[0])} is out of range for hook {hook!r} (d_sae={width})")
    c = features.get(hook, "chosen", stat)[:, ids].toarray().astype(np.float64)
    r = features.get(hook, "rejected", stat)[:, ids].toarray().astype(np.float64)
    return c, r


def snippet(text: str, limit: int, *, from_end: bool = False) -> str:
    """At most `limit` characters of `text` with an ellipsis where it was cut."""
    if len(text) <= limit:
        return text
    return "…" + text[-limit:] if from_end else text[:limit] + "…"


def trace_pairs(
    features: SpanFeatures,
    hook: str,
    feature_ids: Sequence[int],
    *,
    stat: str = "max",
    k: int = 5,
    rows: Mapping[int, Any] | None = None,
    snippet_chars: int = 200,
) -> pd.DataFrame:
    """The `k` pairs leaning most in the direction of each feature's Δ (columns `TRACE_COLUMNS`).

    `contribution` is the pair's chosen − rejected value d_i; `share` is d_i/Σd, its fraction of
    the total disparity. Pairs that do not lean with Δ are never listed. `rows` maps row_id to a
    `PreferenceRow` (anything with prompt/chosen/rejected) for the snippets; the prompt snippet
    keeps the prompt's end, the completion snippets their start.
    """
    if k < 1:
        raise ValueError(f"k (pairs per concept) must be >= 1, got {k}")
    ids = [int(f) for f in feature_ids]
    if not ids:
        return pd.DataFrame(columns=list(TRACE_COLUMNS))
    c, r = span_values(features, hook, ids, stat)
    diff = c - r
    records = []
    for j, feature in enumerate(ids):
        d = diff[:, j]
        total = d.sum()
        lean = np.sign(total) * d if total != 0 else np.abs(d)
        order = np.argsort(-lean, kind="stable")
        order = order[lean[order] > 0][:k]
        for rank, i in enumerate(order, start=1):
            row_id = int(features.row_ids[i])
            row = rows.get(row_id) if rows is not None else None
            records.append({
                "hook": hook, "feature": feature, "rank": rank, "row_id": row_id,
                "chosen_value": float(c[i, j]), "rejected_value": float(r[i, j]),
                "contribution": float(d[i]), "share": float(d[i] / total) if total != 0 else np.nan,
                "prompt": snippet(row.prompt, snippet_chars, from_end=True) if row is not None else "",
                "chosen": snippet(row.chosen, snippet_chars) if row is not None else "",
                "rejected": snippet(row.rejected, snippet_chars) if row is not None else "",
            })
    return pd.DataFrame(records, columns=list(TRACE_COLUMNS))
