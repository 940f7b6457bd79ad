"""TR-DPO (Gorbatovski et al. 2024): the reference follows the policy, as TRL's `SyncRefModelCallback`.

Every `ref_model_sync_steps` (τ) optimizer steps, π_ref ← α·π_θ + (1 − α)·π_ref with
α = `ref_model_mixup_alpha`, parameter by parameter (buffers stay), after the optimizer step — the
same rule and schedule as TRL 1.16 (`on_step_end` at `global_step % τ == 0`).

`DPOModule(sync_ref_model=True)` adds this callback itself (`configure_callbacks`), so the
reference strategies stay as they are: the callback mixes into `module.reference` (a copy
reference) in place, and carries the mixed weights in its own checkpoint state, which it writes
back on resume over the initial copy the module rebuilt, so a resumed run continues from exactly
the reference the interrupted one had.

Supported: one device and DDP (every rank mixes identical replicas, tested on CPU). Under FSDP2
both models are sharded alike and each rank mixes its own shards; the checkpointed state then holds
each parameter's full tensor (gathered), so it is meant for models that fit in one host's memory
(not yet tested on GPUs). FSDP1 (`FSDPStrategy`) is refused at setup.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn


@torch.no_grad()
def mix_into_reference(policy: nn.Module, reference: nn.Module, alpha: float) -> None:
    """π_ref ← α·π_θ + (1 − α)·π_ref over the parameters (TRL's `_sync_target_model`).

    Args:
        policy: the trained model.
        reference: its reference copy (same architecture and parameter names), changed in place.
        alpha: the weight of the policy.

    Raises:
        ValueError: the two models' parameters do not correspond one to one.
    """
    ref_params = dict(reference.named_parameters())
    pol_params = dict(policy.named_parameters())
    if ref_params.keys() != pol_params.keys():
        missing = sorted(ref_params.keys() ^ pol_params.keys())[:5]
        raise ValueError(
            f"the reference and the policy have different parameters (e.g. {missing}); TR-DPO needs "
            "reference='copy' (a copy of the policy)"
        )
    for name, ref in ref_params.items():
        pol = pol_params[name]
        if ref.shape != pol.shape:
            raise ValueError(
                f"parameter {name!r}: reference shape {tuple(ref.shape)} != policy {tuple(pol.shape)}"
            )
        ref.mul_(1.0 - alpha).add_(pol.detach().to(ref.dtype), alpha=alpha)


def _full(tensor: Tensor) -> Tensor:
    """A CPU copy of the whole tensor (a DTensor is gathered first)."""
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return full.detach().to("cpu", copy=True)


class SyncReference(L.Callback):
    """Mix the policy into the reference every `ref_model_sync_steps` optimizer steps (TR-DPO).

    Args:
        ref_model_mixup_alpha: α, the policy's share of the new reference (TRL default 0.6).
        ref_model_sync_steps: τ, optimizer steps between mixes (TRL default 512).

    Raises:
        ValueError: α outside [0, 1] or τ < 1 (at construction); a module without a copy reference
            (at setup).

    Example::

        module = DPOModule("tiny:gpt2", sync_ref_model=True, ref_model_sync_steps=64)  # adds the callback
    """

    def __init__(self, ref_model_mixup_alpha: float = 0.6, ref_model_sync_steps: int = 512) -> None:
        validate_sync_options(ref_model_mixup_alpha, ref_model_sync_steps)
        self.alpha = float(ref_model_mixup_alpha)
        self.sync_steps = int(ref_model_sync_steps)
        self.synced_step = 0  # the optimizer step of the last mix (0: none yet)
        self.syncs = 0
        self._module: L.LightningModule | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            ref_model_mixup_alpha=self.alpha, ref_model_sync_steps=self.sync_steps
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        reference = getattr(pl_module, "reference", None)
        if not isinstance(reference, nn.Module) or not isinstance(
            getattr(pl_module, "policy", None), nn.Module
        ):
            raise ValueError(
                "sync_ref_model / SyncReference needs a module with a separate reference model (DPOModule with "
                "reference='copy'); with reference='peft' or 'precomputed' there is no reference model to update"
            )
        if type(trainer.strategy).__name__ == "FSDPStrategy":
            raise ValueError(
                "sync_ref_model / SyncReference does not support FSDPStrategy (FSDP1): its flat parameters of the "
                "policy and the separately wrapped reference do not correspond one to one; use DDP or "
                "ModelParallelStrategy (FSDP2)"
            )
        self._module = pl_module

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # once per optimizer step (not per accumulated micro-batch): the step counter must have moved
        if step == 0 or step == self.synced_step or step % self.sync_steps:
            return
        mix_into_reference(pl_module.policy, pl_module.reference, self.alpha)
        self.synced_step = step
        self.syncs += 1

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"synced_step": self.synced_step, "syncs": self.syncs}
        if self.syncs and self._module is not None:
            state["reference"] = {name: _full(p) for name, p in self._module.reference.named_parameters()}
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.synced_step = int(state_dict["synced_step"])
        self.syncs = int(state_dict["syncs"])
        weights = state_dict.get("reference")
        if weights is None:
            return
        if self._module is None:
            raise RuntimeError(
                "SyncReference state was loaded before setup: resume through Trainer.fit(ckpt_path=...)"
            )
        params = dict(self._module.reference.named_parameters())
        if params.keys() != weights.keys():
            raise ValueError(
                "the checkpoint's synced reference does not match this model's parameters; resume with the same "
                "policy the checkpoint was trained from"
            )
        for name, param in params.items():
            value = weights[name]
            if callable(getattr(param, "to_local", None)):  # an FSDP2 shard: keep this rank's part
                from torch.distributed.tensor import distribute_tensor

                shard = distribute_tensor(
                    value.to(param.device, param.dtype), param.device_mesh, param.placements
                )
                param.to_local().copy_(shard.to_local())
            else:
                param.copy_(value.to(param.device, param.dtype))


def validate_sync_options(ref_model_mixup_alpha: float, ref_model_sync_steps: int) -> None:
    """TR-DPO's α in [0, 1] and τ ≥ 1 (an integer), before any model loads.

    Raises:
        ValueError: naming the bad value.
    """
    alpha = ref_model_mixup_alpha
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or not 0 <= alpha <= 1
    ):
        raise ValueError(
            f"ref_model_mixup_alpha must lie in [0, 1], got {alpha!r}: it is the policy's share of the new reference "
            "(TR-DPO; TRL's default 0.6)"
        )
    steps = ref_model_sync_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(
            f"ref_model_sync_steps must be an integer >= 1, got {steps!r}: optimizer steps between reference "
            "updates (TR-DPO's τ; TRL's default 512)"
        )


__all__ = ["SyncReference", "mix_into_reference", "validate_sync_options"]
