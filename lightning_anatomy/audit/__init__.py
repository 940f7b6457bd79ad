"""Dataset anatomy: which SAE concepts separate chosen from rejected, how surely, and where.

`audit_dataset(rows, lens, tokenizer)` runs the whole audit through a model; `audit_features`
audits precomputed `SpanFeatures`. Both return an `AuditResult` (tables, traces, report, export).
`check_prediction(result, policy_before, policy_after, prompts)` tests the audit's cluster
predictions against what training really did (imported lazily: it needs torch).
"""

from typing import TYPE_CHECKING

from lightning_anatomy._lazy import lazy_exports
from lightning_anatomy.audit.filters import filter_pairs, pair_scores, weight_pairs, write_rows
from lightning_anatomy.audit.result import AuditResult
from lightning_anatomy.audit.run import AuditOptions, audit_dataset, audit_features
from lightning_anatomy.audit.statistics import benjamini_hochberg, paired_statistics

__all__ = [
    "AuditOptions", "AuditResult", "PredictionCheck", "audit_dataset", "audit_features", "benjamini_hochberg",
    "check_prediction", "filter_pairs", "pair_scores", "paired_statistics", "weight_pairs", "write_rows",
]

__getattr__, __dir__ = lazy_exports(__name__, {"check_prediction": "lightning_anatomy.audit.prediction",
                                               "PredictionCheck": "lightning_anatomy.audit.prediction"}, globals())

if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.audit.prediction import PredictionCheck, check_prediction
