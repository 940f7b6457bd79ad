"""Model access, the foundation below everything that trains or measures: hook points, the pass
flags, and finding the causal LM and its blocks.

It imports nothing of the package, so `concepts/`, `sharding`, `module` and `logprobs` can all
build on it.

SAE releases name their hook points TransformerLens-style (`blocks.8.hook_resid_pre`); the
models we train are plain `transformers` models. This module maps one onto the other for the
GPT-2, GPT-NeoX/Pythia, Llama/Mistral/Qwen2/SmolLM and Gemma/Gemma 2 layouts (also through a
PEFT wrapper), and holds the small helpers every hook in the package shares so that they all
read and edit hidden states the same way.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "HookPoint",
    "resolve_hook",
    "hook_names",
    "hook_output",
    "hook_input",
    "find_blocks",
    "find_causal_lm",
    "hidden_size_at",
    "unwrap_model",
    "reference_pass",
    "is_reference_pass",
    "measurement_pass",
    "is_measurement_pass",
    "edits_suspended",
]

HookKind = Literal["output", "input"]

_TL_NAME = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)$")
# Block lists of the supported layouts, most specific first.
_BLOCK_SUFFIXES = ("transformer.h", "gpt_neox.layers", "model.layers", "language_model.layers", "decoder.layers")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe")


@dataclass(frozen=True)
class HookPoint:
    """A resolved hook: `module` to hook, and whether its output or its first input is the activation.

    `layer` is the block index; -1 for modules before the first block (embeddings) and
    `num_blocks` for modules after the last one (final norm, LM head).
    """

    name: str
    module: nn.Module
    layer: int
    kind: HookKind = "output"
    module_path: str = ""


# --------------------------------------------------------------------------- model structure


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        try:
            return get_base()
        except Exception:  # noqa: BLE001 - a non-PEFT object with that name: keep the model
            return model
    return model


def _num_layers(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    get_text = getattr(cfg, "get_text_config", None)
    text_cfg = get_text() if callable(get_text) else cfg
    return getattr(text_cfg, "num_hidden_layers", None)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list of `model` and its dotted path (relative to the unwrapped model).

    Found generically: the known paths (`transformer.h`, `gpt_neox.layers`, `model.layers`, ...)
    first, then any `ModuleList` whose length is the config's `num_hidden_layers`.
    """
    base = unwrap_model(model)
    lists = [(n, m) for n, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for suffix in _BLOCK_SUFFIXES:
        for name, mod in lists:
            if name == suffix or name.endswith("." + suffix):
                return name, mod
    n_layers = _num_layers(base)
    for name, mod in lists:
        if n_layers is not None and len(mod) == n_layers and "vision" not in name:
            return name, mod
    raise ValueError(
        f"could not find the list of transformer blocks in {type(base).__name__} (looked for "
        f"{', '.join(_BLOCK_SUFFIXES)} and a ModuleList of num_hidden_layers={n_layers}); "
        "pass a full module path such as 'model.layers.3' instead of a blocks.* name"
    )


def _submodule(block: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for n in names:
        mod = getattr(block, n, None)
        if isinstance(mod, nn.Module):
            return n, mod
    return None


def _attn_out(block: nn.Module) -> tuple[str, nn.Module] | None:
    """What the attention sublayer adds to the residual stream, as TransformerLens' hook_attn_out.

    Gemma 2/3 and OLMo 2 normalise the sublayer output before adding it (`post_attention_layernorm`
    is then an output norm, recognisable by a `post_feedforward_layernorm` beside it); GPT-NeoX
    applies a dropout module after attention.
    """
    if hasattr(block, "post_feedforward_layernorm") and hasattr(block, "post_attention_layernorm"):
        return "post_attention_layernorm", block.post_attention_layernorm
    if isinstance(getattr(block, "post_attention_dropout", None), nn.Module):
        return "post_attention_dropout", block.post_attention_dropout
    return _submodule(block, _ATTN_NAMES)


def _mlp_out(block: nn.Module) -> tuple[str, nn.Module] | None:
    """What the MLP sublayer adds to the residual stream (see `_attn_out`)."""
    if hasattr(block, "post_feedforward_layernorm"):
        return "post_feedforward_layernorm", block.post_feedforward_layernorm
    if isinstance(getattr(block, "post_mlp_dropout", None), nn.Module):
        return "post_mlp_dropout", block.post_mlp_dropout
    return _submodule(block, _MLP_NAMES)


def hook_names(model: nn.Module) -> list[str]:
    """Every TransformerLens-style hook name `model` supports (any dotted module path works too)."""
    _, blocks = find_blocks(model)
    names = []
    for i, block in enumerate(blocks):
        names += [f"blocks.{i}.hook_resid_pre", f"blocks.{i}.hook_resid_post"]
        if _attn_out(block) is not None:
            names.append(f"blocks.{i}.hook_attn_out")
        if _mlp_out(block) is not None:
            names.append(f"blocks.{i}.hook_mlp_out")
    return names


def _valid_names_summary(model: nn.Module) -> str:
    path, blocks = find_blocks(model)
    n = len(blocks)
    kinds = ["resid_pre", "resid_post"]
    if _attn_out(blocks[0]) is not None:
        kinds.append("attn_out")
    if _mlp_out(blocks[0]) is not None:
        kinds.append("mlp_out")
    layers = "0" if n == 1 else f"{{0..{n - 1}}}"
    listed = ", ".join(f"blocks.{layers}.hook_{k}" for k in kinds)
    return f"{listed}, or a module path such as '{path}.0'"


def _layer_of_path(model: nn.Module, path: str, module: nn.Module) -> int:
    blocks_path, blocks = find_blocks(model)
    # Paths may be given relative to the wrapper or to the unwrapped model.
    inside = re.search(rf"(?:^|\.){re.escape(blocks_path)}\.(\d+)(?:\.|$)", path)
    if inside is not None:
        return int(inside.group(1))
    leaf = path.split(".")[-1]
    if module is unwrap_model(model).get_input_embeddings() or any(k in leaf for k in ("embed", "wte", "wpe")):
        return -1
    return len(blocks)


def resolve_hook(model: nn.Module, hook_name: str) -> HookPoint:
    """Resolve a TransformerLens-style name or an HF module path to a `HookPoint`.

    `blocks.{L}.hook_resid_post` is block L's output, `blocks.{L}.hook_resid_pre` its first input
    (kind "input"), `blocks.{L}.hook_attn_out` / `hook_mlp_out` what the attention / MLP sublayer
    adds to the residual stream. Any other name is looked up as a dotted module path on `model`,
    then on the model under a PEFT wrapper; its output is the activation.
    """
    if not isinstance(hook_name, str) or not hook_name:
        raise ValueError(f"hook name must be a non-empty string, got {hook_name!r}")
    match = _TL_NAME.match(hook_name)
    if match is not None:
        layer, what = int(match.group(1)), match.group(2)
        path, blocks = find_blocks(model)
        if layer >= len(blocks):
            raise ValueError(
                f"unknown hook {hook_name!r}: layer {layer} is out of range, {type(unwrap_model(model)).__name__} "
                f"has {len(blocks)} blocks; valid names: {_valid_names_summary(model)}"
            )
        block = blocks[layer]
        if what in ("resid_pre", "resid_post"):
            kind: HookKind = "input" if what == "resid_pre" else "output"
            return HookPoint(hook_name, block, layer, kind, f"{path}.{layer}")
        found = _attn_out(block) if what == "attn_out" else _mlp_out(block)
        if found is None:
            raise ValueError(
                f"unknown hook {hook_name!r}: block {type(block).__name__} has no "
                f"{'attention' if what == 'attn_out' else 'MLP'} submodule; valid names: {_valid_names_summary(model)}"
            )
        sub, module = found
        return HookPoint(hook_name, module, layer, "output", f"{path}.{layer}.{sub}")

    for root in (model, unwrap_model(model)):
        try:
            module = root.get_submodule(hook_name)
        except AttributeError:
            continue
        return HookPoint(hook_name, module, _layer_of_path(model, hook_name, module), "output", hook_name)
    raise ValueError(
        f"unknown hook {hook_name!r} for {type(unwrap_model(model)).__name__}; "
        f"valid names: {_valid_names_summary(model)}"
    )


def hidden_size_at(model: nn.Module, hook: str | HookPoint) -> int:
    """Width of the activation at `hook` (what an SAE's `d_in` must equal)."""
    point = resolve_hook(model, hook) if isinstance(hook, str) else hook
    if _TL_NAME.match(point.name) is not None:
        return _model_width(model)
    mod = point.module
    if isinstance(mod, nn.Linear):
        return int(mod.out_features)
    if isinstance(mod, nn.Embedding):
        return int(mod.embedding_dim)
    _, blocks = find_blocks(model)
    if any(mod is b for b in blocks):
        return _model_width(model)
    direct = [p for n, p in mod.named_parameters(recurse=False) if n == "weight"]
    if direct and direct[0].dim() == 1 and not list(mod.children()):
        return int(direct[0].numel())  # a norm layer
    return _probe_width(model, point)


def _model_width(model: nn.Module) -> int:
    emb = unwrap_model(model).get_input_embeddings()
    if isinstance(emb, nn.Embedding):
        return int(emb.embedding_dim)
    cfg = unwrap_model(model).config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(text.hidden_size)


class _ProbeDone(Exception):
    pass


def _probe_width(model: nn.Module, point: HookPoint) -> int:
    """Run one token up to `point` and read the width (for modules whose width is not static)."""
    seen: list[int] = []

    def grab(_mod, _args, out):
        hidden, _ = hook_output(out)
        seen.append(int(hidden.shape[-1]))
        raise _ProbeDone

    handle = point.module.register_forward_hook(grab)
    device = next(model.parameters()).device
    try:  # as a reference pass, so statistics/intervention hooks of callbacks ignore the probe
        with torch.no_grad(), reference_pass():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    except _ProbeDone:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"hook {point.name!r}: module {point.module_path!r} did not run in a forward pass")
    return seen[0]


# --------------------------------------------------------------------------- hook plumbing


def hook_output(module_output: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """Split a module output into (hidden states, rebuild) so a hook can edit it structure-blind.

    Handles a tensor, a tuple/list whose first element is the hidden state (transformers 5 layers
    return either, attention modules a tuple) and a `ModelOutput`. `rebuild(new_hidden)` returns
    the same structure with the hidden state replaced.
    """
    if isinstance(module_output, torch.Tensor):
        return module_output, lambda new: new
    if isinstance(module_output, tuple | list) and module_output and isinstance(module_output[0], torch.Tensor):
        rest = module_output[1:]
        kind = type(module_output)
        if kind in (tuple, list):
            return module_output[0], lambda new: kind((new, *rest))
        return module_output[0], lambda new: kind(new, *rest)  # namedtuple
    if isinstance(module_output, dict) and module_output:  # transformers ModelOutput
        key = next(iter(module_output))
        value = module_output[key]
        if isinstance(value, torch.Tensor):
            return value, lambda new: type(module_output)(**{**module_output, key: new})
    raise TypeError(
        f"cannot find hidden states in a module output of type {type(module_output).__name__}; "
        "expected a tensor or a tuple whose first element is the hidden-state tensor"
    )


def hook_input(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple[tuple, dict]]]:
    """Split a block's call arguments into (hidden states, rebuild) for a `with_kwargs` pre-hook.

    The hidden state is the first positional argument, or `hidden_states=` when passed by
    keyword. `rebuild(new_hidden)` returns `(args, kwargs)` to return from the pre-hook.
    """
    if args and isinstance(args[0], torch.Tensor):
        return args[0], lambda new: ((new, *args[1:]), kwargs)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"], lambda new: (args, {**kwargs, "hidden_states": new})
    raise TypeError(
        "cannot find the hidden states among a block's inputs: expected a tensor as the first "
        "positional argument or as hidden_states="
    )


def find_causal_lm(pl_module: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside a LightningModule: `.policy`, then `.model`, then the
    first `transformers.PreTrainedModel` submodule. A PEFT wrapper is returned as is."""
    from transformers import PreTrainedModel

    def is_lm(obj: Any) -> bool:
        return isinstance(obj, PreTrainedModel) or (
            isinstance(obj, nn.Module) and isinstance(unwrap_model(obj), PreTrainedModel)
        )

    if isinstance(pl_module, PreTrainedModel):
        return pl_module
    for attr in ("policy", "model"):
        candidate = getattr(pl_module, attr, None)
        if is_lm(candidate):
            return candidate
    for mod in pl_module.modules():
        if isinstance(mod, PreTrainedModel):
            return mod
    raise ValueError(
        f"{type(pl_module).__name__} holds no Hugging Face model: expected an attribute `policy` or "
        "`model` holding a transformers PreTrainedModel (or a PEFT wrapper of one), or such a submodule"
    )


# --------------------------------------------------------------------------- pass flags
#
# The one rule for when a training-time edit acts. Every activation edit (ablation, steering,
# projection, blocking) and every training statistic (attribution) acts on the policy's own
# training forwards only; it does nothing inside
#   * `reference_pass()`: the reference model's forward (a PEFT reference runs through the same
#     modules with adapters off), and
#   * `measurement_pass()`: a forward that measures the model (drift probes, rollouts, the lens,
#     extraction, evaluation), which must see the model as it is, without the edits.
# Hooks check `edits_suspended()`, which is true inside either. The one reader of the reference
# forward is `ConceptBlocking`: it captures the reference's activation (never edits it) exactly
# inside `reference_pass()` and outside `measurement_pass()`, to compare it with the policy's.

_state = threading.local()


@contextmanager
def _flag(name: str) -> Iterator[None]:
    setattr(_state, name, getattr(_state, name, 0) + 1)
    try:
        yield
    finally:
        setattr(_state, name, getattr(_state, name) - 1)


def reference_pass() -> contextlib.AbstractContextManager[None]:
    """Mark the forward passes inside as the reference model's (nestable, per thread).

    The reference forward of a PEFT policy runs through the policy's own modules with adapters
    off; hooks that intervene or collect statistics check `edits_suspended()` and do nothing.
    """
    return _flag("reference")


def measurement_pass() -> contextlib.AbstractContextManager[None]:
    """Mark the forward passes inside as measurements of the model (nestable, per thread).

    Probes, rollouts, lens passes and evaluations run inside it so that they see the model
    without the training-time edits of any callback that is attached.
    """
    return _flag("measurement")


def is_reference_pass() -> bool:
    """True inside `reference_pass()` on this thread."""
    return getattr(_state, "reference", 0) > 0


def is_measurement_pass() -> bool:
    """True inside `measurement_pass()` on this thread."""
    return getattr(_state, "measurement", 0) > 0


def edits_suspended() -> bool:
    """True where training-time edits and training statistics must not act (see the rule above)."""
    return is_reference_pass() or is_measurement_pass()
