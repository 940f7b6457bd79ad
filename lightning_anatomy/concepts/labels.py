"""Naming concepts: top-activating contexts, logit-lens tokens, and a pluggable labeller.

A concept a user is asked to suppress needs a readable name. The evidence is the same whoever
writes the label (the default heuristic, a person, or an LLM behind the `Labeller` protocol):
the texts where the feature fires hardest, and the tokens its direction promotes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from lightning_anatomy.data.tokenize import pad_right
from lightning_anatomy.model_access import unwrap_model

__all__ = [
    "Context",
    "Labeller",
    "HeuristicLabeller",
    "top_activating_contexts",
    "logit_lens_tokens",
    "label_features",
]


@dataclass(frozen=True)
class Context:
    """Where a feature fired hardest in one sequence.

    `text` is the window around the peak with every strongly firing token (≥ `mark_fraction` of
    the peak) marked `«token»(activation)`; `source` says which input it came from.
    """

    source: str
    item_index: int
    token_index: int
    token: str
    activation: float
    text: str


@runtime_checkable
class Labeller(Protocol):
    """Anything that turns the evidence for a feature into a short label (e.g. an LLM call)."""

    def __call__(self, contexts: Sequence[Context], logit_tokens: Sequence[tuple[str, float]]) -> str: ...


class HeuristicLabeller:
    """Label from the tokens the feature fires on most often and the tokens it promotes most."""

    def __init__(self, n_tokens: int = 3) -> None:
        self.n_tokens = n_tokens

    def __call__(self, contexts: Sequence[Context], logit_tokens: Sequence[tuple[str, float]]) -> str:
        parts = []
        fired = Counter(c.token.strip() or c.token for c in contexts)
        if fired:
            parts.append("fires on " + ", ".join(repr(t) for t, _ in fired.most_common(self.n_tokens)))
        promoted = [t.strip() or t for t, _ in logit_tokens[: self.n_tokens]]
        if promoted:
            parts.append("promotes " + ", ".join(repr(t) for t in promoted))
        return "; ".join(parts) or "unlabelled"


def _items(texts_or_pairs: Sequence[Any]) -> list[tuple[str, str]]:
    """(source, text) per sequence: strings, (prompt, completion) tuples, or preference rows
    (objects or dicts with prompt/chosen/rejected) which give two sequences each."""
    if isinstance(texts_or_pairs, str):
        texts_or_pairs = [texts_or_pairs]
    out: list[tuple[str, str]] = []
    for i, item in enumerate(texts_or_pairs):
        get = item.get if isinstance(item, dict) else lambda k, item=item: getattr(item, k, None)
        if isinstance(item, str):
            out.append((f"text {i}", item))
        elif isinstance(item, tuple | list) and all(isinstance(x, str) for x in item):
            out.append((f"text {i}", "".join(item)))
        elif all(isinstance(get(k), str) for k in ("prompt", "chosen", "rejected")):
            row = get("row_id")
            name = f"row {row if row is not None else i}"
            out.append((f"{name} chosen", get("prompt") + get("chosen")))
            out.append((f"{name} rejected", get("prompt") + get("rejected")))
        else:
            raise TypeError(
                f"texts_or_pairs[{i}] is a {type(item).__name__}; pass strings, (prompt, completion) "
                "tuples or preference rows with prompt/chosen/rejected"
            )
    if not out:
        raise ValueError("texts_or_pairs is empty; pass at least one text")
    return out


def _token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def feature_contexts(
    lens: Any,
    tokenizer: Any,
    texts_or_pairs: Sequence[Any],
    hook: str,
    features: Sequence[int],
    *,
    k: int,
    window: int,
    batch_size: int,
    max_length: int,
    mark_fraction: float,
) -> dict[int, list[Context]]:
    """Top-`k` contexts for each of `features`, from ONE encode pass over the texts (use this, not
    a loop of `top_activating_contexts`, when many features are read from the same texts)."""
    d_sae = lens.d_sae(hook)
    feats_idx = [int(f) for f in features]
    for f in feats_idx:
        if not 0 <= f < d_sae:
            raise ValueError(f"feature {f} is out of range for the SAE at {hook!r} (d_sae={d_sae})")
    items = _items(texts_or_pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # candidates[f] = (activation, item index, token position, window activations, window ids, window start)
    candidates: dict[int, list[tuple]] = {f: [] for f in feats_idx}
    index = torch.tensor(feats_idx)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        encoded = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for _, text in chunk]
        ids, attention = pad_right(encoded, pad)
        mask = attention.bool()
        feats = lens.encode(ids, attention, hooks=[hook])[hook]
        acts = feats[..., index.to(feats.device)].float().cpu().masked_fill(~mask[..., None], float("-inf"))
        peaks, where = acts.max(dim=1)  # [b, F]
        for row in range(len(chunk)):
            for j, f in enumerate(feats_idx):
                peak = float(peaks[row, j])
                if not peak > 0:
                    continue
                pos = int(where[row, j])
                lo, hi = max(0, pos - window), min(len(encoded[row]), pos + window + 1)
                candidates[f].append((peak, start + row, pos, acts[row, lo:hi, j].tolist(), encoded[row][lo:hi], lo))
    result = {}
    for f, cands in candidates.items():
        cands.sort(key=lambda c: (-c[0], c[1]))
        contexts = []
        for peak, item, pos, window_acts, window_ids, lo in cands[:k]:
            pieces = _token_strings(tokenizer, window_ids)
            rendered = "".join(
                f"«{p}»({a:.2f})" if a > 0 and a >= mark_fraction * peak else p
                for p, a in zip(pieces, window_acts, strict=True)
            )
            contexts.append(Context(items[item][0], item, pos, pieces[pos - lo], peak, rendered))
        result[f] = contexts
    return result


def top_activating_contexts(
    lens: Any,
    tokenizer: Any,
    texts_or_pairs: Sequence[Any],
    hook: str,
    feature: int,
    k: int = 10,
    window: int = 8,
    *,
    batch_size: int = 8,
    max_length: int = 256,
    mark_fraction: float = 0.5,
) -> list[Context]:
    """The `k` sequences where `feature` at `hook` fires hardest (one context per sequence, best
    first; sequences where it never fires are left out), with `window` tokens either side."""
    return feature_contexts(
        lens, tokenizer, texts_or_pairs, hook, [feature], k=k, window=window,
        batch_size=batch_size, max_length=max_length, mark_fraction=mark_fraction,
    )[int(feature)]


def logit_lens_tokens(
    model: nn.Module, tokenizer: Any, direction: torch.Tensor | tuple[Any, int], k: int = 10
) -> list[tuple[str, float]]:
    """The `k` tokens a direction promotes most: `W_U @ direction` through the unembedding only.

    The final norm is deliberately skipped (it would need an activation to scale against);
    `direction` is a [d] tensor or `(sae, feature)` for that feature's decoder row.
    """
    if isinstance(direction, tuple):
        sae, feature = direction
        direction = sae.W_dec[int(feature)]
    unembed = unwrap_model(model).get_output_embeddings()
    if unembed is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head) to read a logit lens through")
    weight = unembed.weight.detach()
    if type(weight).__name__ == "DTensor" or weight.dim() != 2:
        raise ValueError(
            f"logit_lens_tokens reads the LM head's weights, which are sharded here ({type(weight).__name__} of shape "
            f"{tuple(weight.shape)}, FSDP); call it on the unsharded model (before fit, or on a saved model)"
        )
    vec = torch.as_tensor(direction).detach().to(device=weight.device, dtype=torch.float32).reshape(-1)
    if vec.numel() != weight.shape[1]:
        raise ValueError(f"direction has d={vec.numel()} but the model's unembedding has width {weight.shape[1]}")
    scores = weight.float() @ vec
    top = torch.topk(scores, min(k, scores.numel()))
    return [(tokenizer.decode([int(i)]), float(s)) for s, i in zip(top.values, top.indices, strict=True)]


def label_features(
    lens: Any,
    tokenizer: Any,
    texts_or_pairs: Sequence[Any],
    hook: str,
    features: Sequence[int],
    labeller: Labeller | None = None,
    *,
    k: int = 10,
    window: int = 8,
    n_logit_tokens: int = 10,
    batch_size: int = 8,
    max_length: int = 256,
    contexts: Mapping[int, list[Context]] | None = None,
) -> dict[int, str]:
    """`{feature: label}` from each feature's contexts and logit-lens tokens (one encode pass for
    all features, or none when `contexts` from `feature_contexts` are given); `labeller` defaults
    to `HeuristicLabeller()`."""
    labeller = labeller or HeuristicLabeller()
    if contexts is None:
        contexts = feature_contexts(
            lens, tokenizer, texts_or_pairs, hook, features, k=k, window=window,
            batch_size=batch_size, max_length=max_length, mark_fraction=0.5,
        )
    sae = lens.saes[hook]
    return {
        f: str(labeller(contexts[f], logit_lens_tokens(lens.model, tokenizer, (sae, f), k=n_logit_tokens)))
        for f in contexts
    }
