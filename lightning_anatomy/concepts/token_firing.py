"""Binary token × feature firing of a corpus through a `ConceptLens`: the co-firing corpus.

The paper's feature clusters come from which features fire *on the same token*, which span
statistics cannot tell (two features may both fire in a response without ever sharing a
token). This pass keeps, per hook, a sparse boolean row per corpus token: 1 where the feature's
activation exceeds `threshold` (the extraction threshold, so "fires" means what the firing
frequencies mean). Only nonzeros leave the device; memory is 8 bytes per firing.

The corpus is the audited pairs' spans (prompt once, chosen and rejected completions) or any
list of token sequences. Every forward is a `measurement_pass()` (through `lens.encode`), so
training-time edits of attached callbacks never act on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from lightning_anatomy.model_access import measurement_pass

__all__ = ["masked_firing", "pair_firing_mask", "pair_span_firing", "sequence_firing"]


def masked_firing(features: torch.Tensor, mask: torch.Tensor, threshold: float) -> sp.csr_matrix:
    """Rows = the masked tokens of `features` [b, s, d] (row-major order), 1 where > threshold."""
    rows = features[mask.to(features.device)]
    r, c = (rows > threshold).nonzero(as_tuple=True)
    r, c = r.cpu().numpy(), c.cpu().numpy().astype(np.int32)
    indptr = np.zeros(rows.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=rows.shape[0]), out=indptr[1:])
    return sp.csr_matrix((np.ones(len(c), dtype=np.int32), c, indptr), shape=(rows.shape[0], features.shape[-1]))


def pair_firing_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The co-firing tokens of a collated `[chosen; rejected]` batch: both completions, and the
    prompt once (from the chosen half: it is the same tokens in the rejected half)."""
    b = batch["input_ids"].shape[0] // 2
    mask = batch["completion_mask"].clone()
    mask[:b] |= batch["prompt_mask"][:b].to(mask.dtype)
    return mask


class _Collector:
    def __init__(self, hooks: Sequence[str], max_tokens: int | None) -> None:
        self.parts: dict[str, list[sp.csr_matrix]] = {h: [] for h in hooks}
        self.max_tokens = max_tokens
        self.n_tokens = 0

    @property
    def full(self) -> bool:
        return self.max_tokens is not None and self.n_tokens >= self.max_tokens

    def add(self, feats: dict[str, torch.Tensor], mask: torch.Tensor, threshold: float) -> None:
        n = int(mask.sum())
        if self.max_tokens is not None and self.n_tokens + n > self.max_tokens:
            # keep the first tokens (row-major) up to the cap
            flat = mask.reshape(-1).clone()
            on = flat.nonzero().flatten()
            flat[on[self.max_tokens - self.n_tokens:]] = False
            mask = flat.reshape(mask.shape)
            n = int(mask.sum())
        for hook, f in feats.items():
            if hook in self.parts:
                self.parts[hook].append(masked_firing(f, mask, threshold))
        self.n_tokens += n

    def result(self, widths: dict[str, int]) -> dict[str, sp.csr_matrix]:
        return {h: sp.vstack(p, format="csr") if p else sp.csr_matrix((0, widths[h]), dtype=np.int32)
                for h, p in self.parts.items()}


def _check(lens: Any, batch_size: int, threshold: float, max_tokens: int | None) -> None:
    if not hasattr(lens, "encode") or not getattr(lens, "saes", None):
        raise TypeError(f"lens must be a ConceptLens with SAEs, got {type(lens).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: pass a positive integer")
    if not isinstance(threshold, int | float) or not np.isfinite(threshold):
        raise ValueError(f"threshold={threshold!r} is invalid: pass a finite number (the extraction threshold)")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens={max_tokens!r} is invalid: pass a positive integer or None (every token)")


def pair_span_firing(
    lens: Any,
    pairs: Sequence[Any],
    *,
    pad_token_id: int,
    batch_size: int = 8,
    threshold: float = 0.0,
    max_tokens: int | None = None,
) -> dict[str, sp.csr_matrix]:
    """`{hook: csr [n_tokens, d_sae]}` over the prompt, chosen and rejected tokens of `pairs`
    (`TokenizedPair`s, one `[chosen; rejected]` forward per batch, prompt tokens once)."""
    from lightning_anatomy.data.tokenize import collate_pairs

    _check(lens, batch_size, threshold, max_tokens)
    widths = {h: lens.d_sae(h) for h in lens.saes}
    out = _Collector(list(lens.saes), max_tokens)
    with torch.no_grad(), measurement_pass():
        for start in range(0, len(pairs), batch_size):
            if out.full:
                break
            batch = collate_pairs(list(pairs[start:start + batch_size]), pad_token_id)
            out.add(lens.encode(batch["input_ids"], batch["attention_mask"]), pair_firing_mask(batch), threshold)
    return out.result(widths)


def sequence_firing(
    lens: Any,
    sequences: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
    batch_size: int = 8,
    threshold: float = 0.0,
    max_tokens: int | None = None,
) -> dict[str, sp.csr_matrix]:
    """`{hook: csr [n_tokens, d_sae]}` over every token of `sequences` (lists of token ids, e.g.
    a tokenized text corpus), right-padded in batches."""
    _check(lens, batch_size, threshold, max_tokens)
    seqs = [list(s) for s in sequences if len(s)]
    if not seqs:
        raise ValueError("the co-firing corpus is empty: pass at least one non-empty token sequence")
    widths = {h: lens.d_sae(h) for h in lens.saes}
    out = _Collector(list(lens.saes), max_tokens)
    with torch.no_grad(), measurement_pass():
        for start in range(0, len(seqs), batch_size):
            if out.full:
                break
            chunk = seqs[start:start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, s in enumerate(chunk):
                ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[row, :len(s)] = True
            out.add(lens.encode(ids, mask.long()), mask, threshold)
    return out.result(widths)
