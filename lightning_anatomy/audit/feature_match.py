"""Which of the audit's best-ranked features carry a concept you can show by example.

The audit ranks what separates chosen from rejected; it cannot know which of those differences
you call spurious. Given texts with and without the concept (the same replies with and without a
marker, say), each of the audit's best-ranked features is scored by how much more it fires on
the texts with it — Cohen's d of the per-text maximum activation — and those above a minimum
effect are the concept's features. It is what a reader of the report does by eye (a feature
"fires on 'Sure'"), as one call whose result feeds `TokenFiltering(concepts=...)`,
`ConceptSet.from_sae_features` or `ConceptBlocking`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_anatomy.data.tokenize import pad_id, pad_right

if TYPE_CHECKING:
    from lightning_anatomy.audit.result import AuditResult
    from lightning_anatomy.concepts.lens import ConceptLens


@dataclass(frozen=True)
class FeatureMatch:
    """The audit's features that carry the example concept, and how every candidate scored.

    Attributes:
        features: the picked `(hook, feature)`, strongest effect first.
        candidates: per candidate, in audit rank order: hook, feature, audit_rank, delta (the
            audit's chosen − rejected effect), label (the audit's, "" when unlabelled) and effect
            (Cohen's d, with − without).
    """

    features: list[tuple[str, int]]
    candidates: list[dict[str, Any]]

    def concepts(self) -> dict[str, tuple[str, int]]:
        """`{"f<feature>": (hook, feature)}`: the `concepts=` argument of `TokenFiltering`/`ConceptBlocking`."""
        return {f"f{f}": (h, f) for h, f in self.features}


@torch.no_grad()
def example_effects(lens: ConceptLens, tokenizer: Any, with_texts: Sequence[str], without_texts: Sequence[str], *,
                    batch_size: int = 16) -> dict[str, np.ndarray]:
    """`{hook: [d_sae]}`: per SAE feature, Cohen's d of its per-text maximum activation on
    `with_texts` against `without_texts` (pooled standard deviation, floored at 1e-9).

    Args:
        lens: the model and SAEs the audit read.
        tokenizer: the model's tokenizer (texts are encoded without special tokens).
        with_texts: texts that show the concept.
        without_texts: texts that do not (ideally the same texts without it).
        batch_size: texts per forward.
    """
    for name, texts in (("with_texts", with_texts), ("without_texts", without_texts)):
        if len(texts) < 2:
            raise ValueError(f"{name} has {len(texts)} text(s); pass at least 2 on each side (a standard deviation "
                             "needs two)")
    pad = pad_id(tokenizer)

    def per_text_max(texts: Sequence[str]) -> dict[str, torch.Tensor]:
        seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        parts: dict[str, list[torch.Tensor]] = {}
        for lo in range(0, len(seqs), batch_size):
            ids, mask = pad_right(seqs[lo:lo + batch_size], pad)
            for hook, feats in lens.encode(ids, mask).items():
                real = mask.bool().to(feats.device)[..., None]
                parts.setdefault(hook, []).append(feats.float().masked_fill(~real, 0.0).amax(1).double().cpu())
        return {hook: torch.cat(chunks) for hook, chunks in parts.items()}

    a, b = per_text_max(with_texts), per_text_max(without_texts)
    out = {}
    for hook in a:
        sd = torch.sqrt((a[hook].var(0) + b[hook].var(0)) / 2).clamp_min(1e-9)
        out[hook] = ((a[hook].mean(0) - b[hook].mean(0)) / sd).numpy()
    return out


def pick_features(table: Any, effects: dict[str, np.ndarray], *, candidates: int = 20, min_effect: float = 0.5,
                  max_features: int = 3) -> FeatureMatch:
    """Among the `candidates` best-ranked rows of an audit's concept table (the passing ones when
    any pass), those whose example effect reaches `min_effect`, at most `max_features`, strongest
    first; the single strongest candidate when none reaches it (the concept must be read somehow:
    its effect is in `candidates` for the caller to judge)."""
    ranked = table[table["passes"]] if bool(table["passes"].any()) else table
    ranked = ranked.head(candidates)
    labels = ranked["label"] if "label" in ranked else [""] * len(ranked)
    scored = [{"hook": str(h), "feature": int(f), "audit_rank": int(r), "delta": float(d), "label": str(lab or ""),
               "effect": float(effects[str(h)][int(f)])}
              for h, f, r, d, lab in zip(ranked["hook"], ranked["feature"], ranked["rank"], ranked["delta"], labels)]
    if not scored:
        raise ValueError("the audit's concept table is empty (no SAE feature fired on the pairs): there is nothing "
                         "to match; check the lens' hook and SAE, or audit more pairs")
    good = sorted((s for s in scored if s["effect"] >= min_effect), key=lambda s: -s["effect"])
    picked = good[:max_features] or [max(scored, key=lambda s: s["effect"])]
    return FeatureMatch([(s["hook"], s["feature"]) for s in picked], scored)


def match_features(result: AuditResult, lens: ConceptLens, tokenizer: Any, with_texts: Sequence[str],
                   without_texts: Sequence[str], *, candidates: int = 20, min_effect: float = 0.5,
                   max_features: int = 3, batch_size: int = 16) -> FeatureMatch:
    """The audit's best-ranked features that fire clearly more on texts showing a concept.

    Args:
        result: the audit (`audit_dataset`) whose concept table is searched.
        lens: the model and SAEs the audit read.
        tokenizer: the model's tokenizer.
        with_texts: texts that show the concept (e.g. replies with the marker).
        without_texts: texts that do not (the same replies without it).
        candidates: how many of the audit's best-ranked features are scored.
        min_effect: the Cohen's d a feature needs to count as the concept's.
        max_features: at most this many features are picked.
        batch_size: texts per forward.

    Returns:
        A `FeatureMatch`; `.concepts()` is the `concepts=` argument of `TokenFiltering`.

    Example:
        >>> match = match_features(result, lens, tok, ["Sure! " + r for r in replies], replies)
        >>> TokenFiltering(concepts=match.concepts(), saes=lens.saes)
    """
    effects = example_effects(lens, tokenizer, with_texts, without_texts, batch_size=batch_size)
    return pick_features(result.concepts, effects, candidates=candidates, min_effect=min_effect,
                         max_features=max_features)
