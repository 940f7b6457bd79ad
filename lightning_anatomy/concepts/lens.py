"""ConceptLens: a causal LM read through SAEs at one or more hook points.

One forward pass under `no_grad` collects every hooked activation; with `stop_at_deepest` the
pass is cut right after the deepest hooked module (a private exception raised from its hook),
so later layers and the LM head, the most expensive part of a small-model forward, never run.
Features are exactly `sae.encode(activation)`; nothing else touches them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_anatomy.concepts.sae import check_width, load_sae, measure_fidelity
from lightning_anatomy.model_access import (
    HookPoint,
    hook_input,
    hook_output,
    measurement_pass,
    resolve_hook,
)
from lightning_anatomy.sharding import is_sharded_module

__all__ = ["ConceptLens", "capture_activations", "span_stats"]


class _StopForward(Exception):
    """Raised from the last hook to fire; never escapes `capture_activations`."""


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def capture_activations(
    model: nn.Module,
    hooks: Iterable[str | HookPoint],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    stop_at_deepest: bool = True,
) -> dict[str, torch.Tensor]:
    """Activations `{hook name: [b, s, d]}` at each hook from one forward pass under `no_grad`.

    The forward is a `measurement_pass()`: training-time edits of attached callbacks stay off.

    With `stop_at_deepest` the forward stops as soon as every hook has fired, except on a sharded
    model (FSDP): an exception out of a sharded forward would leave FSDP's root state mid-forward
    for the next one (on GPU it then skips the root's stream synchronisation), so it runs to the
    end. A module that runs more than once in a forward keeps its first activation. Hooks are
    removed on every exit path.
    """
    points: dict[str, HookPoint] = {}
    for hook in hooks:
        point = resolve_hook(model, hook) if isinstance(hook, str) else hook
        points[point.name] = point
    if not points:
        raise ValueError("capture_activations needs at least one hook name")
    captured: dict[str, torch.Tensor] = {}
    stop_at_deepest = stop_at_deepest and not is_sharded_module(model)

    def keep(name: str, hidden: torch.Tensor) -> None:
        if name not in captured:
            captured[name] = hidden.detach()
        if stop_at_deepest and len(captured) == len(points):
            raise _StopForward

    handles = []
    for name, point in points.items():
        if point.kind == "input":
            def pre_hook(_mod, args, kwargs, name=name):
                keep(name, hook_input(args, kwargs)[0])

            handles.append(point.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            def post_hook(_mod, _args, out, name=name):
                keep(name, hook_output(out)[0])

            handles.append(point.module.register_forward_hook(post_hook))
    device = _model_device(model)
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(device)
    try:
        with torch.no_grad(), measurement_pass():
            model(**kwargs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in points if n not in captured]
    if missing:
        raise RuntimeError(
            f"hooks {missing} did not fire in a forward pass of {type(model).__name__}; "
            "their modules are not on the forward path (pick another hook)"
        )
    return {name: captured[name] for name in points}


def span_stats(features: torch.Tensor, mask: torch.Tensor, threshold: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-sequence statistics of `features` [b, s, f] over the tokens where `mask` [b, s] is True.

    `max` (largest activation), `freq` (fraction of masked tokens with activation > threshold)
    and `mean`, each [b, f] float32; all zero for a row with an empty mask (never NaN).
    """
    if features.dim() != 3:
        raise ValueError(f"features must be [batch, seq, d_sae], got shape {tuple(features.shape)}")
    if tuple(mask.shape) != tuple(features.shape[:2]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match features {tuple(features.shape[:2])}")
    feats = features.float()
    m = mask.to(device=feats.device, dtype=torch.bool)
    count = m.sum(1)  # [b]
    weights = m.float()
    denom = count.clamp_min(1).float()[:, None]
    mean = torch.einsum("bs,bsf->bf", weights, feats) / denom
    fired = torch.einsum("bs,bsf->bf", weights, (feats > threshold).float())
    freq = fired / denom
    peak = feats.masked_fill(~m[..., None], float("-inf")).amax(1)
    peak = torch.where(count[:, None] > 0, peak, torch.zeros_like(peak))
    return {"max": peak, "freq": freq, "mean": mean}


class ConceptLens:
    """A model plus SAEs at hook points: activations and SAE features from one forward pass.

    `saes` maps hook names (TransformerLens-style or HF module paths) to an `sae_lens.SAE`, a
    directory or a registry spec (see `load_sae`). Hooks are resolved, SAEs loaded (specs onto the
    model's device) and widths checked at construction. `fidelity_check` sets the fraction of
    variance explained below which `attach_check` warns (True: 0.5; a float: that; False: off).
    The model's train/eval mode is left as the caller set it.
    """

    def __init__(
        self,
        model: nn.Module,
        saes: Mapping[str, Any],
        *,
        stop_at_deepest: bool = True,
        fidelity_check: bool | float = True,
    ) -> None:
        if not isinstance(saes, Mapping) or not saes:
            raise ValueError("ConceptLens needs saes={hook_name: sae}, with at least one hook")
        from sae_lens import SAE

        self.model = model
        self.stop_at_deepest = bool(stop_at_deepest)
        if fidelity_check is True:
            self.min_fve: float | None = 0.5
        elif fidelity_check is False or fidelity_check is None:
            self.min_fve = None
        else:
            self.min_fve = float(fidelity_check)
        self.hooks: dict[str, HookPoint] = {name: resolve_hook(model, name) for name in saes}
        device = _model_device(model)
        self.saes: dict[str, Any] = {}
        for name, spec in saes.items():
            sae = load_sae(spec, device=None if isinstance(spec, SAE) else device)
            check_width(sae, model, self.hooks[name])
            self.saes[name] = sae

    def __repr__(self) -> str:
        inner = ", ".join(f"{h}: d_sae={self.d_sae(h)}" for h in self.saes)
        return f"ConceptLens({type(self.model).__name__}, {{{inner}}})"

    def _sae(self, hook: str) -> Any:
        try:
            return self.saes[hook]
        except KeyError:
            raise KeyError(f"no SAE at hook {hook!r}; this lens has {list(self.saes)}") from None

    def _selected(self, hooks: Iterable[str] | None) -> list[str]:
        if hooks is None:
            return list(self.saes)
        chosen = [hooks] if isinstance(hooks, str) else list(hooks)
        for h in chosen:
            self._sae(h)
        return chosen

    def activations(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        hooks: Iterable[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """`{hook: [b, s, d]}` model activations (model dtype and device) at each (selected) hook."""
        names = self._selected(hooks)
        return capture_activations(
            self.model,
            [self.hooks[h] for h in names],
            input_ids,
            attention_mask,
            stop_at_deepest=self.stop_at_deepest,
        )

    @torch.no_grad()
    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        hooks: Iterable[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """`{hook: [b, s, d_sae]}`: `sae.encode` of each hook's activation (padding positions
        included; mask them with `span_stats` or the attention mask)."""
        acts = self.activations(input_ids, attention_mask, hooks=hooks)
        out = {}
        for name, act in acts.items():
            sae = self.saes[name]
            out[name] = sae.encode(act.to(next(sae.parameters()).device))
        return out

    def measure_fidelity(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        min_fve: float | None = None,
    ) -> dict[str, dict[str, float]]:
        """`{hook: {fve, l0, rel_error, dead_fraction}}` over the real (unmasked) tokens; warns per
        hook below `min_fve` (default: the lens' `fidelity_check` threshold)."""
        threshold = self.min_fve if min_fve is None else min_fve
        acts = self.activations(input_ids, attention_mask)
        result = {}
        for name, act in acts.items():
            tokens = act if attention_mask is None else act[attention_mask.to(act.device).bool()]
            result[name] = measure_fidelity(self.saes[name], tokens, hook=name, min_fve=threshold)
        return result

    def attach_check(
        self, sample_input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, dict[str, float]]:
        """The fidelity check callbacks run when they attach; `{}` when `fidelity_check=False`."""
        if self.min_fve is None:
            return {}
        return self.measure_fidelity(sample_input_ids, attention_mask, min_fve=self.min_fve)

    def d_sae(self, hook: str) -> int:
        return int(self._sae(hook).cfg.d_sae)

    def decoder(self, hook: str) -> torch.Tensor:
        """The SAE decoder `W_dec` [d_sae, d] at `hook` (detached): row f is feature f's direction."""
        return self._sae(hook).W_dec.detach()
