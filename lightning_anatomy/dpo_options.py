"""The construction-time checks of `DPOModule`'s options, run before any model loads.

One place refuses every bad value or combination of the constructor's options (reference mode,
optimizer, loss family, TRL 1.16's refusals, TR-DPO), each with one `ValueError` that names the
option and how to fix it; the checks of each part live beside it (`reference`, `optim`, `losses`,
`reference_sync`), this module calls them in a fixed order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedModel

from lightning_anatomy.losses import validate_loss_options
from lightning_anatomy.optim import check_optimizer_options
from lightning_anatomy.reference import check_reference_options
from lightning_anatomy.reference_sync import validate_sync_options


def check_dpo_options(
    *,
    policy: str | PreTrainedModel,
    reference: str,
    loss_type: str | Sequence[str],
    loss_weights: Sequence[float] | None,
    beta: float,
    label_smoothing: float,
    rpo_alpha: float | None,
    discopop_tau: float,
    ld_alpha: float | None,
    f_divergence_type: str,
    f_alpha_divergence_coef: float,
    use_weighting: bool,
    sync_ref_model: bool,
    ref_model_mixup_alpha: float,
    ref_model_sync_steps: int,
    lr: float,
    warmup_steps: int,
    scheduler: str,
    peft_config: Mapping[str, Any] | None,
    logps_chunk_size: int | None,
) -> None:
    """Refuse a bad `DPOModule` option before any model loads (the arguments are the constructor's).

    Raises:
        ValueError: naming the option, the bad value and how to fix it.
    """
    check_reference_options(reference, peft_config, isinstance(policy, str))
    check_optimizer_options(lr, warmup_steps, scheduler)
    if rpo_alpha is not None and rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0 or None, got {rpo_alpha}")
    if logps_chunk_size is not None and (type(logps_chunk_size) is not int or logps_chunk_size < 1):
        raise ValueError(f"logps_chunk_size must be an integer >= 1 or None (full logits), got {logps_chunk_size!r}")
    if not isinstance(loss_type, (list, tuple)):  # a list is checked with its options below
        validate_loss_options(loss_type, beta, label_smoothing)
    # TRL 1.16's refusals (`losses.validate_loss_options`, TR-DPO's)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if rpo_alpha is not None and "sft" in types:
        raise ValueError(
            f"rpo_alpha={rpo_alpha!r} and 'sft' in loss_type={loss_type!r} both add the chosen NLL: use one, e.g. "
            "loss_type=['sigmoid', 'sft'], loss_weights=[1.0, rpo_alpha] (TRL's form of RPO)"
        )
    validate_loss_options(loss_type, beta, label_smoothing, loss_weights=loss_weights, discopop_tau=discopop_tau,
                          ld_alpha=ld_alpha, f_divergence_type=f_divergence_type,
                          f_alpha_divergence_coef=f_alpha_divergence_coef, use_weighting=bool(use_weighting))
    if ld_alpha is not None and reference == "precomputed":
        raise ValueError(
            "ld_alpha with reference='precomputed' is not supported: the cached reference table is keyed by model "
            "and data only, so a table computed without LD-DPO would be reused; use reference='copy' or 'peft'"
        )
    if sync_ref_model:
        if reference == "peft" or peft_config is not None:
            raise ValueError(
                "sync_ref_model=True (TR-DPO) is not supported with PEFT (as in TRL): the reference is the policy "
                "with its adapters disabled, so there is no separate reference model to update; use "
                "sync_ref_model=False, or full fine-tuning with reference='copy'"
            )
        if reference == "precomputed":
            raise ValueError(
                "sync_ref_model=True (TR-DPO) cannot be combined with reference='precomputed' (as in TRL): the "
                "reference changes during training, so precomputed log-probs would go stale; use reference='copy'"
            )
        validate_sync_options(ref_model_mixup_alpha, ref_model_sync_steps)


__all__ = ["check_dpo_options"]
