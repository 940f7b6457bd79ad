"""Token filtering (Bergen et al. §3.3; Rathi & Radford 2026): which completion tokens carry a concept.

A token is flagged when its concept score exceeds the concept's threshold; flagged tokens are
removed from DPO's sequence log-probs (policy and reference alike), so neither the log-ratio nor
the sigmoid weight sees them (`callbacks.TokenFiltering` applies the masks). Scores come from:

- text patterns (strings or regular expressions searched in the decoded completion): a token is
  hit when its text overlaps a match (`pattern_token_mask`);
- SAE features, a `ConceptSet`'s unit directions, or a callable, read in one measurement pass of
  the initial model (`measure_token_scores`), then thresholded (`threshold_scores`).

`unit="word"` widens every hit to the whole whitespace-delimited word around it (the paper's
unit). Special tokens (EOS) are never flagged: they carry no text. Everything here is about one
completion at a time, as token ids; the masks are completion-relative (one bool per token).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_anatomy.data.tokenize import TokenizedPair, collate_pairs
from lightning_anatomy.files import atomic_write_text
from lightning_anatomy.model_access import reference_pass, resolve_hook

UNITS = ("token", "word")
FILTER_SIDES = ("both", "chosen", "rejected")
MASKS_FORMAT = "lightning-anatomy/token-masks"

Span = tuple[int, int]
# fn(row_id, side, completion_ids) -> one score per completion token
TokenScoreFn = Callable[[int, str, Sequence[int]], Sequence[float]]


@dataclass(frozen=True)
class Quantile:
    """A threshold at the `q`-quantile of a concept's token scores over the data's completions.

    Args:
        q: in (0, 1); e.g. 0.99 flags the top 1 % of tokens.
    """

    q: float

    def __post_init__(self) -> None:
        if isinstance(self.q, bool) or not isinstance(self.q, int | float) or not 0 < self.q < 1:
            raise ValueError(f"Quantile(q): q must be a number in (0, 1), got {self.q!r}")


def fit_threshold(scores: Sequence[float] | np.ndarray | Tensor, labels: Sequence[bool] | np.ndarray | Tensor) -> float:
    """The threshold (flag: score > threshold) with the best F1 on labelled tokens (the paper's PR-F1 rule).

    Candidates are the midpoints between consecutive distinct scores (and one below the lowest);
    ties go to the highest threshold (fewer tokens removed).

    Args:
        scores: token scores of labelled examples.
        labels: True where the token carries the concept.
    """
    s = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64).ravel()
    y = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels, dtype=bool).ravel()
    if s.size == 0 or s.size != y.size:
        raise ValueError(f"fit_threshold needs one label per score, got {s.size} scores and {y.size} labels")
    if not np.isfinite(s).all():
        raise ValueError("fit_threshold: scores must be finite")
    if not y.any():
        raise ValueError("fit_threshold: no token is labelled True, so there is nothing to fit a threshold to")
    values = np.unique(s)
    candidates = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2])
    best, best_f1 = float(candidates[0]), -1.0
    for t in candidates:
        flag = s > t
        tp = int((flag & y).sum())
        f1 = 2 * tp / (int(flag.sum()) + int(y.sum()))
        if f1 >= best_f1:
            best, best_f1 = float(t), f1
    return best


def compile_patterns(patterns: Iterable[str | re.Pattern]) -> list[re.Pattern]:
    """Compiled regular expressions; an invalid one raises a ValueError naming it."""
    if isinstance(patterns, str | re.Pattern):
        patterns = [patterns]
    out = []
    for p in patterns:
        if isinstance(p, re.Pattern):
            out.append(p)
            continue
        if not isinstance(p, str) or not p:
            raise ValueError(f"token filter patterns must be non-empty strings or compiled regexes, got {p!r}")
        try:
            out.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"token filter pattern {p!r} is not a valid regular expression ({err}); escape it "
                             "with re.escape to match it literally") from None
    return out


def _special_ids(tokenizer: Any) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", None) or [])


def token_spans(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[Span]]:
    """`(text, [(start, end) per token])`: each token's characters in the decoded completion.

    Special tokens are left out of the text (their span is empty). The offsets come from
    re-encoding the text when that gives back the same ids (fast tokenizers), else from
    incremental decoding; a token that only completes a character together with the next one
    (byte-level pieces of one UTF-8 character) shares that token's span.
    """
    special = _special_ids(tokenizer)
    ids = [int(i) for i in ids]
    plain = [i for i in ids if i not in special]
    text = tokenizer.decode(plain, skip_special_tokens=False, clean_up_tokenization_spaces=False) if plain else ""
    spans_plain = _offsets_by_encoding(tokenizer, text, plain)
    if spans_plain is None:
        spans_plain = _offsets_by_decoding(tokenizer, text, plain)
    it = iter(spans_plain)
    spans = [(len(text), len(text)) if i in special else next(it) for i in ids]
    return text, spans


def _offsets_by_encoding(tokenizer: Any, text: str, ids: list[int]) -> list[Span] | None:
    if not getattr(tokenizer, "is_fast", False) or not ids:
        return None
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except Exception:  # tokenizers without offsets support
        return None
    if list(enc["input_ids"]) != ids:
        return None
    return [(int(a), int(b)) for a, b in enc["offset_mapping"]]


def _offsets_by_decoding(tokenizer: Any, text: str, ids: list[int]) -> list[Span]:
    ends: list[int | None] = []
    last = 0
    for k in range(len(ids)):
        prefix = tokenizer.decode(ids[:k + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.startswith(prefix) and len(prefix) >= last:
            last = len(prefix)
            ends.append(last)
        else:  # an incomplete character: this token belongs with the next one that completes it
            ends.append(None)
    spans: list[Span] = []
    start = 0
    for end in ends:
        spans.append((start, start) if end is None else (start, end))
        if end is not None:
            start = end
    nxt: Span | None = None
    for k in range(len(spans) - 1, -1, -1):  # empty pieces take the span of the token completing them
        if ends[k] is None and nxt is not None:
            spans[k] = nxt
        elif ends[k] is not None:
            nxt = spans[k]
    return spans


def _widen_to_word(text: str, start: int, end: int) -> Span:
    """The whitespace-delimited word(s) a character interval touches (whitespace ends trimmed first)."""
    s, e = start, end
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    if s == e:
        return start, end
    while s > 0 and not text[s - 1].isspace():
        s -= 1
    while e < len(text) and not text[e].isspace():
        e += 1
    return s, e


def _tokens_overlapping(spans: Sequence[Span], intervals: Iterable[Span]) -> list[bool]:
    hits = [False] * len(spans)
    for s, e in intervals:
        for k, (a, b) in enumerate(spans):
            if a < b and a < e and s < b:
                hits[k] = True
    return hits


def pattern_token_mask(tokenizer: Any, ids: Sequence[int], patterns: Iterable[str | re.Pattern],
                       unit: str = "token") -> list[bool]:
    """True on the completion tokens a pattern hits (a token whose text overlaps a match).

    Args:
        tokenizer: the tokenizer that produced `ids` (the DataModule's).
        ids: one completion's token ids.
        patterns: strings (regular expressions; `re.escape` them to match literally) or compiled
            patterns, searched in the decoded completion.
        unit: `"token"` (the tokens a match overlaps) or `"word"` (every token of the
            whitespace-delimited words a match touches).
    """
    hits = pattern_hits(tokenizer, ids, compile_patterns(patterns), unit)
    return [any(column) for column in zip(*hits)] if hits else [False] * len(ids)


def pattern_hits(tokenizer: Any, ids: Sequence[int], patterns: Sequence[re.Pattern], unit: str = "token"
                 ) -> list[list[bool]]:
    """One `pattern_token_mask` per compiled pattern, decoding the completion once."""
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r} is not one of {UNITS}")
    text, spans = token_spans(tokenizer, ids)
    out = []
    for pattern in patterns:
        intervals = [(m.start(), m.end()) for m in pattern.finditer(text) if m.end() > m.start()]
        if unit == "word":
            intervals = [_widen_to_word(text, s, e) for s, e in intervals]
        out.append(_tokens_overlapping(spans, intervals))
    return out


def widen_token_hits(tokenizer: Any, ids: Sequence[int], hits: Sequence[bool]) -> list[bool]:
    """`hits` widened to whole words: every token of a word with a flagged token is flagged."""
    text, spans = token_spans(tokenizer, ids)
    intervals = [_widen_to_word(text, *spans[k]) for k, hit in enumerate(hits) if hit and spans[k][0] < spans[k][1]]
    widened = _tokens_overlapping(spans, intervals)
    return [bool(a or b) for a, b in zip(hits, widened)]


# ------------------------------------------------------------------------------ measured scores
@dataclass(frozen=True)
class ActivationScore:
    """A concept read from the activation at `hook`: `fn([b, s, d] fp32) -> [b, s]`."""

    hook: str
    fn: Callable[[Tensor], Tensor]


def sae_feature_score(sae: Any, hook: str, feature: int) -> ActivationScore:
    """The activation of one SAE feature at its hook."""
    d_sae = int(sae.W_dec.shape[0])
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < d_sae:
        raise ValueError(f"SAE feature {feature!r} at {hook!r}: must be an integer in [0, {d_sae})")

    def score(acts: Tensor) -> Tensor:
        return sae.encode(acts.to(sae.W_dec.dtype))[..., feature].float()

    return ActivationScore(hook, score)


def direction_score(hook: str, vector: Tensor) -> ActivationScore:
    """The projection of the activation on a unit direction (a ConceptSet concept)."""
    unit = (vector.to(torch.float32) / vector.to(torch.float32).norm()).detach()

    def score(acts: Tensor) -> Tensor:
        if acts.shape[-1] != unit.numel():
            raise ValueError(f"concept vector at {hook!r} has d={unit.numel()} but the model's activation there has "
                             f"width {acts.shape[-1]}; the concept set was built for another model")
        return acts @ unit.to(acts.device)

    return ActivationScore(hook, score)


@torch.no_grad()
def measure_token_scores(model: nn.Module, pairs: Sequence[TokenizedPair], scorers: Mapping[str, ActivationScore], *,
                         pad_token_id: int, batch_size: int = 8) -> dict[str, dict[int, tuple[list[float], list[float]]]]:
    """`{concept: {row_id: (chosen token scores, rejected token scores)}}` from one pass of `model`.

    Runs in eval mode, without gradients and outside every training-time edit (`reference_pass`),
    one forward per batch for all hooks; scores are per completion token, in order.
    """
    from lightning_anatomy.concepts.lens import capture_activations

    points = {s.hook: resolve_hook(model, s.hook) for s in scorers.values()}
    out: dict[str, dict[int, tuple[list[float], list[float]]]] = {name: {} for name in scorers}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with reference_pass():
            for start in range(0, len(pairs), batch_size):
                chunk = list(pairs[start:start + batch_size])
                batch = collate_pairs(chunk, pad_token_id)
                acts = capture_activations(model, list(points.values()), batch["input_ids"].to(device),
                                           batch["attention_mask"].to(device))
                mask = batch["completion_mask"]
                n = len(chunk)
                for name, scorer in scorers.items():
                    per_token = scorer.fn(acts[points[scorer.hook].name].float()).float().cpu()
                    for i, pair in enumerate(chunk):
                        c = per_token[i][mask[i]].tolist()
                        r = per_token[n + i][mask[n + i]].tolist()
                        out[name][pair.row_id] = (c, r)
    finally:
        model.train(was_training)
    return out


def resolve_threshold(name: str, threshold: float | Quantile | None, values: Iterable[float], default: float | None
                      ) -> float:
    """A concept's threshold as a value: a number as given, a `Quantile` of `values`, else `default`."""
    if threshold is None:
        if default is None:
            raise ValueError(f"token filter concept {name!r} needs a threshold (a value, Quantile(q) or "
                             "fit_threshold(scores, labels)): its scores have no natural zero")
        return float(default)
    if isinstance(threshold, Quantile):
        arr = np.asarray(list(values), dtype=np.float64)
        if arr.size == 0:
            raise ValueError(f"token filter concept {name!r}: no completion tokens to take a quantile of")
        return float(np.quantile(arr, threshold.q))
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not np.isfinite(threshold):
        raise ValueError(f"token filter threshold of {name!r} must be a finite number, Quantile(q) or None, "
                         f"got {threshold!r}")
    return float(threshold)


def callable_scores(fn: TokenScoreFn, name: str, pairs: Sequence[TokenizedPair]
                    ) -> dict[int, tuple[list[float], list[float]]]:
    """A callable concept's scores, checked to give one finite number per completion token."""
    out = {}
    for pair in pairs:
        sides = []
        for side, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            values = [float(v) for v in fn(pair.row_id, side, list(ids))]
            if len(values) != len(ids) or not all(np.isfinite(values)):
                raise ValueError(f"token filter concept {name!r} returned {len(values)} scores for the {side} completion "
                                 f"of row {pair.row_id}, which has {len(ids)} tokens; return one finite score per token")
            sides.append(values)
        out[pair.row_id] = (sides[0], sides[1])
    return out


# ------------------------------------------------------------------------------ the mask cache
TokenMasks = dict[int, tuple[tuple[bool, ...], tuple[bool, ...]]]


def save_token_masks(path: str | os.PathLike, masks: Mapping[int, tuple[Sequence[bool], Sequence[bool]]],
                     concept_drops: Mapping[str, Mapping[int, int]], *, report: Mapping[str, Any] | None = None,
                     meta: Mapping[str, Any] | None = None) -> Path:
    """Write token masks (`{row_id: (chosen keep, rejected keep)}`) and the per-concept drop counts
    as JSON atomically (temp file + rename), so a reader never sees half a file. A mask is a string
    of "1" (kept) and "0" (removed), one character per completion token."""
    def bits(keep: Sequence[bool]) -> str:
        return "".join("1" if k else "0" for k in keep)

    doc = {"format": MASKS_FORMAT, "meta": dict(meta or {}), "report": dict(report or {}),
           "masks": {str(int(rid)): [bits(c), bits(r)] for rid, (c, r) in masks.items()},
           "concept_drops": {name: {str(int(rid)): int(n) for rid, n in per_row.items()}
                             for name, per_row in concept_drops.items()}}
    return atomic_write_text(Path(path), json.dumps(doc))


def load_token_masks(path: str | os.PathLike) -> tuple[TokenMasks, dict[str, dict[int, int]]]:
    """`(masks, concept_drops)` from a file `save_token_masks` wrote; anything else raises one
    ValueError naming the file."""
    path = Path(path)
    fix = "delete it (it is a cache) or point cache_dir elsewhere"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a token-mask cache file (not JSON: {err}); {fix}") from None
    if not isinstance(doc, dict) or doc.get("format") != MASKS_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path} is not a token-mask cache file (format {found!r}, expected {MASKS_FORMAT!r}); {fix}")
    try:
        masks: TokenMasks = {}
        for rid, (c, r) in doc["masks"].items():
            if not isinstance(c, str) or not isinstance(r, str) or set(c + r) - {"0", "1"}:
                raise ValueError(f"row {rid}")
            masks[int(rid)] = (tuple(ch == "1" for ch in c), tuple(ch == "1" for ch in r))
        drops = {str(name): {int(rid): int(n) for rid, n in per_row.items()}
                 for name, per_row in doc["concept_drops"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: a token-mask cache file with a missing or malformed entry ({err}); {fix}") from None
    return masks, drops


__all__ = ["ActivationScore", "FILTER_SIDES", "MASKS_FORMAT", "Quantile", "TokenMasks", "TokenScoreFn", "UNITS",
           "callable_scores", "compile_patterns", "direction_score", "fit_threshold", "load_token_masks",
           "measure_token_scores", "pattern_hits", "pattern_token_mask", "resolve_threshold", "sae_feature_score",
           "save_token_masks", "token_spans", "widen_token_hits"]
