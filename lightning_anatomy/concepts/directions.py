"""Concept directions from activations: token masks, mean activations over texts, paired PCA.

The math behind `ConceptSet.from_activation_difference`, `from_mean_difference` and `from_pca`,
kept apart from the set's bookkeeping and files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_anatomy.concepts.errors import ConceptSetError
from lightning_anatomy.data.tokenize import pad_right


def masked_tokens(acts: torch.Tensor, mask: torch.Tensor | None, what: str) -> tuple[torch.Tensor, int]:
    """[n, d] rows of `acts` ([n, d], or [b, s, d] with an optional [b, s] mask)."""
    if acts.dim() == 3:
        if mask is not None:
            if tuple(mask.shape) != tuple(acts.shape[:2]):
                raise ConceptSetError(f"{what}: mask shape {tuple(mask.shape)} does not match {tuple(acts.shape[:2])}")
            acts = acts[mask.to(acts.device).bool()]
        else:
            acts = acts.reshape(-1, acts.shape[-1])
    elif acts.dim() != 2 or mask is not None:
        raise ConceptSetError(f"{what}: expected [n, d], or [b, s, d] with a [b, s] mask; got {tuple(acts.shape)}")
    if acts.shape[0] == 0:
        raise ConceptSetError(f"{what}: no activation vectors (empty input or all-False mask)")
    return acts, int(acts.shape[0])


def mean_activation(
    model: nn.Module,
    tokenizer: Any,
    hook_name: str,
    texts: Sequence[str],
    batch_size: int,
    max_length: int,
    what: str,
) -> tuple[torch.Tensor, int]:
    from lightning_anatomy.concepts.lens import capture_activations
    from lightning_anatomy.model_access import resolve_hook

    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ConceptSetError(f"{what} is empty; pass at least one text")
    point = resolve_hook(model, hook_name)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = None, 0
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        encoded = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in chunk]
        if any(len(e) == 0 for e in encoded):
            empty = start + next(i for i, e in enumerate(encoded) if len(e) == 0)
            raise ConceptSetError(f"{what}[{empty}] tokenizes to no tokens")
        ids, mask = pad_right(encoded, pad)
        acts = capture_activations(model, [point], ids, mask)[point.name]
        real = acts[mask.to(acts.device).bool()].double()
        total = real.sum(0) if total is None else total + real.sum(0)
        count += real.shape[0]
    return (total / count).cpu(), count


def pca_directions(acts_a: torch.Tensor, acts_b: torch.Tensor, k: int, *, mask: torch.Tensor | None = None,
                   center: bool = True) -> tuple[torch.Tensor, list[float], int]:
    """(components [k, d] float64, explained-variance ratios, token count) of paired differences.

    Each component is oriented so the mean difference projects non-negatively onto it (ties: its
    largest entry positive), so "suppress pc0" means the same thing run after run.
    """
    if acts_a.shape != acts_b.shape:
        raise ConceptSetError(
            f"from_pca needs paired activations of one shape, got {tuple(acts_a.shape)} and {tuple(acts_b.shape)}"
        )
    diffs, n = masked_tokens(acts_a.double() - acts_b.double(), mask, "acts_a - acts_b")
    d = diffs.shape[-1]
    if not 1 <= k <= min(n, d):
        raise ConceptSetError(f"k={k} must be between 1 and min(tokens={n}, width={d})")
    mean = diffs.mean(0)
    centred = diffs - mean if center else diffs
    cov = centred.T @ centred
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(evals, descending=True)[:k]
    total = float(evals.clamp_min(0).sum())
    comps = evecs[:, order].T.clone()  # [k, d]
    for i in range(k):
        proj = float(comps[i] @ mean)
        flip = proj < 0 if abs(proj) > 1e-9 * float(mean.norm() + 1e-30) else comps[i][comps[i].abs().argmax()] < 0
        if flip:
            comps[i] = -comps[i]
    ratios = [float(evals[order[i]]) / total if total > 0 else 0.0 for i in range(k)]
    return comps, ratios, n
