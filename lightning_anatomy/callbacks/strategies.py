"""Which training strategies a concept callback runs under: declared on the class, checked here.

Each callback declares `supported_strategies` (a tuple of Lightning `Strategy` classes) and its
docstring says the same (tests/callbacks/test_conventions.py checks both); `check_strategy` is
the one guard, called at setup, before any work starts.

Under FSDP (`FSDPStrategy`, FSDP2 through `ModelParallelStrategy`) the activations and their
gradients at the hooks are whole; only weights are sharded, so a measuring forward runs on every
rank (`measures_on_every_rank`). DeepSpeed ZeRO and tensor parallelism (which shards the
activations too) stay refused.
"""

from __future__ import annotations

from typing import Protocol

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import (
    DDPStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)

from lightning_anatomy.sharding import is_sharded_strategy

# What the concept callbacks are tested under (2-process DDP and FSDP tests: tests/distributed/).
DATA_PARALLEL = (SingleDeviceStrategy, DDPStrategy)
SHARDED = (FSDPStrategy, ModelParallelStrategy)


class DeclaresStrategies(Protocol):
    """A callback that says which strategies it supports and whether to run under others anyway."""

    supported_strategies: tuple[type[Strategy], ...]
    allow_untested_strategy: bool


def strategy_names(supported: tuple[type[Strategy], ...]) -> str:
    """`"SingleDeviceStrategy, DDPStrategy, ..."`: how messages and docstrings name the tuple."""
    return ", ".join(cls.__name__ for cls in supported)


def check_strategy(trainer: Trainer, callback: DeclaresStrategies) -> None:
    """Refuse a strategy that `callback.supported_strategies` does not list, before any work starts.

    DeepSpeedStrategy subclasses DDPStrategy in Lightning, so it is refused by name on top of the
    type check (unless listed itself): ZeRO shards the weights that hooks and concept bases assume
    are whole. A sharded strategy must also not shard the activations (tensor parallelism).
    `callback.allow_untested_strategy=True` skips the check.
    """
    if callback.allow_untested_strategy:
        return
    owner = type(callback).__name__
    supported = tuple(callback.supported_strategies)
    strategy = trainer.strategy
    name = type(strategy).__name__
    mro = [cls.__name__ for cls in type(strategy).__mro__]
    deepspeed = "DeepSpeedStrategy" in mro and not any(cls.__name__ == "DeepSpeedStrategy" for cls in supported)
    if isinstance(strategy, supported) and not deepspeed:
        problem = _sharded_problem(trainer) if isinstance(strategy, SHARDED) else None
        if problem is None:
            return
        raise ValueError(f"{owner} under {name}: {problem}")
    sharded_ok = any(issubclass(cls, SHARDED) for cls in supported)
    raise ValueError(
        f"{owner} is tested with {strategy_names(supported)} only, not {name} (sharded weights: "
        f"{'DeepSpeed' if sharded_ok else 'FSDP/DeepSpeed'}); use strategy='ddp', or pass "
        "allow_untested_strategy=True to run it anyway"
    )


def _sharded_problem(trainer: Trainer) -> str | None:
    """What makes a supported callback unusable under this sharded strategy, or None."""
    mesh = getattr(trainer.strategy, "_device_mesh", None)
    if mesh is not None and "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        return ("tensor parallelism shards the activations the concept hooks read; use "
                "ModelParallelStrategy(tensor_parallel_size=1) (FSDP2 only)")
    return None


def measures_on_every_rank(trainer: Trainer) -> bool:
    """True when a measuring forward (drift probe, ablation means) must run on every rank, not
    on rank zero alone: with sharded weights each forward is a collective."""
    return is_sharded_strategy(trainer.strategy)


def restores_after_fit_start(trainer: Trainer) -> bool:
    """ModelParallelStrategy and FSDPStrategy load a checkpoint (module and callback states) after
    the on_fit_start hooks; the other strategies before. A callback that prepares state at fit start
    from the model must not take it from the trained weights a late restore brings."""
    return bool(getattr(trainer.strategy, "restore_checkpoint_after_setup", False))


__all__ = ["DATA_PARALLEL", "SHARDED", "check_strategy", "measures_on_every_rank", "restores_after_fit_start",
           "strategy_names"]
