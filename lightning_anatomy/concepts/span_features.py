"""Per-pair, per-span SAE feature statistics held sparsely.

This is the hand-off between dataset-scale extraction (`concepts.extraction`) and the audit:
an audit of 260k pairs × 65k features cannot be dense, so each (hook, span, stat) is a
`scipy.sparse.csr_matrix` of shape [n_pairs, d_sae] whose rows follow `row_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

SPANS = ("prompt", "chosen", "rejected")
STATS = ("max", "freq", "mean")


@dataclass
class SpanFeatures:
    """Sparse span statistics for a set of pairs.

    `matrices[(hook, span, stat)]` is csr [n_pairs, d_sae] (float32); `lengths[span]` is the
    number of tokens of that span per pair (int64, the length control of the audit);
    `row_ids` are the `PreferenceRow.row_id` of each matrix row; `d_sae[hook]` the width.
    `token_firing[hook]` (only from `extract_span_features(..., token_firing=True)`) is the binary
    csr [n_tokens, d_sae] of the pairs' prompt and completion tokens: a corpus, not per pair, so
    `subset` drops it.
    """

    row_ids: np.ndarray
    lengths: dict[str, np.ndarray]
    matrices: dict[tuple[str, str, str], sp.csr_matrix]
    d_sae: dict[str, int]
    threshold: float = 0.0
    meta: dict = field(default_factory=dict)
    token_firing: dict[str, sp.csr_matrix] | None = None

    @property
    def hooks(self) -> list[str]:
        return list(self.d_sae)

    @property
    def n_pairs(self) -> int:
        return int(len(self.row_ids))

    def get(self, hook: str, span: str, stat: str) -> sp.csr_matrix:
        try:
            return self.matrices[(hook, span, stat)]
        except KeyError:
            have = sorted({(h, s, t) for h, s, t in self.matrices})
            raise KeyError(f"no features for hook={hook!r} span={span!r} stat={stat!r}; available: {have}") from None

    def dense(self, hook: str, span: str, stat: str) -> np.ndarray:
        """Dense float32 [n_pairs, d_sae]; only for small audits and tests."""
        return np.asarray(self.get(hook, span, stat).todense(), dtype=np.float32)

    def subset(self, index: np.ndarray) -> SpanFeatures:
        """Rows `index` (positions, not row ids) of every matrix."""
        index = np.asarray(index)
        return SpanFeatures(
            row_ids=self.row_ids[index],
            lengths={k: v[index] for k, v in self.lengths.items()},
            matrices={k: m[index] for k, m in self.matrices.items()},
            d_sae=dict(self.d_sae),
            threshold=self.threshold,
            meta=dict(self.meta),
        )
