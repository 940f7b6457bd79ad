"""One model digest and one data digest, for every cache key and every resume check.

A cache is valid only for the weights and the tokenized data it was computed from; a checkpoint
can be resumed only against the reference it was trained with. Both questions are answered by
these two functions, so no cache hashes the same thing differently.
"""

from __future__ import annotations

import hashlib
import json
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_anatomy.sharding import clean_name, has_fsdp1_units, is_sharded_tensor


@torch.no_grad()
def model_digest(module: nn.Module) -> str:
    """Exact bytes of up to 64 evenly spaced entries of every parameter and buffer, with names,
    shapes and dtypes: cheap even for a 70B model on GPU, free of reduction-order noise, and
    different for another checkpoint or fine-tune."""
    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        flat = t.detach().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if flat.numel():
            # integer spacing: a float32 linspace rounds past the end for tensors above 2**24 entries
            k = min(64, flat.numel())
            idx = torch.arange(k, device=flat.device, dtype=torch.int64) * (flat.numel() - 1) // max(k - 1, 1)
            h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def tensor_digest(tensor: torch.Tensor) -> str:
    """Exact bytes of a whole (small) tensor as float32: a concept vector, an SAE's decoder."""
    return hashlib.sha256(tensor.detach().to(torch.float32).cpu().contiguous().numpy().tobytes()).hexdigest()


def callable_digest(fn: object) -> str:
    """A callable in a cache key: its module and qualified name (its class's for a callable
    object), then a digest of its code (constants, referenced names and nested code objects, so
    editing a scoring function's body misses the cache), its defaults and what it closes over
    (callables by this same rule, tensors by `tensor_digest`, immutable values by `repr`). A
    callable object's attributes count as closed-over values. Not seen: a global it reads at call
    time and a mutable container it closes over (a list, a dict: a counter or a memo changes as
    it runs); rename the function, or clear the cache, when only such a value changes."""
    name = _callable_name(fn)
    h = hashlib.sha256(name.encode())
    _digest_callable(fn, h, depth=0)
    return f"{name}:{h.hexdigest()[:16]}"


def _callable_name(fn: object) -> str:
    named = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(named, '__module__', '?')}.{getattr(named, '__qualname__', repr(named))}"


def _digest_callable(fn: object, h: Any, depth: int) -> None:
    """Code, defaults, closure and (a callable object's) attributes of `fn`; `depth` bounds the
    recursion through closed-over callables, which may hold themselves."""
    target = fn if hasattr(fn, "__code__") else type(fn).__dict__.get("__call__")
    code = getattr(target, "__code__", None)
    if code is None or depth > 4:  # a builtin, or deep enough: the name stands for it
        return
    _digest_code(code, h)
    values = [getattr(target, "__defaults__", None)]
    for cell in getattr(target, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    if not hasattr(fn, "__code__") and hasattr(fn, "__dict__"):  # a callable object: its attributes parametrise it
        for key, value in sorted(vars(fn).items()):
            h.update(key.encode())
            values.append(value)
    for value in values:
        _digest_value(value, h, depth)


def _digest_code(code: types.CodeType, h: Any) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _digest_code(const, h)
        else:
            h.update(repr(const).encode())


def _digest_value(value: object, h: Any, depth: int) -> None:
    """Tensors, callables and immutable values parametrise a callable; a mutable container it
    closes over (a counter, a memo) changes as it runs, so it is left out (as a global is)."""
    if isinstance(value, torch.Tensor):
        h.update(tensor_digest(value).encode())
    elif isinstance(value, tuple | frozenset):
        for v in value:
            _digest_value(v, h, depth)
    elif callable(value) and not isinstance(value, type):
        h.update(_callable_name(value).encode())
        _digest_callable(value, h, depth + 1)
    elif value is None or isinstance(value, bool | int | float | complex | str | bytes):
        h.update(repr(value).encode())


def pairs_digest(pairs: Sequence[Any]) -> str:
    """Row ids and token ids of tokenized pairs (`TokenizedPair`), in order, with a pair's reference
    prompt and token-filter masks where it has them (so a precomputed reference table is keyed on
    what the reference scored; pairs without them hash as they always did)."""
    h = hashlib.sha256()
    for p in pairs:
        fields = [p.row_id, p.prompt_ids, p.chosen_ids, p.rejected_ids]
        extra = {k: getattr(p, k, None) for k in ("ref_prompt_ids", "chosen_keep", "rejected_keep")}
        if any(v is not None for v in extra.values()):
            fields.append({k: None if v is None else list(v) for k, v in extra.items()})
        h.update(json.dumps(fields).encode())
        h.update(b"\n")
    return h.hexdigest()


def combined_digest(*parts: Any, length: int = 24) -> str:
    """A short key from digests and JSON-able settings."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:length]


@torch.no_grad()
def full_model_digest(module: nn.Module, fsdp_root: nn.Module | None = None) -> str:
    """`model_digest` of the whole weights of a module that may be sharded (FSDP1 or FSDP2).

    A sharded weight is gathered one tensor at a time (a collective: call this on every rank) and
    FSDP1 wrapper prefixes are dropped from names, so the digest equals `model_digest` of the same
    weights unsharded, and a cache written by a 1-process run is found by a sharded one. Under
    FSDP1, `fsdp_root` is the outermost FSDP unit owning any of the module's parameters (under
    Lightning's FSDPStrategy, `trainer.model`); by default the module itself.
    """
    root = module if fsdp_root is None else fsdp_root
    if has_fsdp1_units(root):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(root, writeback=False):
            return _gathered_digest(module)
    return _gathered_digest(module)


def _gathered_digest(module: nn.Module) -> str:
    import itertools

    h = hashlib.sha256()
    for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
        t = t.full_tensor() if is_sharded_tensor(t) else t
        flat = t.detach().reshape(-1)
        h.update(f"{clean_name(name)}:{tuple(t.shape)}:{t.dtype}".encode())
        if flat.numel():
            k = min(64, flat.numel())
            idx = torch.arange(k, device=flat.device, dtype=torch.int64) * (flat.numel() - 1) // max(k - 1, 1)
            h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()
