"""The `saes` option of the measuring and blocking callbacks: SAEs (or SAE specs) per hook.

Callbacks are built (from YAML too) before they see the policy, so a spec resolves through
`concepts.sae.load_sae` at construction, except `random:<d_sae>`, whose `d_in` comes from the
model at setup (`build_pending_saes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lightning_anatomy.concepts.sae import RandomSAESpec, load_sae
from lightning_anatomy.model_access import hidden_size_at


def load_saes(saes: object, owner: str) -> tuple[dict[str, Any], dict[str, int]]:
    """`({hook: SAE}, {hook: d_sae})` from a ConceptLens or `{hook: SAE | any SAE spec}`.

    Specs resolve through `concepts.sae.load_sae`, so a YAML config can name SAEs as strings;
    a `random:<d_sae>` spec stays a `RandomSAESpec` until `build_pending_saes` sees the model.
    """
    saes = getattr(saes, "saes", saes)
    if not isinstance(saes, Mapping) or not saes:
        raise ValueError(f"{owner}: saes must be a non-empty dict {{hook_name: SAE or SAE spec}} or a ConceptLens")
    loaded, widths = {}, {}
    for hook, spec in saes.items():
        sae = spec if hasattr(spec, "W_dec") or not isinstance(spec, str | dict | RandomSAESpec) else load_sae(spec)
        if isinstance(sae, RandomSAESpec) and isinstance(hook, str):
            loaded[hook], widths[hook] = sae, sae.d_sae
            continue
        w_dec = getattr(sae, "W_dec", None)
        if not isinstance(hook, str) or not isinstance(w_dec, torch.Tensor) or w_dec.dim() != 2:
            raise ValueError(
                f"{owner}: saes[{hook!r}] is not a sae-lens SAE (needs encode() and a 2-d W_dec [d_sae, d_in])"
            )
        loaded[hook], widths[hook] = sae, int(w_dec.shape[0])
    return loaded, widths


def build_pending_saes(saes: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """`saes` with every `RandomSAESpec` built at the model's width at its hook (at setup)."""
    return {hook: sae.build(hidden_size_at(model, hook)) if isinstance(sae, RandomSAESpec) else sae
            for hook, sae in saes.items()}


def check_resumed_widths(saved: Mapping[str, int], widths: Mapping[str, int], owner: str) -> None:
    """A checkpoint's per-hook SAE widths must match this callback's: state from other SAEs
    (totals, drift baselines) would be silently misread."""
    if dict(saved) != dict(widths):
        raise ValueError(
            f"{owner} checkpoint was saved with SAE widths {dict(saved)}, this callback has {dict(widths)}; "
            "resume with the same SAEs"
        )


__all__ = ["build_pending_saes", "check_resumed_widths", "load_saes"]
