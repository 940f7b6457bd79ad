"""`ConceptSteering`: add a concept vector at its hook while training (persona vectors).

Preventative steering (Chen et al. 2025) adds strength·v at each concept's hook while training,
on the chosen and/or rejected half of the `[chosen; rejected]` batch, so the optimizer no longer
needs to move the model toward v; at inference (no steering) the trait stays out.
"""

from __future__ import annotations

import math
import os
from typing import ClassVar

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import Strategy

from lightning_anatomy.callbacks._hooked import HookedCallback
from lightning_anatomy.callbacks.options import renamed_option
from lightning_anatomy.callbacks.strategies import DATA_PARALLEL, SHARDED, check_strategy
from lightning_anatomy.concepts.concept_set import ConceptSet
from lightning_anatomy.interventions.activation_edits import register_activation_edit
from lightning_anatomy.interventions.steering import SIDES, signed_vectors, steering_edit
from lightning_anatomy.model_access import find_causal_lm, hidden_size_at, resolve_hook


class ConceptSteering(HookedCallback):
    """Add strength·v at each concept's hook while training (persona-vector preventative steering).

    Args:
        concepts: a `ConceptSet` (or a saved one's directory). At each hook, v is the sum of the
            concept vectors (raw, unnormalised: a mean-difference vector's norm is its natural
            scale), `suppress` ones added and `amplify` ones subtracted; `allow` ones are skipped.
        strength: the steering coefficient α (finite, non-zero; required).
        sides: `"both"`, `"chosen"` (rows 0..B-1 of the `[chosen; rejected]` batch) or
            `"rejected"` (rows B..2B-1).
        allow_untested_strategy: run under strategies other than `supported_strategies`.
        alpha: deprecated name of `strength` (accepted for one release, with a DeprecationWarning).

    Training forwards only (the Trainer's training stage, whatever the model's train/eval mode):
    validation, inference after fit and the reference forward are untouched.

    Strategies (`supported_strategies`): SingleDeviceStrategy, DDPStrategy, FSDPStrategy and
    ModelParallelStrategy (FSDP2, without tensor parallelism); others are refused at setup.
    """

    supported_strategies: ClassVar[tuple[type[Strategy], ...]] = DATA_PARALLEL + SHARDED

    def __init__(
        self,
        concepts: ConceptSet | str | os.PathLike,
        strength: float | None = None,
        sides: str = "both",
        allow_untested_strategy: bool = False,
        *,
        alpha: float | None = None,
    ) -> None:
        super().__init__()
        strength = renamed_option("ConceptSteering", "strength", strength, "alpha", alpha)
        if isinstance(concepts, str | os.PathLike):
            concepts = ConceptSet.load(concepts)
        if not hasattr(concepts, "select") or not hasattr(concepts, "hooks"):
            raise ValueError(f"ConceptSteering: concepts must be a ConceptSet, got {type(concepts).__name__}")
        if strength is None:
            raise ValueError("ConceptSteering: strength is required (the steering coefficient α, finite, non-zero)")
        if (isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength)
                or strength == 0):
            raise ValueError(f"ConceptSteering: strength must be a finite non-zero number, got {strength!r}")
        if sides not in SIDES:
            raise ValueError(f"ConceptSteering: sides={sides!r} is not one of {SIDES}")
        self.vectors: dict[str, torch.Tensor] = {}
        for hook in concepts.hooks:
            if any(c.action != "allow" for c in concepts.select(hook=hook)):
                self.vectors[hook] = signed_vectors(concepts, hook).sum(0)
        if not self.vectors:
            raise ValueError(
                "ConceptSteering: concepts has no concept with action 'suppress' or 'amplify'; "
                "set actions in concepts.yaml or with ConceptSet.with_actions"
            )
        self.strength = float(strength)
        self.sides = sides
        self.allow_untested_strategy = bool(allow_untested_strategy)

    @property
    def alpha(self) -> float:
        """Deprecated name of `strength`."""
        return self.strength

    @property
    def state_key(self) -> str:
        # "alpha" stays the key's name: checkpoints written before the rename resume unchanged
        return self._generate_state_key(alpha=self.strength, sides=self.sides, hooks=tuple(self.vectors))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, self)
        model = find_causal_lm(pl_module)
        for hook, vector in self.vectors.items():
            width = hidden_size_at(model, hook)
            if width != vector.numel():
                raise ValueError(
                    f"ConceptSteering: concepts at {hook!r} have d={vector.numel()} but the model's activation "
                    f"there has width {width}; the concept set was built for another model"
                )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.remove_hooks()
        model = find_causal_lm(pl_module)
        shared = trainer.strategy.broadcast(self.vectors, src=0)
        for hook, vector in shared.items():
            edit = steering_edit(vector, self.strength, self.sides, active=lambda: trainer.training)
            self._handles.append(register_activation_edit(resolve_hook(model, hook), edit))


__all__ = ["ConceptSteering"]
