"""Sharded weights (FSDP): which strategies shard, how DPOModule shards, and what must gather.

Under FSDP a parameter outside its unit's forward holds only this rank's shard (a `DTensor` for
FSDP2, a flat view for FSDP1), and every forward through a sharded unit is a collective. Two
rules follow for the package: code that reads weights (digests, the logit lens) gathers them on
every rank or refuses, and a forward that measures the model (drift probes, ablation means, the
precomputed reference) runs on every rank, not on rank zero alone. Activations and gradients at
hook points are never sharded, so the concept hooks need nothing else.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_anatomy.model_access import find_blocks

_FSDP1_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def is_sharded_strategy(strategy: Any) -> bool:
    """True for Lightning strategies that shard weights: FSDP1, FSDP2 (`ModelParallelStrategy`), DeepSpeed."""
    names = {cls.__name__ for cls in type(strategy).__mro__}
    return bool(names & {"FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy"})


def is_sharded_tensor(t: Tensor) -> bool:
    """An FSDP2 `DTensor` (FSDP1 shards are plain tensors; see `has_fsdp1_units`)."""
    return type(t).__name__ == "DTensor" or any(c.__name__ == "DTensor" for c in type(t).__mro__)


def has_fsdp1_units(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def is_sharded_module(module: nn.Module) -> bool:
    """True when any weight of `module` is sharded (FSDP2 DTensors or FSDP1 units)."""
    return any(is_sharded_tensor(p) for p in module.parameters()) or has_fsdp1_units(module)


def clean_name(name: str) -> str:
    """A parameter name without FSDP1 / activation-checkpoint wrapper prefixes."""
    for prefix in _FSDP1_PREFIXES:
        name = name.replace(prefix, "")
    return name


def decoder_block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The decoder block classes of `model`, for `FSDPStrategy(auto_wrap_policy=...)`.

    FSDP1 must wrap the blocks and leave the embeddings, final norm and LM head in the root unit:
    the chunked log-probs call the head after the model's forward, when only the root's
    parameters are still gathered.
    """
    _, blocks = find_blocks(model)
    return {type(block) for block in blocks}


def fsdp2_data_mesh(strategy: Any, owner: str) -> Any | None:
    """The data-parallel mesh to `fully_shard` over under `ModelParallelStrategy` (None under any
    other strategy). Only FSDP2 is applied, so a tensor-parallel mesh is refused, naming the fix."""
    if "ModelParallelStrategy" not in {c.__name__ for c in type(strategy).__mro__}:
        return None
    mesh = strategy.device_mesh
    if mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            f"{owner} shards with FSDP2 over the data-parallel mesh and applies no tensor parallelism, but the "
            f"strategy has tensor_parallel_size={mesh['tensor_parallel'].size()}; use "
            f"ModelParallelStrategy(data_parallel_size={mesh.size()}, tensor_parallel_size=1)"
        )
    return mesh["data_parallel"]


def shard_fsdp2(model: nn.Module, mesh: Any, **kwargs: Any) -> nn.Module:
    """`fully_shard` each decoder block, then the root (embeddings, final norm, LM head, PEFT wrapper).

    The root's parameters stay gathered between its forward and backward (FSDP2's default for a
    root), which is what lets the LM head run over completion chunks after the forward.
    """
    from torch.distributed.fsdp import fully_shard

    _, blocks = find_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def shard_dpo_module(module: nn.Module, trainer: Any) -> None:
    """Shard `module.policy` and `module.reference` (a copy reference, or None) for the Trainer's strategy.

    `ModelParallelStrategy` (FSDP2): `fully_shard` on every decoder block and on the root, for
    the policy (a PEFT policy's reference is that same sharded model) and the copy reference,
    over the data-parallel mesh (no tensor parallelism: `tensor_parallel_size=1`).
    `FSDPStrategy` (FSDP1): Lightning wraps the module itself (pass
    `auto_wrap_policy=decoder_block_classes(policy)`); the copy reference is wrapped here as
    its own FSDP unit with the strategy's settings. Either way a sharded reference is taken
    out of the module tree (`keep_outside_module_tree`): checkpoints hold no reference weights,
    so a strict load of a sharded or full checkpoint must not expect any. Other strategies:
    nothing to do.
    """
    strategy = trainer.strategy
    kind = {c.__name__ for c in type(strategy).__mro__}
    mesh = fsdp2_data_mesh(strategy, "DPOModule")
    reference = module.reference
    if mesh is not None:
        if not is_fsdp2_module(module.policy):
            shard_fsdp2(module.policy, mesh)
        if reference is not None and not is_fsdp2_module(reference):
            reference = trainer.precision_plugin.convert_module(reference)
            keep_outside_module_tree(module, "reference", shard_fsdp2(reference, mesh))
    elif "FSDPStrategy" in kind and reference is not None and not has_fsdp1_units(reference):
        from torch.distributed.fsdp import FullyShardedDataParallel

        reference = trainer.precision_plugin.convert_module(reference)
        wrapped = FullyShardedDataParallel(
            reference, cpu_offload=strategy.cpu_offload, mixed_precision=strategy.mixed_precision_config,
            sharding_strategy=strategy.sharding_strategy, device_id=strategy.root_device.index,
            **strategy.kwargs,
        )
        keep_outside_module_tree(module, "reference", wrapped)


def keep_outside_module_tree(owner: nn.Module, name: str, child: nn.Module) -> None:
    """`owner.<name>` becomes `child`, an attribute but no longer a submodule (state_dict, parameters, `.to`)."""
    owner._modules.pop(name, None)
    owner.__dict__[name] = child


def rank_batches(n_batches: int, rank: int, world: int) -> list[int | None]:
    """The batch indices this rank measures when the work is split over sharded ranks: `rank`,
    `rank + world`, ..., then `None` (a dummy forward whose result is dropped) up to
    ceil(n_batches / world), because under FSDP every forward is a collective that every rank must
    join the same number of times."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} processes")
    mine: list[int | None] = list(range(rank, n_batches, world))
    return mine + [None] * (-(-n_batches // world) - len(mine))


def unsharded_class_name(module: nn.Module) -> str:
    """The model's class name as before `fully_shard`, which swaps the class for an `FSDP<name>`
    subclass: digests and fingerprints must not change with sharding."""
    cls = type(module)
    if is_fsdp2_module(module):
        cls = next((c for c in cls.__mro__[1:] if not c.__name__.startswith("FSDP")), cls)
    return cls.__name__


def is_fsdp2_module(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


__all__ = ["clean_name", "decoder_block_classes", "has_fsdp1_units", "is_fsdp2_module", "is_sharded_module",
           "is_sharded_strategy", "is_sharded_tensor", "keep_outside_module_tree", "rank_batches", "shard_dpo_module",
           "shard_fsdp2", "unsharded_class_name"]
