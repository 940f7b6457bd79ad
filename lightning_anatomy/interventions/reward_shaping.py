"""Concept scores for reward shaping (Bergen et al. 2026): loss = −log σ(β·Δθ + λ·ΔA).

ΔA is computed once, before training, with the frozen initial model: per pair, the concept score
of the chosen completion minus that of the rejected one. A positive λ makes pairs whose chosen side
carries more of a `suppress` concept count as already learned (their margin is pre-paid), so DPO
stops pushing that concept up; `amplify` concepts enter with the opposite sign (see `steering`).
The scores are cached as JSON under a fingerprint of model weights, pairs and concept settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_anatomy.concepts.lens import capture_activations
from lightning_anatomy.data import TokenizedPair, collate_pairs
from lightning_anatomy.digests import combined_digest, model_digest, pairs_digest
from lightning_anatomy.files import atomic_write_text
from lightning_anatomy.interventions.steering import signed_vectors
from lightning_anatomy.model_access import reference_pass, resolve_hook

REDUCTIONS = ("mean", "max")
SCORES_FORMAT = "lightning-anatomy/concept-scores"


def compute_concept_scores(
    model: nn.Module,
    pairs: Sequence[TokenizedPair],
    concepts: Any = None,
    *,
    hook: str | None = None,
    tokenizer_pad_id: int,
    batch_size: int = 8,
    reduce: str = "mean",
    sae: Any = None,
    feature: int | Sequence[int] | None = None,
    cache_dir: str | os.PathLike | None = None,
    zscore: bool = False,
) -> dict[int, float]:
    """ΔA per pair: `{row_id: score(chosen) − score(rejected)}`.

    A side's score is the `reduce` ("mean", or "max" as Bergen et al. score) over its completion tokens of the token score
    at `hook`: the projection of the activation onto the concepts' unit directions (mean over the
    non-`allow` concepts at the hook, amplified ones with a minus sign), or, with `sae` and
    `feature`, that SAE feature's activation (mean over several features). Runs the model in eval
    mode without gradients and outside every intervention (`reference_pass`). With `cache_dir`,
    the result is read from / written to `concept-scores-<fingerprint>.json` there.

    With `zscore=True` (the paper's scoring) each side's score is z-scored over every completion
    of the data set (chosen and rejected pooled, population standard deviation) before the
    difference, so ΔA = (s⁺ − s⁻)/σ is in units of the score's spread and a λ transfers between
    concepts and models (`explain_away_lambda` on these ΔA gives λ on that scale).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce={reduce!r} is not one of {REDUCTIONS}")
    if not isinstance(zscore, bool):
        raise ValueError(f"zscore must be True or False, got {zscore!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(tokenizer_pad_id, bool) or not isinstance(tokenizer_pad_id, int):
        raise ValueError(f"tokenizer_pad_id must be the tokenizer's pad token id (an int), got {tokenizer_pad_id!r}")
    pairs = list(pairs)
    if not pairs:
        raise ValueError("compute_concept_scores got no pairs")
    ids = [p.row_id for p in pairs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"row_id {dup} appears more than once in pairs; scores are keyed by row_id")

    hook, token_score, settings = _token_scorer(concepts, hook, sae, feature)
    if zscore:  # only when set, so the cache keys of unscaled scores stay what they were
        settings = {**settings, "zscore": True}
    point = resolve_hook(model, hook)

    cache_path = None
    if cache_dir is not None:
        fp = _fingerprint(model, pairs, hook, reduce, settings)
        cache_path = Path(cache_dir) / f"concept-scores-{fp}.json"
        if cache_path.is_file():
            return load_scores(cache_path)

    was_training = model.training
    model.eval()
    scores: dict[int, float] = {}
    sides: list[float] = []
    try:
        with torch.no_grad(), reference_pass():
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start : start + batch_size]
                batch = collate_pairs(chunk, tokenizer_pad_id)
                acts = capture_activations(model, [point], batch["input_ids"], batch["attention_mask"])[point.name]
                per_token = token_score(acts.float())  # [2B, T]
                mask = batch["completion_mask"].to(per_token.device)
                side = _reduce(per_token, mask, reduce)
                n = len(chunk)
                for pair, delta in zip(chunk, (side[:n] - side[n:]).tolist()):
                    scores[pair.row_id] = float(delta)
                sides += side.tolist()
    finally:
        model.train(was_training)
    if zscore:
        spread = float(torch.tensor(sides, dtype=torch.float64).std(unbiased=False))
        if not spread > 0:
            raise ValueError("zscore=True: every completion has the same concept score, so there is no spread to "
                             "scale by; the concept does not vary over this data (use zscore=False)")
        scores = {rid: delta / spread for rid, delta in scores.items()}

    if cache_path is not None:
        save_scores(scores, cache_path, meta={"hook": hook, "reduce": reduce, **settings})
    return scores


def _token_scorer(concepts: Any, hook: str | None, sae: Any, feature: Any):
    """(hook, fn [b, s, d] fp32 -> [b, s], settings for the fingerprint)."""
    if sae is not None:
        if feature is None:
            raise ValueError("sae= needs feature= (an SAE feature id or a list of ids)")
        feats = [feature] if isinstance(feature, int) else list(feature)
        d_sae = int(sae.W_dec.shape[0])
        bad = [f for f in feats if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < d_sae]
        if not feats or bad:
            raise ValueError(f"feature={feature!r}: ids must be integers in [0, {d_sae}) for this SAE")
        if hook is None:
            hook = getattr(getattr(sae, "cfg", None), "metadata", None) and sae.cfg.metadata.get("hook_name")
        if not hook:
            raise ValueError("sae= needs hook= (the hook the SAE reads), or an SAE whose metadata names its hook_name")
        index = torch.tensor(feats)

        def sae_score(acts: Tensor) -> Tensor:
            encoded = sae.encode(acts.to(sae.W_dec.dtype))
            return encoded[..., index.to(encoded.device)].float().mean(-1)

        digest = hashlib.sha256()
        for name, tensor in sorted(sae.state_dict().items()):
            digest.update(name.encode())
            digest.update(_tensor_bytes(tensor))
        return hook, sae_score, {"features": feats, "sae": digest.hexdigest()[:16]}

    if concepts is None:
        raise ValueError("pass concepts= (a ConceptSet) or sae= with feature=")
    if feature is not None:
        raise ValueError("feature= is only used with sae=; the concept set already names the directions")
    if hook is None:
        if len(concepts.hooks) != 1:
            raise ValueError(f"the concept set has hooks {concepts.hooks}; pass hook= to pick the one to score")
        hook = concepts.hooks[0]
    directions = signed_vectors(concepts, hook, normalize=True)  # [k, d]

    def direction_score(acts: Tensor) -> Tensor:
        if acts.shape[-1] != directions.shape[-1]:
            raise ValueError(
                f"concept vectors at {hook!r} have d={directions.shape[-1]} but the model's activation there "
                f"has width {acts.shape[-1]}; the concept set was built for another model"
            )
        return (acts @ directions.to(acts.device).T).mean(-1)

    digest = hashlib.sha256(_tensor_bytes(directions)).hexdigest()[:16]
    return hook, direction_score, {"directions": digest}


def _reduce(per_token: Tensor, mask: Tensor, reduce: str) -> Tensor:
    mask = mask.bool()
    empty = (~mask.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"sequence rows {empty} of a batch have no completion tokens to score")
    if reduce == "mean":
        return (per_token * mask).sum(-1) / mask.sum(-1)
    return per_token.masked_fill(~mask, float("-inf")).amax(-1)


def _tensor_bytes(tensor: Tensor) -> bytes:
    t = tensor.detach().cpu().contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _fingerprint(model: nn.Module, pairs: Sequence[TokenizedPair], hook: str, reduce: str, settings: dict) -> str:
    return combined_digest("concept-scores", model_digest(model), pairs_digest(pairs),
                           {"hook": hook, "reduce": reduce, **settings})


def save_scores(scores: Mapping[int, float], path: str | os.PathLike, *, meta: dict | None = None) -> Path:
    """Write `{row_id: ΔA}` as JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": SCORES_FORMAT, "meta": meta or {}, "scores": {str(k): float(v) for k, v in scores.items()}}
    atomic_write_text(path, json.dumps(doc))
    return path


def load_scores(path: str | os.PathLike) -> dict[int, float]:
    """Read scores written by `save_scores` (or a plain `{row_id: score}` JSON object)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no concept-score file at {str(path)!r}; compute it with compute_concept_scores") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); recompute the scores") from None
    raw = doc.get("scores", doc) if isinstance(doc, dict) else None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object {{row_id: score}} (or one under 'scores')")
    return validate_scores(raw, str(path))


def validate_scores(raw: Mapping[Any, Any], where: str = "scores") -> dict[int, float]:
    """`{int row_id: finite float}`, naming the first bad entry."""
    out: dict[int, float] = {}
    for key, value in raw.items():
        try:
            row_id = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: key {key!r} is not an integer row id") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{where}: score of row {row_id} is {value!r}; scores must be finite numbers")
        out[row_id] = float(value)
    return out
