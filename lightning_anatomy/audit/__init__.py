"""Dataset anatomy: which SAE concepts separate chosen from rejected, how surely, and where.

`audit_dataset(rows, lens, tokenizer)` runs the whole audit through a model; `audit_features`
audits precomputed `SpanFeatures`. Both return an `AuditResult` (tables, traces, report, export).
"""

from lightning_anatomy.audit.filters import filter_pairs, pair_scores, weight_pairs, write_rows
from lightning_anatomy.audit.result import AuditResult
from lightning_anatomy.audit.run import AuditOptions, audit_dataset, audit_features
from lightning_anatomy.audit.statistics import benjamini_hochberg, paired_statistics

__all__ = [
    "AuditOptions", "AuditResult", "audit_dataset", "audit_features", "benjamini_hochberg", "filter_pairs",
    "pair_scores", "paired_statistics", "weight_pairs", "write_rows",
]
