"""Concept directions a user decides about: suppress, amplify or allow.

A `ConceptSet` is the hand-off between the audit (which finds concepts) and training (which
projects gradients away from, ablates or steers along them). It is saved as a human-editable
`concepts.yaml` (names, hooks, labels, actions, provenance) beside `vectors.safetensors`, so a
user can review the audit and flip actions in a text editor before training.

This module holds the container and its constructors; the element `Concept` lives in
`concepts.concept`, the file format (`save` / `load`) in `concepts.concept_file`, the activation
math of the `from_*` constructors in `concepts.directions`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_anatomy.concepts.concept import ACTIONS, Concept, check_action
from lightning_anatomy.concepts.concept_file import (
    FORMAT,
    VECTORS_NAME,
    VERSION,
    YAML_NAME,
    load_concepts,
    save_concepts,
)
from lightning_anatomy.concepts.errors import ConceptSetError

# FORMAT, VERSION, YAML_NAME, VECTORS_NAME: the file format's names, re-exported from `concept_file`
__all__ = ["ACTIONS", "FORMAT", "VECTORS_NAME", "VERSION", "YAML_NAME", "Concept", "ConceptSet", "ConceptSetError",
           "check_concept_dir"]


class ConceptSet:
    """An ordered collection of uniquely named concepts, possibly at several hooks."""

    def __init__(self, concepts: Iterable[Concept] = ()) -> None:
        self._concepts: list[Concept] = list(concepts)
        seen: dict[str, int] = {}
        dims: dict[str, tuple[int, str]] = {}
        for c in self._concepts:
            if not isinstance(c, Concept):
                raise ConceptSetError(f"ConceptSet holds Concept objects, got {type(c).__name__}")
            if c.name in seen:
                raise ConceptSetError(f"concept name {c.name!r} appears twice; names must be unique")
            seen[c.name] = 1
            if c.hook in dims and dims[c.hook][0] != c.dim:
                other_dim, other = dims[c.hook]
                raise ConceptSetError(
                    f"concept {c.name!r}: vector has d={c.dim} but concept {other!r} at the same hook "
                    f"{c.hook!r} has d={other_dim}"
                )
            dims.setdefault(c.hook, (c.dim, c.name))
        self._index = {c.name: i for i, c in enumerate(self._concepts)}

    # ------------------------------------------------------------------ collection protocol

    def __len__(self) -> int:
        return len(self._concepts)

    def __iter__(self) -> Iterator[Concept]:
        return iter(self._concepts)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __getitem__(self, key: str | int) -> Concept:
        if isinstance(key, int):
            return self._concepts[key]
        try:
            return self._concepts[self._index[key]]
        except KeyError:
            raise KeyError(f"no concept named {key!r}; the set has {self.names}") from None

    def __add__(self, other: ConceptSet) -> ConceptSet:
        return ConceptSet([*self._concepts, *other._concepts])

    def __repr__(self) -> str:
        counts = {a: sum(c.action == a for c in self) for a in ACTIONS}
        return f"ConceptSet({len(self)} concepts at {self.hooks}, {counts})"

    @property
    def names(self) -> list[str]:
        return [c.name for c in self._concepts]

    @property
    def hooks(self) -> list[str]:
        """Hooks in order of first appearance."""
        return list(dict.fromkeys(c.hook for c in self._concepts))

    # ------------------------------------------------------------------ selection and bases

    def with_actions(self, actions: Mapping[str, str]) -> ConceptSet:
        """A new set with `actions[name]` applied; other concepts keep theirs."""
        unknown = [n for n in actions if n not in self._index]
        if unknown:
            raise KeyError(f"with_actions: no concepts named {unknown}; the set has {self.names}")
        for name, action in actions.items():
            check_action(action, f"concept {name!r}")
        return ConceptSet(
            dataclasses.replace(c, action=actions.get(c.name, c.action), source=dict(c.source)) for c in self
        )

    def select(self, *, action: str | None = None, hook: str | None = None) -> ConceptSet:
        """The concepts with this action and/or at this hook (None: any)."""
        if action is not None:
            check_action(action, "select")
        return ConceptSet(
            c for c in self if (action is None or c.action == action) and (hook is None or c.hook == hook)
        )

    def vectors(self, hook_name: str, action: str | None = "suppress") -> torch.Tensor:
        """The chosen concepts' vectors at `hook_name` as rows, [k, d] fp32 (k may be 0)."""
        chosen = self.select(action=action, hook=hook_name)
        if not len(chosen):
            return torch.zeros(0, 0)
        return torch.stack([c.vector for c in chosen])

    def basis(self, hook_name: str, action: str | None = "suppress", *, tol: float = 1e-5) -> torch.Tensor:
        """Orthonormal basis [d, k] fp32 (CPU) of the chosen concepts' span at `hook_name`.

        Gram–Schmidt with re-orthogonalisation in float64, in concept order (column 1 is the first
        concept's direction); a concept whose residual is below `tol` of its norm is dependent on
        earlier ones and adds no column. Deterministic, so every rank builds the same basis.
        """
        chosen = self.select(action=action, hook=hook_name)
        if not len(chosen):
            which = "any action" if action is None else f"action {action!r}"
            having = self.select(action=action).hooks
            raise ConceptSetError(
                f"no concepts with {which} at hook {hook_name!r}; hooks that have such concepts: "
                f"{having or 'none'}"
            )
        columns: list[torch.Tensor] = []
        for c in chosen:
            w = c.vector.double()
            w = w / w.norm()
            for _ in range(2):  # "twice is enough" for numerical orthogonality
                if columns:
                    q = torch.stack(columns, dim=1)
                    w = w - q @ (q.T @ w)
            residual = w.norm()
            if residual > tol:
                columns.append(w / residual)
        return torch.stack(columns, dim=1).float()

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_sae_features(
        cls,
        sae: Any,
        hook_name: str,
        feature_ids: Sequence[int],
        labels: Sequence[str] | Mapping[int, str] | None = None,
        action: str = "suppress",
    ) -> ConceptSet:
        """One concept per SAE feature: its decoder row `W_dec[f]`, named `"{hook}:{f}"`."""
        w_dec = sae.W_dec.detach()
        d_sae = int(w_dec.shape[0])
        ids = [int(f) for f in feature_ids]
        if not ids:
            raise ConceptSetError("from_sae_features needs at least one feature id")
        for f in ids:
            if not 0 <= f < d_sae:
                raise ConceptSetError(f"feature id {f} is out of range for an SAE with d_sae={d_sae}")
        if len(set(ids)) != len(ids):
            raise ConceptSetError(f"feature ids repeat: {ids}")
        labels_of = _labels(labels, ids)
        meta = getattr(getattr(sae, "cfg", None), "metadata", None)
        provenance = {}
        if meta is not None:
            for key in ("model_name", "hook_name", "neuronpedia_id"):
                if meta.get(key) is not None:
                    provenance[f"sae_{key}"] = meta.get(key)
        return cls(
            Concept(
                name=f"{hook_name}:{f}",
                hook=hook_name,
                vector=w_dec[f],
                label=labels_of[i],
                action=action,
                source={"kind": "sae_feature", "feature": f, "d_sae": d_sae, **provenance},
            )
            for i, f in enumerate(ids)
        )

    @classmethod
    def from_vectors(
        cls,
        vectors: torch.Tensor | Sequence[torch.Tensor],
        hook_name: str,
        names: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
        action: str = "suppress",
    ) -> ConceptSet:
        """Concepts from raw directions, [k, d] or a list of [d]; named `"{hook}:v{i}"` by default."""
        if isinstance(vectors, torch.Tensor):
            if vectors.dim() != 2:
                raise ConceptSetError(f"vectors must be [k, d] or a list of [d], got shape {tuple(vectors.shape)}")
            rows = list(vectors.unbind(0))
        else:
            rows = list(vectors)
        if not rows:
            raise ConceptSetError("from_vectors needs at least one vector")
        names = list(names) if names is not None else [f"{hook_name}:v{i}" for i in range(len(rows))]
        if len(names) != len(rows):
            raise ConceptSetError(f"{len(names)} names for {len(rows)} vectors")
        labels_of = _labels(labels, list(range(len(rows))))
        return cls(
            Concept(name, hook_name, vec, labels_of[i], action, {"kind": "vector"})
            for i, (name, vec) in enumerate(zip(names, rows, strict=True))
        )

    @classmethod
    def from_activation_difference(
        cls,
        acts_with: torch.Tensor,
        acts_without: torch.Tensor,
        hook_name: str,
        *,
        name: str,
        label: str = "",
        action: str = "suppress",
        mask_with: torch.Tensor | None = None,
        mask_without: torch.Tensor | None = None,
    ) -> ConceptSet:
        """Persona-vector style: mean activation with the trait minus mean without.

        Activations are [n, d] or [b, s, d] (with an optional [b, s] mask of real tokens). The
        raw difference is kept (its norm is meaningful for steering); bases normalise anyway.
        """
        from lightning_anatomy.concepts.directions import masked_tokens

        a, n_a = masked_tokens(acts_with, mask_with, "acts_with")
        b, n_b = masked_tokens(acts_without, mask_without, "acts_without")
        if a.shape[-1] != b.shape[-1]:
            raise ConceptSetError(f"acts_with has width {a.shape[-1]} but acts_without has {b.shape[-1]}")
        direction = a.double().mean(0) - b.double().mean(0)
        source = {"kind": "mean_difference", "n_with": n_a, "n_without": n_b, "norm": float(direction.norm())}
        return cls([Concept(name, hook_name, direction.float(), label, action, source)])

    @classmethod
    def from_mean_difference(
        cls,
        model: nn.Module,
        tokenizer: Any,
        hook_name: str,
        texts_with: Sequence[str],
        texts_without: Sequence[str],
        *,
        name: str,
        label: str = "",
        action: str = "suppress",
        batch_size: int = 8,
        max_length: int = 256,
    ) -> ConceptSet:
        """Persona-vector style from texts: mean token activation at `hook_name` over every real
        token of `texts_with`, minus that of `texts_without` (one early-stopped forward per batch)."""
        from lightning_anatomy.concepts.directions import mean_activation

        mean_a, n_a = mean_activation(model, tokenizer, hook_name, texts_with, batch_size, max_length, "texts_with")
        mean_b, n_b = mean_activation(model, tokenizer, hook_name, texts_without, batch_size, max_length,
                                      "texts_without")
        direction = mean_a - mean_b
        source = {
            "kind": "mean_difference",
            "n_with": n_a,
            "n_without": n_b,
            "texts_with": len(texts_with),
            "texts_without": len(texts_without),
            "norm": float(direction.norm()),
        }
        return cls([Concept(name, hook_name, direction.float(), label, action, source)])

    @classmethod
    def from_mean_difference_later(
        cls,
        model: nn.Module,
        tokenizer: Any,
        hook_name: str,
        texts_with: Sequence[str],
        texts_without: Sequence[str],
        *,
        name: str,
        label: str = "",
        action: str = "suppress",
        batch_size: int = 8,
        max_length: int = 256,
    ) -> ConceptSet:
        """`from_mean_difference` at `hook_name` and at the `resid_post` of every later block, each
        direction measured at its own layer (named `name`, then `name_L<layer>`).

        For edits that must act wherever the model could reroute the concept after the hook
        (blocking at later layers; BLOCK-EM reports re-emergence through other layers)."""
        from lightning_anatomy.model_access import find_blocks, resolve_hook

        point = resolve_hook(model, hook_name)
        n_blocks = len(find_blocks(model)[1])
        is_block_output = point.kind == "output" and hook_name.endswith("hook_resid_post")
        first_later = point.layer + 1 if is_block_output else max(point.layer, 0)
        out = cls.from_mean_difference(model, tokenizer, hook_name, texts_with, texts_without, name=name, label=label,
                                       action=action, batch_size=batch_size, max_length=max_length)
        for layer in range(first_later, n_blocks):
            out = out + cls.from_mean_difference(
                model, tokenizer, f"blocks.{layer}.hook_resid_post", texts_with, texts_without, name=f"{name}_L{layer}",
                label=label, action=action, batch_size=batch_size, max_length=max_length)
        return out

    @classmethod
    def from_pca(
        cls,
        acts_a: torch.Tensor,
        acts_b: torch.Tensor,
        hook_name: str,
        k: int = 1,
        *,
        names: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
        action: str = "suppress",
        mask: torch.Tensor | None = None,
        center: bool = True,
    ) -> ConceptSet:
        """CAFT style: the top-`k` principal components of paired differences `acts_a - acts_b`.

        `acts_a`/`acts_b` are paired activations ([n, d], or [b, s, d] with an optional [b, s]
        mask), e.g. two models on the same tokens. Classic (centred) PCA by default; each
        component is oriented so the mean difference projects non-negatively onto it.
        """
        from lightning_anatomy.concepts.directions import pca_directions

        comps, ratios, n = pca_directions(acts_a, acts_b, k, mask=mask, center=center)
        names = list(names) if names is not None else [f"{hook_name}:pc{i}" for i in range(k)]
        if len(names) != k:
            raise ConceptSetError(f"{len(names)} names for k={k} components")
        labels_of = _labels(labels, list(range(k)))
        concepts = []
        for i in range(k):
            source = {"kind": "pca", "component": i, "explained_variance_ratio": ratios[i], "n": n, "center": center}
            concepts.append(Concept(names[i], hook_name, comps[i].float(), labels_of[i], action, source))
        return cls(concepts)

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> Path:
        """Write `path/concepts.yaml` and `path/vectors.safetensors` (each atomically; the format is
        in `concepts.concept_file`)."""
        return save_concepts(self._concepts, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, model: nn.Module | None = None) -> ConceptSet:
        """Read a saved set, validating every field; with `model`, also check widths per hook."""
        result = cls(load_concepts(path))
        if model is not None:
            result.validate_against(model)
        return result

    def validate_against(self, model: nn.Module) -> None:
        """Raise unless every hook resolves on `model` and every vector has the width there."""
        from lightning_anatomy.model_access import hidden_size_at

        for hook in self.hooks:
            try:
                width = hidden_size_at(model, hook)
            except ValueError as err:
                raise ConceptSetError(f"concept set hook {hook!r} does not fit the model: {err}") from None
            for c in self.select(hook=hook):
                if c.dim != width:
                    raise ConceptSetError(
                        f"concept {c.name!r}: vector has d={c.dim} but the model's width at {hook!r} is {width}; "
                        "this concept set was built for another model"
                    )


# ---------------------------------------------------------------------- helpers


def _labels(labels: Sequence[str] | Mapping[int, str] | None, keys: list[int]) -> list[str]:
    if labels is None:
        return [""] * len(keys)
    if isinstance(labels, Mapping):
        return [str(labels.get(k, "")) for k in keys]
    labels = list(labels)
    if len(labels) != len(keys):
        raise ConceptSetError(f"{len(labels)} labels for {len(keys)} concepts")
    return [str(x) for x in labels]


def check_concept_dir(path: str | os.PathLike, where: str = "concepts") -> None:
    """Refuse a ConceptSet directory that does not load, naming the config key (reading the set is
    cheap: no model is needed, so configs check it before anything heavy)."""
    try:
        ConceptSet.load(path)
    except ConceptSetError as err:
        raise ConceptSetError(f"{where}={str(path)!r}: {err}") from None
