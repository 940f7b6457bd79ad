"""The audit's "next step": a training command that runs as printed, and the concepts it acts on.

`anatomy audit` ends by printing (and writing into the report) the `anatomy fit` command that trains
on the same rows with the audited model: the audit's data options (source, on_bad_rows, limit,
max_length, max_prompt_length), its model and tokenizer, a learning rate suited to that model and a
gradient projection of the exported concept set. So that the command has something to act on, the
concepts DPO is predicted to push up most (passing the audit's tests) are marked `suppress` in that
concept set; when none passes, `mark_predicted` marks nothing and the job prints what to edit first.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# DPO learning rates that work for the model sizes this package runs: the tiny random models need a
# large one to move in a few steps; a pretrained model wants the usual DPO range (5e-7 .. 1e-5).
TINY_LR = 3e-3
PRETRAINED_LR = 5e-6
DATA_KEYS = ("source", "on_bad_rows", "limit", "max_length", "max_prompt_length")


def learning_rate_for(policy: str) -> float:
    """The learning rate the suggested command uses for `policy` (see `TINY_LR`, `PRETRAINED_LR`)."""
    return TINY_LR if str(policy).startswith("tiny") else PRETRAINED_LR


def train_command(concept_set_dir: str, *, policy: str, data: Mapping[str, Any], tokenizer: str | None = None,
                  dtype: str | None = None, seed: int | None = None) -> str:
    """The `anatomy fit` command that trains on the audited rows with a projection of `concept_set_dir`.

    Args:
        concept_set_dir: the audit's ConceptSet export (its marked concepts are projected out).
        policy: the audited model spec; the trained policy is the same model.
        data: the audit's `data` section; the keys in `DATA_KEYS` are carried over when set, so the
            run reads the same rows (the same bad rows skipped, the same limit and lengths).
        tokenizer: the audit's tokenizer spec, when it named one.
        dtype: the audit's load dtype, when it named one.
        seed: the audit's seed (the built-in data sets are generated from it).
    """
    parts = ["anatomy", "fit", f"--model.policy={policy}", f"--model.lr={learning_rate_for(policy):g}"]
    if dtype:
        parts.append(f"--model.dtype={dtype}")
    if tokenizer:
        parts.append(f"--data.tokenizer={tokenizer}")
    parts += [f"--data.{k}={data[k]}" for k in DATA_KEYS if data.get(k) is not None]
    if seed is not None:
        parts += [f"--data.seed={seed}"]
    parts += ["--trainer.callbacks+=lightning_anatomy.ConceptProjection",
              f"--trainer.callbacks.concepts={concept_set_dir}", "--trainer.callbacks.layers=all_later",
              "--trainer.max_epochs=1"]
    return " ".join(shlex.quote(p) for p in parts)


def mark_predicted(concept_set_dir: str | Path, top: int = 3) -> list[str]:
    """Mark `suppress`, in the saved concept set, the `top` best-ranked concepts that pass the audit's
    tests and that DPO is predicted to push up (`predicted_direction == "amplify"`): what the data
    would teach most, kept out by the suggested run. Returns the marked names (empty: none passes,
    the set is left as it is)."""
    from lightning_anatomy.concepts.concept_set import ConceptSet

    directory = Path(concept_set_dir)
    if not (directory / "concepts.yaml").is_file():
        return []
    concepts = ConceptSet.load(directory)

    def audit(c: Any) -> Mapping[str, Any]:
        return (c.source or {}).get("audit") or {}

    candidates: Sequence[Any] = sorted(
        (c for c in concepts if audit(c).get("passes") and audit(c).get("predicted_direction") == "amplify"),
        key=lambda c: audit(c).get("rank", float("inf")))
    names = [c.name for c in candidates[:top]]
    if names:
        concepts.with_actions(dict.fromkeys(names, "suppress")).save(directory)
    return names
