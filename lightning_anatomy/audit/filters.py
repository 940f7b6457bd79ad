"""Data interventions from an audit: drop or down-weight the pairs that carry a concept.

A pair's *concept score* is how much it leans, chosen over rejected, towards the concepts a user
decided to suppress, in units of each concept's spread:

    score_i = Σ_f sign(Δ_f) · (c_if − r_if) / sd_f

(sd_f the sd of the paired differences of concept f). A pair that does not fire the concept scores
0; one that teaches the opposite lean scores below 0. Pairs absent from the audit (e.g. dropped
at tokenization) score 0 and are kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_anatomy.audit.result import AuditResult
from lightning_anatomy.audit.tracing import span_values
from lightning_anatomy.files import atomic_write_file, atomic_write_text


def pair_scores(result: AuditResult, concepts: Sequence[tuple[str, int]]) -> dict[int, float]:
    """row_id -> concept score (see the module docstring) of every audited pair."""
    if result.features is None:
        raise ValueError("this audit carries no span features; run it in this process or load one saved with "
                         "its features (AuditResult.save(..., with_features=True))")
    picked = [(str(h), int(f)) for h, f in concepts]
    if not picked:
        raise ValueError("concepts is empty; pass [(hook, feature), ...], e.g. result.select(top=5)")
    total = np.zeros(result.features.n_pairs, dtype=np.float64)
    for hook in dict.fromkeys(h for h, _ in picked):
        ids = [f for h, f in picked if h == hook]
        rows = [result.concept(hook, f) for f in ids]
        c, r = span_values(result.features, hook, ids, result.stat)
        sign = np.array([np.sign(row["delta"]) for row in rows])
        sd = np.array([row["sd_diff"] for row in rows], dtype=np.float64)
        scale = np.where(sd > 0, sd, 1.0)
        total += ((c - r) * (sign / scale)).sum(axis=1)
    return {int(rid): float(s) for rid, s in zip(result.features.row_ids, total)}


def _row_dict(row: Any) -> dict[str, Any]:
    out = {"prompt": row.prompt, "chosen": row.chosen, "rejected": row.rejected, "row_id": int(row.row_id),
           "weight": float(row.weight)}
    return out


def write_rows(rows: Iterable[Any], path: str | os.PathLike) -> Path:
    """Write rows as explicit-layout JSONL (prompt, chosen, rejected, row_id, weight), atomically.

    `read_preferences` reads the file back (explicit layout, weights kept; row ids renumber in
    file order, the original id stays in the `row_id` field).
    """
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(_row_dict(row), ensure_ascii=False) + "\n")

    return atomic_write_file(path, write)


def _write_json(obj: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def _check_rows(rows: Sequence[Any]) -> None:
    seen: set[int] = set()
    for i, row in enumerate(rows):
        if not all(hasattr(row, a) for a in ("prompt", "chosen", "rejected", "row_id", "weight")):
            raise TypeError(f"row {i} is a {type(row).__name__}, not a PreferenceRow; pass read_preferences(...) output")
        if int(row.row_id) in seen:
            raise ValueError(f"row {i} repeats row_id {row.row_id}; row ids must be unique to match the audit")
        seen.add(int(row.row_id))


def _concept_report(result: AuditResult, picked: Sequence[tuple[str, int]]) -> list[dict[str, Any]]:
    out = []
    for h, f in picked:
        row = result.concept(h, f)
        out.append({"hook": h, "feature": f, "label": str(row.get("label", "")), "delta": float(row["delta"]),
                    "q_value": float(row["q_value"]), "passes": bool(row["passes"])})
    return out


def filter_pairs(
    rows: Sequence[Any],
    result: AuditResult,
    *,
    concepts: Sequence[tuple[str, int]],
    drop_fraction: float,
    out_path: str | os.PathLike | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """Drop the top ⌊drop_fraction·n⌋ pairs by concept score (only pairs with score > 0).

    Ties break by position in `rows` (earlier first). Returns (kept rows in their original order,
    report). With `out_path`, the kept rows go to that JSONL and the report beside it
    (`<name>.report.json`), both atomically.
    """
    if not (isinstance(drop_fraction, int | float) and 0 <= drop_fraction <= 1):
        raise ValueError(f"drop_fraction must be a number in [0, 1] (the fraction of pairs to drop), got {drop_fraction!r}")
    _check_rows(rows)
    picked = [(str(h), int(f)) for h, f in concepts]
    scores = pair_scores(result, picked)
    score = np.array([scores.get(int(r.row_id), 0.0) for r in rows])
    budget = math.floor(drop_fraction * len(rows) + 1e-9)
    order = np.argsort(-score, kind="stable")
    dropped_pos = [int(i) for i in order[:budget] if score[i] > 0]
    dropped_set = set(dropped_pos)
    kept = [r for i, r in enumerate(rows) if i not in dropped_set]
    report = {
        "intervention": "filter_pairs",
        "concepts": _concept_report(result, picked),
        "score": "sum over concepts of sign(delta) * (chosen - rejected) / sd_diff",
        "drop_fraction": float(drop_fraction),
        "n_rows": len(rows), "n_dropped": len(dropped_pos), "n_kept": len(kept),
        "dropped": [{"row_id": int(rows[i].row_id), "score": float(score[i])} for i in dropped_pos],
        "max_kept_score": float(max((score[i] for i in range(len(rows)) if i not in dropped_set), default=0.0)),
    }
    if out_path is not None:
        target = write_rows(kept, out_path)
        _write_json(report, target.with_name(target.name + ".report.json"))
    return kept, report


def weight_pairs(
    rows: Sequence[Any],
    result: AuditResult,
    *,
    concepts: Sequence[tuple[str, int]],
    strength: float = 1.0,
    min_weight: float = 0.0,
    out_path: str | os.PathLike | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """Rows with `weight` ← weight · max(min_weight, 1/(1 + strength·max(score, 0))).

    Pairs that do not lean towards the concepts keep their weight; the loss of a pair that does
    shrinks smoothly with its score (DPOModule multiplies each pair's loss by its weight).
    Returns (rows in the same order, report); `out_path` as in `filter_pairs`.
    """
    if not (isinstance(strength, int | float) and strength >= 0 and math.isfinite(strength)):
        raise ValueError(f"strength must be a finite number >= 0, got {strength!r}")
    if not (isinstance(min_weight, int | float) and 0 <= min_weight <= 1):
        raise ValueError(f"min_weight must be in [0, 1], got {min_weight!r}")
    _check_rows(rows)
    picked = [(str(h), int(f)) for h, f in concepts]
    scores = pair_scores(result, picked)
    out, changed = [], []
    for row in rows:
        s = scores.get(int(row.row_id), 0.0)
        factor = max(min_weight, 1.0 / (1.0 + strength * max(s, 0.0)))
        out.append(dataclasses.replace(row, weight=float(row.weight) * factor))
        if factor < 1.0:
            changed.append({"row_id": int(row.row_id), "score": s, "factor": factor})
    report = {
        "intervention": "weight_pairs",
        "concepts": _concept_report(result, picked),
        "score": "sum over concepts of sign(delta) * (chosen - rejected) / sd_diff",
        "strength": float(strength), "min_weight": float(min_weight),
        "n_rows": len(rows), "n_reweighted": len(changed),
        "mean_weight": float(np.mean([r.weight for r in out])) if out else 0.0,
        "reweighted": changed,
    }
    if out_path is not None:
        target = write_rows(out, out_path)
        _write_json(report, target.with_name(target.name + ".report.json"))
    return out, report
