"""Dataset anatomy: which SAE concepts separate chosen from rejected, how surely, and where.

`audit_dataset(rows, lens, tokenizer)` runs the whole audit through a model; `audit_features`
audits precomputed `SpanFeatures`. Both return an `AuditResult` (tables, traces, report, export).
`check_prediction(result, policy_before, policy_after, prompts)` tests the audit's cluster
predictions against what training really did; `match_features(result, lens, tokenizer, with_texts,
without_texts)` names the audit's features that carry a concept shown by example. Names are imported lazily (`lightning_anatomy._lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_anatomy._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "AuditOptions": "lightning_anatomy.audit.options",
    "audit_dataset": "lightning_anatomy.audit.run",
    "audit_features": "lightning_anatomy.audit.run",
    "AuditResult": "lightning_anatomy.audit.result",
    "PredictionCheck": "lightning_anatomy.audit.prediction",
    "check_prediction": "lightning_anatomy.audit.prediction",
    "benjamini_hochberg": "lightning_anatomy.audit.statistics",
    "paired_statistics": "lightning_anatomy.audit.statistics",
    "FeatureMatch": "lightning_anatomy.audit.feature_match",
    "match_features": "lightning_anatomy.audit.feature_match",
    "filter_pairs": "lightning_anatomy.audit.filters",
    "pair_scores": "lightning_anatomy.audit.filters",
    "weight_pairs": "lightning_anatomy.audit.filters",
    "write_rows": "lightning_anatomy.audit.filters",
}

__all__ = [
    "AuditOptions", "AuditResult", "FeatureMatch", "PredictionCheck", "audit_dataset", "audit_features",
    "benjamini_hochberg", "check_prediction", "filter_pairs", "match_features", "pair_scores", "paired_statistics", "weight_pairs", "write_rows",
]  # literal so linters see the re-exports

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.audit.feature_match import FeatureMatch, match_features
    from lightning_anatomy.audit.filters import filter_pairs, pair_scores, weight_pairs, write_rows
    from lightning_anatomy.audit.options import AuditOptions
    from lightning_anatomy.audit.prediction import PredictionCheck, check_prediction
    from lightning_anatomy.audit.result import AuditResult
    from lightning_anatomy.audit.run import audit_dataset, audit_features
    from lightning_anatomy.audit.statistics import benjamini_hochberg, paired_statistics
