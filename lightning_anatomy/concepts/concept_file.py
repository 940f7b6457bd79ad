"""The file format of a `ConceptSet`: a human-editable `concepts.yaml` (names, hooks, labels,
actions, provenance) beside `vectors.safetensors` (one fp32 vector per concept name), so a user can
review the audit and flip actions in a text editor before training. Reading validates every
field and names the file, the concept and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_anatomy.concepts.concept import ACTIONS, Concept
from lightning_anatomy.concepts.errors import ConceptSetError
from lightning_anatomy.files import atomic_write_file, atomic_write_text

FORMAT = "lightning-anatomy/concept-set"
VERSION = 1
YAML_NAME = "concepts.yaml"
VECTORS_NAME = "vectors.safetensors"
_FIELDS = ("name", "hook", "label", "action", "dim", "source")

_YAML_HEADER = """\
# lightning-anatomy concept set. Edit `action` per concept: suppress | amplify | allow.
# Vectors live in vectors.safetensors under each concept's name; keep names in sync.
"""


def save_concepts(concepts: Sequence[Concept], path: str | os.PathLike) -> Path:
    """Write `path/concepts.yaml` and `path/vectors.safetensors` (each atomically)."""
    import yaml
    from safetensors.torch import save_file

    if not len(concepts):
        raise ConceptSetError("refusing to save an empty concept set")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "concepts": [
            {"name": c.name, "hook": c.hook, "label": c.label, "action": c.action, "dim": c.dim, "source": c.source}
            for c in concepts
        ],
    }
    vectors = {c.name: c.vector for c in concepts}
    atomic_write_file(out / VECTORS_NAME, lambda tmp: save_file(vectors, str(tmp), metadata={"format": FORMAT}))
    text = _YAML_HEADER + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    atomic_write_text(out / YAML_NAME, text)
    return out


def load_concepts(path: str | os.PathLike) -> list[Concept]:
    """The concepts of a saved set, every field validated (the set itself checks names and widths)."""
    import yaml
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path)
    yaml_path, vec_path = root / YAML_NAME, root / VECTORS_NAME
    if not yaml_path.is_file():
        raise ConceptSetError(f"{yaml_path} not found; a concept set directory holds {YAML_NAME} and {VECTORS_NAME}")
    try:
        doc = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConceptSetError(f"{yaml_path}: not valid YAML{where} ({problem}); fix the syntax") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("concepts"), list):
        raise ConceptSetError(f"{yaml_path}: expected a mapping with a 'concepts' list at the top level")
    version = doc.get("version", VERSION)
    if not isinstance(version, int) or version > VERSION:
        raise ConceptSetError(f"{yaml_path}: field 'version' is {version!r}; this release reads version {VERSION}")
    if not vec_path.is_file():
        raise ConceptSetError(f"{vec_path} not found; it holds the vectors of {yaml_path}")
    try:
        tensors = load_file(str(vec_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ConceptSetError(f"{vec_path}: cannot read ({err}); re-save the concept set") from None
    concepts = []
    for i, item in enumerate(doc["concepts"]):
        concepts.append(concept_from_yaml(item, i, tensors, yaml_path))
    return concepts


def concept_from_yaml(item: Any, i: int, tensors: dict[str, torch.Tensor], yaml_path: Path) -> Concept:
    where = f"{yaml_path}: concepts[{i}]"
    if not isinstance(item, dict):
        raise ConceptSetError(f"{where}: expected a mapping with {', '.join(_FIELDS)}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise ConceptSetError(f"{where}: field 'name' must be a non-empty string, got {name!r}")
    where = f"{yaml_path}: concept {name!r}"
    unknown = sorted(set(item) - set(_FIELDS))
    if unknown:
        raise ConceptSetError(f"{where}: unknown field(s) {unknown}; allowed fields are {', '.join(_FIELDS)}")
    hook = item.get("hook")
    if not isinstance(hook, str) or not hook:
        raise ConceptSetError(f"{where}: field 'hook' must be a hook name, got {hook!r}")
    action = item.get("action", "suppress")
    if action not in ACTIONS:
        raise ConceptSetError(f"{where}: field 'action' is {action!r}; use one of {', '.join(ACTIONS)}")
    label = item.get("label") or ""
    if not isinstance(label, str | int | float):
        raise ConceptSetError(f"{where}: field 'label' must be text, got {type(label).__name__}")
    source = item.get("source") or {}
    if not isinstance(source, dict):
        raise ConceptSetError(f"{where}: field 'source' must be a mapping, got {type(source).__name__}")
    if name not in tensors:
        raise ConceptSetError(f"{where}: no vector named {name!r} in {VECTORS_NAME}; rename it back or re-save")
    vec = tensors[name]
    if vec.dim() != 1:
        raise ConceptSetError(f"{where}: vector must be 1-D, got shape {tuple(vec.shape)}")
    dim = item.get("dim")
    if dim is not None and (not isinstance(dim, int) or dim != vec.numel()):
        raise ConceptSetError(f"{where}: field 'dim' is {dim!r} but the stored vector has {vec.numel()} values")
    if not torch.isfinite(vec).all():
        raise ConceptSetError(f"{where}: vector has non-finite values (NaN or inf); re-create this concept")
    try:
        return Concept(name, hook, vec, str(label), action, source)
    except ConceptSetError as err:
        raise ConceptSetError(f"{yaml_path}: {err}") from None


__all__ = ["FORMAT", "VECTORS_NAME", "VERSION", "YAML_NAME", "concept_from_yaml", "load_concepts", "save_concepts"]
