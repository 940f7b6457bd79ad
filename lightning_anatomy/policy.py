"""The trained model of `DPOModule`: built from a spec (with LoRA and gradient checkpointing),
and written back as a Hugging Face model folder."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from lightning_anatomy.files import atomic_directory
from lightning_anatomy.model_access import unwrap_model
from lightning_anatomy.models.loading import load_model, max_positions
from lightning_anatomy.sharding import is_sharded_module


def build_policy(policy: str | PreTrainedModel, *, dtype: str | None, peft_config: dict[str, Any] | None,
                 gradient_checkpointing: bool, needs_adapters: bool) -> nn.Module:
    """The policy in train mode: loaded from `policy` (a spec or a model object), wrapped in LoRA
    adapters when `peft_config` is given, with the model's own gradient checkpointing when asked.

    Raises:
        ValueError: `needs_adapters` (reference='peft') and the policy is no PEFT model.
    """
    model = load_model(policy, dtype=dtype)
    if peft_config is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**peft_config))
    if needs_adapters and not hasattr(model, "disable_adapter"):
        raise ValueError(
            "reference='peft' needs a PEFT policy: pass a peft.PeftModel or peft_config={...}, "
            "or use reference='copy' / 'precomputed'"
        )
    # HF models load in eval mode and Lightning keeps submodule modes as they are: without
    # this, dropout and gradient checkpointing would silently stay off while training.
    model = model.train()
    if gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if peft_config is not None:
            model.enable_input_require_grads()
    return model


def check_max_length(policy: nn.Module, datamodule: Any) -> None:
    """Refuse a datamodule `max_length` longer than the model's positions before any step (such
    sequences would crash mid-training with an IndexError, or silently wrap for some position schemes)."""
    limit = max_positions(policy)
    asked = getattr(datamodule, "max_length", None)
    if limit is not None and isinstance(asked, int) and asked > limit:
        raise ValueError(
            f"max_length={asked} is longer than the model's {limit} positions "
            f"({type(unwrap_model(policy)).__name__}); set max_length <= {limit} on the data module"
        )


def save_policy(model: nn.Module, path: Path, *, merge_adapters: bool, tokenizer: Any = None) -> Path:
    """Write `model` as a Hugging Face model folder (`AutoModelForCausalLM.from_pretrained`).

    A PEFT policy is merged into its base weights (`merge_adapters=True`, a plain model) or
    saved adapter-only (`peft.AutoPeftModelForCausalLM.from_pretrained`). The tokenizer, when
    given, is saved beside it. The folder appears complete or not at all.

    Raises:
        ValueError: the weights are sharded (FSDP): callers (the CLI) save from rank 0 alone, where
            a gather would hang.
    """
    if is_sharded_module(model):
        raise ValueError(
            "save_pretrained needs the policy's full weights, but they are sharded (FSDP); save a full "
            "checkpoint (ModelParallelStrategy(save_distributed_checkpoint=False) or FSDPStrategy("
            "state_dict_type='full')), load it into an unsharded DPOModule and call save_pretrained there"
        )
    if hasattr(model, "merge_and_unload") and merge_adapters:
        model = copy.deepcopy(model).merge_and_unload()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_directory(Path(path), write)


__all__ = ["build_policy", "check_max_length", "save_policy"]
