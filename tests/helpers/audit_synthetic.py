"""Synthetic `SpanFeatures` with known structure, for the audit tests.

Every feature fires at random at a per-feature base rate in every span. On top of that:

- `planted`: marker features that fire together (one shared draw) in `planted_rate` of the
  chosen spans only — a chosen-side concept;
- `topics`: prompt features 200.. mark two prompt topics (half the pairs each), and the `local`
  features fire together in chosen spans of topic 0 but in rejected spans of topic 1 — a signal
  that cancels globally;
- `swap`: chosen and rejected exchanged on a random half of the pairs (destroys every signal).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lightning_anatomy.concepts.span_features import SpanFeatures

HOOK = "blocks.0.hook_resid_post"
TOPIC_FEATURES = (range(200, 210), range(210, 220))


def make_span_features(
    n_pairs: int = 400,
    d_sae: int = 300,
    *,
    seed: int = 0,
    planted: tuple[int, ...] = (),
    planted_rate: float = 0.6,
    local: tuple[int, ...] = (),
    local_rate: float = 0.6,
    swap: bool = False,
    hooks: tuple[str, ...] = (HOOK,),
) -> tuple[SpanFeatures, np.ndarray]:
    """Returns (features, topic of each pair)."""
    rng = np.random.default_rng(seed)
    topic = (np.arange(n_pairs) >= n_pairs // 2).astype(np.int64)
    matrices = {}
    for hook in hooks:
        rate = rng.uniform(0.01, 0.15, size=d_sae)
        spans = {}
        for span in ("prompt", "chosen", "rejected"):
            fire = rng.random((n_pairs, d_sae)) < rate
            spans[span] = np.where(fire, rng.uniform(0.5, 2.0, size=(n_pairs, d_sae)), 0.0)
        for t, feats in enumerate(TOPIC_FEATURES):
            feats = [f for f in feats if f < d_sae]
            on = (topic == t)[:, None] & (rng.random((n_pairs, len(feats))) < 0.8)
            spans["prompt"][:, feats] = np.where(on, rng.uniform(1.0, 3.0, size=on.shape), 0.0)
        if planted:
            marker = rng.random(n_pairs) < planted_rate
            spans["chosen"][np.ix_(marker, planted)] = rng.uniform(2.0, 4.0, size=(int(marker.sum()), len(planted)))
        if local:
            present = rng.random(n_pairs) < local_rate
            for span, t in (("chosen", 0), ("rejected", 1)):
                rows = present & (topic == t)
                spans[span][np.ix_(rows, local)] = rng.uniform(2.0, 4.0, size=(int(rows.sum()), len(local)))
        for span, m in spans.items():
            matrices[(hook, span, "max")] = m
    lengths = {"prompt": rng.integers(5, 40, n_pairs), "chosen": rng.integers(5, 60, n_pairs),
               "rejected": rng.integers(5, 60, n_pairs)}
    if swap:
        flip = rng.random(n_pairs) < 0.5
        for hook in hooks:
            c, r = matrices[(hook, "chosen", "max")], matrices[(hook, "rejected", "max")]
            matrices[(hook, "chosen", "max")] = np.where(flip[:, None], r, c)
            matrices[(hook, "rejected", "max")] = np.where(flip[:, None], c, r)
        lengths["chosen"], lengths["rejected"] = (np.where(flip, lengths["rejected"], lengths["chosen"]),
                                                  np.where(flip, lengths["chosen"], lengths["rejected"]))
    features = SpanFeatures(
        row_ids=np.arange(n_pairs, dtype=np.int64) + 1000,
        lengths=lengths,
        matrices={k: sp.csr_matrix(v.astype(np.float32)) for k, v in matrices.items()},
        d_sae={h: d_sae for h in hooks},
    )
    return features, topic


def random_sparse(n_rows: int, n_cols: int, density: float, seed: int) -> sp.csr_matrix:
    """A random non-negative float32 csr matrix built without a dense intermediate."""
    rng = np.random.default_rng(seed)
    nnz = int(n_rows * n_cols * density)
    m = sp.csr_matrix((rng.uniform(0.1, 2.0, nnz).astype(np.float32),
                       (rng.integers(0, n_rows, nnz), rng.integers(0, n_cols, nnz))), shape=(n_rows, n_cols))
    m.sum_duplicates()
    return m
