"""The audit's predictions as `ConceptDriftMonitor` reads them: per-feature predicted shifts
(`predicted=`: a dict or the audit's DataFrame) and the feature clusters with their predictions
(`clusters=`: an `AuditResult` or its directory), checked against the monitor's SAE widths.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from lightning_anatomy.callbacks.concept_refs import ConceptRef, parse_concept


def parse_clusters(clusters: object, widths: Mapping[str, int]) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(feature clusters, cluster predictions, audit options) from an AuditResult or its saved directory."""
    if isinstance(clusters, str | os.PathLike):
        from lightning_anatomy.audit.result import AuditResult

        clusters = AuditResult.load(clusters)
    if not (hasattr(clusters, "feature_clusters") and hasattr(clusters, "cluster_predictions")):
        raise ValueError("clusters must be an AuditResult (or the directory AuditResult.save wrote), e.g. "
                         f"audit_dataset(..., method='paper'); got {type(clusters).__name__}")
    assign, predictions = clusters.feature_clusters, clusters.cluster_predictions
    if len(predictions) == 0:
        raise ValueError("clusters: the audit has no feature clusters with a prediction; nothing to measure")
    unknown = sorted(set(assign["hook"]) - set(widths))
    if unknown:
        raise ValueError(f"clusters: the audit's feature clusters use hook(s) {unknown} that the monitor has no SAE "
                         f"for (it has {sorted(widths)}); pass the audit's SAEs")
    for hook, part in assign.groupby("hook"):
        if int(part["feature"].max()) >= widths[hook] or int(part["feature"].min()) < 0:
            raise ValueError(f"clusters: a feature of hook {hook!r} is out of range for d_sae={widths[hook]}; "
                             "pass the SAE the audit ran with")
    predictions = predictions[np.isfinite(predictions["predicted_shift"].to_numpy(np.float64))].reset_index(drop=True)
    return assign, predictions, dict(getattr(clusters, "options", {}) or {})


def parse_predicted(predicted: Any, widths: Mapping[str, int]) -> tuple[dict[ConceptRef, float], dict[ConceptRef, str]]:
    """`{(hook, feature): predicted shift}` (and any labels) from a dict or an audit DataFrame.

    A DataFrame needs `feature` and `predicted_shift` columns; `hook` may be left out with a
    single hook; a `label` column is picked up for the tables.
    """
    if predicted is None:
        return {}, {}
    if isinstance(predicted, Mapping):
        out = {}
        for key, value in predicted.items():
            ref = parse_concept(key, widths, f"predicted[{key!r}]")
            out[ref] = _finite(value, f"predicted[{key!r}]")
        return out, {}
    columns = getattr(predicted, "columns", None)
    if columns is None:
        raise ValueError(
            f"predicted must be a dict {{(hook, feature): shift}} or a pandas DataFrame, got {type(predicted).__name__}"
        )
    missing = [c for c in ("feature", "predicted_shift") if c not in columns]
    if missing:
        raise ValueError(
            f"predicted DataFrame lacks column(s) {missing}; pass the audit table (hook, feature, predicted_shift)"
        )
    hooks = predicted["hook"].tolist() if "hook" in columns else [None] * len(predicted)
    labels_col = predicted["label"].tolist() if "label" in columns else [None] * len(predicted)
    out, labels = {}, {}
    for i, (hook, feat, shift, label) in enumerate(
        zip(hooks, predicted["feature"].tolist(), predicted["predicted_shift"].tolist(), labels_col)
    ):
        where = f"predicted row {i}"
        ref = parse_concept(int(feat) if hook is None else (str(hook), int(feat)), widths, where)
        if ref in out:
            raise ValueError(f"{where}: concept {ref} appears twice; keep one row per (hook, feature)")
        out[ref] = _finite(shift, where)
        if isinstance(label, str) and label:
            labels[ref] = label
    return out, labels


def _finite(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: predicted shift {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: predicted shift is {number}; drop rows without a prediction")
    return number


__all__ = ["parse_clusters", "parse_predicted"]
