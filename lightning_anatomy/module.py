"""`DPOModule`: direct preference optimisation as a LightningModule (the step, metrics, optimizer).

Chosen and rejected share one forward (`[chosen; rejected]`, see docs/ARCHITECTURE.md), so hooks
installed by concept callbacks see both halves of a batch in one pass. Metrics follow TRL's
DPOTrainer names (`lightning_anatomy.metrics`). Around it: the option checks (`dpo_options`), the
policy (`policy`), the reference per mode (`reference`) and the module's members that expose and
drive it (`reference_hooks.ReferenceHooks`), FSDP sharding (`sharding.shard_dpo_module`), AdamW
(`optim`), log-probs from chunks of completion positions (`logprobs`). Callbacks use only the `PreferenceModule`
surface (`lightning_anatomy.preference_module`) and the keys of `data.batch.PreferenceBatch`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from lightning_anatomy.data.batch import PreferenceBatch
from lightning_anatomy.dpo_options import check_dpo_options
from lightning_anatomy.logprobs import DEFAULT_CHUNK_SIZE, pair_logps, sequence_logps
from lightning_anatomy.losses import TRL_F_ALPHA_DIVERGENCE_COEF, preference_loss
from lightning_anatomy.metrics import (
    METRIC_NAMES,
    PreferenceMetrics,
    TokenCount,
    step_statistics,
    token_weights,
)
from lightning_anatomy.optim import adamw, lr_lambda
from lightning_anatomy.policy import build_policy, check_max_length, save_policy
from lightning_anatomy.reference import REFERENCE_MODES, CopyReference, ReferenceModel, make_reference
from lightning_anatomy.reference_hooks import ReferenceHooks
from lightning_anatomy.sharding import shard_dpo_module

CHECKPOINT_KEY = "lightning_anatomy"


class DPOModule(ReferenceHooks, L.LightningModule):
    """Train a causal LM on preference pairs with any loss of `lightning_anatomy.losses`.

    Args:
        policy: a Hugging Face causal LM object, a model id, a local directory, `"embedded"`
            or `"tiny:<family>"`.
        reference: `"copy"` (a frozen copy of the initial policy), `"precomputed"` (reference
            log-probs computed once before training from the initial policy and cached on disk
            under a fingerprint of model + tokenized data; no second model in memory) or `"peft"`
            (the policy's base model with LoRA adapters disabled).
        loss_type: the preference loss (`lightning_anatomy.losses.LOSS_TYPES`, TRL 1.16's 15: sigmoid,
            hinge, ipo, ...), or a list of them summed with `loss_weights` (TRL's mixtures, e.g. MPO:
            `["sigmoid", "bco_pair", "sft"]` with `[0.8, 0.2, 1.0]`).
        loss_weights: one weight per entry of `loss_type`; None weighs each 1.0 (TRL's default).
        beta: the DPO temperature β.
        label_smoothing: label-flip probability ε (cDPO for sigmoid / aot*, robust, exo_pair).
        discopop_tau: DiscoPOP's τ.
        ld_alpha: LD-DPO's α: the policy's and the reference's log-probs of the longer response's tokens
            beyond the pair's shared length weigh α; None is plain DPO (TRL's name and default).
        f_divergence_type: the f-divergence regulariser of f-DPO (`"reverse_kl"`, standard DPO;
            `"forward_kl"`, `"js_divergence"`, `"alpha_divergence"`), as TRL.
        f_alpha_divergence_coef: α of `alpha_divergence` (TRL's default 0.5).
        use_weighting: WPO: weigh each pair by its chosen and rejected completions' length-normalised
            probability under the policy (detached), as TRL.
        sync_ref_model: TR-DPO: every `ref_model_sync_steps` optimizer steps the copy reference becomes
            `ref_model_mixup_alpha`·policy + (1 − α)·reference (`reference_sync.SyncReference`, added by
            `configure_callbacks`; its checkpoints carry the mixed reference). Needs reference='copy'.
        ref_model_mixup_alpha: TR-DPO's α (TRL default 0.6).
        ref_model_sync_steps: TR-DPO's τ (TRL default 512).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        adam_eps: AdamW epsilon.
        warmup_steps: linear warm-up steps of the learning rate.
        gradient_checkpointing: recompute activations in backward (the model's own checkpointing).
        reference_cache_dir: where `reference="precomputed"` caches its log-probs.
        dtype: load dtype of a model given by spec (float32, bfloat16, float16; None: the checkpoint's).
        peft_config: LoRA settings (a dict for `peft.LoraConfig`); wraps the policy.
        rpo_alpha: weight of an NLL term on the chosen completions (RPO); None disables it.
        scheduler: `"cosine"`, `"linear"` or `"constant"` decay after `warmup_steps`.
        logps_chunk_size: completion positions per LM-head chunk (peak memory holds one chunk's
            logits, fp32); None scores from the model's full logits (the path before chunking,
            for architectures whose logits `lightning_anatomy.logprobs` cannot reproduce).
    """

    def __init__(
        self,
        policy: str | PreTrainedModel = "tiny:gpt2",
        *,
        reference: str = "copy",
        loss_type: str | list[str] = "sigmoid",
        loss_weights: list[float] | None = None,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        rpo_alpha: float | None = None,
        discopop_tau: float = 0.05,
        ld_alpha: float | None = None,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = TRL_F_ALPHA_DIVERGENCE_COEF,
        use_weighting: bool = False,
        sync_ref_model: bool = False,
        ref_model_mixup_alpha: float = 0.6,
        ref_model_sync_steps: int = 512,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        warmup_steps: int = 0,
        scheduler: str = "cosine",
        gradient_checkpointing: bool = False,
        peft_config: dict[str, Any] | None = None,
        reference_cache_dir: str | None = ".anatomy_cache/reference",
        dtype: str | None = None,
        logps_chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        check_dpo_options(
            policy=policy, reference=reference, loss_type=loss_type, loss_weights=loss_weights, beta=beta,
            label_smoothing=label_smoothing, rpo_alpha=rpo_alpha, discopop_tau=discopop_tau,
            ld_alpha=ld_alpha, f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef, use_weighting=use_weighting,
            sync_ref_model=sync_ref_model, ref_model_mixup_alpha=ref_model_mixup_alpha,
            ref_model_sync_steps=ref_model_sync_steps, lr=lr, warmup_steps=warmup_steps, scheduler=scheduler,
            peft_config=peft_config, logps_chunk_size=logps_chunk_size,
        )
        self.save_hyperparameters(ignore=["policy"] if not isinstance(policy, str) else None)
        self.policy = build_policy(policy, dtype=dtype, peft_config=peft_config,
                                   gradient_checkpointing=gradient_checkpointing, needs_adapters=reference == "peft")
        # The copy reference is a submodule (it moves with the module); the strategy reads it here.
        self.reference: nn.Module | None = CopyReference.build(self.policy) if reference == "copy" else None
        self._reference: ReferenceModel = make_reference(reference, self, cache_dir=reference_cache_dir)
        self._auxiliary_losses: dict[str, Callable[[], Tensor | None]] = {}
        self.train_metrics = PreferenceMetrics()
        self._tokens = TokenCount()  # TRL's num_tokens
        self.val_metrics = PreferenceMetrics()

    def concatenated_forward(self, model: nn.Module, batch: PreferenceBatch, *, with_stats: bool = False
                             ) -> dict[str, Tensor]:
        """One forward over `[chosen; rejected]`: per-pair log-probs (+ logit means and NLL for the policy),
        see `logprobs.pair_logps`."""
        return pair_logps(model, batch, chunk_size=self.hparams.get("logps_chunk_size", DEFAULT_CHUNK_SIZE),
                          with_stats=with_stats, with_nll=self.hparams.rpo_alpha is not None,
                          ld_alpha=self.hparams.get("ld_alpha"), with_token_stats=with_stats)

    # ------------------------------------------------------------------ steps
    def register_auxiliary_loss(self, name: str, term: Callable[[], Tensor | None]) -> None:
        """Add `term()` to the loss of every training micro-batch (e.g. `ConceptBlocking`'s penalty).

        `term` is called once per training step, after the policy and the reference forwards,
        so it can combine what forward hooks captured in both; it returns a scalar (added as it
        is, in the same graph as the DPO loss, so AMP scaling, accumulation and DDP treat it like
        the loss) or None. Remove it with `remove_auxiliary_loss(name)`.
        """
        if name in self._auxiliary_losses:
            raise ValueError(f"an auxiliary loss named {name!r} is already registered; remove it first")
        self._auxiliary_losses[name] = term

    def remove_auxiliary_loss(self, name: str) -> None:
        """Remove the auxiliary loss `name` (no error when there is none)."""
        self._auxiliary_losses.pop(name, None)

    @property
    def auxiliary_loss_names(self) -> tuple[str, ...]:
        """The names of the auxiliary losses registered now."""
        return tuple(self._auxiliary_losses)

    def compute_loss(self, batch: PreferenceBatch, *, training: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of `batch` and its TRL-named statistics (`METRIC_NAMES`, detached).

        The policy forward runs first, then the reference's (hooks that compare the two see
        them in that order). `training=True` adds the registered auxiliary losses.
        """
        hp = self.hparams
        pol = self.concatenated_forward(self.policy, batch, with_stats=True)
        ref_c, ref_r = self.reference_logps(batch)
        out = preference_loss(
            pol["chosen_logps"], pol["rejected_logps"], ref_c, ref_r,
            loss_type=hp.loss_type, loss_weights=hp.get("loss_weights"), beta=hp.beta,
            label_smoothing=hp.label_smoothing, chosen_lengths=pol["chosen_lengths"],
            rejected_lengths=pol["rejected_lengths"], margin_offset=batch.get("margin_offset"),
            discopop_tau=hp.discopop_tau, f_divergence_type=hp.get("f_divergence_type", "reverse_kl"),
            f_alpha_divergence_coef=hp.get("f_alpha_divergence_coef", TRL_F_ALPHA_DIVERGENCE_COEF),
            wpo_weights=pol["wpo_weights"] if hp.get("use_weighting") else None,
            sft_chosen_logps=pol.get("chosen_logps_raw"),
        )
        weights = batch.get("weights")
        losses = out.losses if weights is None else out.losses * weights.to(out.losses.dtype)
        loss = losses.mean()
        if hp.rpo_alpha is not None:
            loss = loss + hp.rpo_alpha * pol["nll"]
        if training:
            for term in list(self._auxiliary_losses.values()):
                value = term()
                if value is not None:
                    loss = loss + value
        return loss, step_statistics(loss, out, pol)

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        loss, stats = self.compute_loss(batch, training=True)
        n = batch["row_ids"].numel()
        self.train_metrics.update(stats, n, weights=token_weights(batch))
        self._tokens.add(batch)
        self.log("train_loss", loss.detach(), prog_bar=True, logger=False, batch_size=n)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Once per optimizer step, after every micro-batch of the step has been accumulated.
        self._log_metrics("train", self.train_metrics)

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self.val_metrics.update(self.compute_loss(batch)[1], batch["row_ids"].numel(), weights=token_weights(batch))

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def _log_metrics(self, prefix: str, metrics: PreferenceMetrics) -> None:
        values = metrics.compute_and_reset(prefix)
        if values is not None and prefix == "train":  # TRL's num_tokens: every rank's, cumulative
            reduce = None if self._trainer is None else partial(self.trainer.strategy.reduce, reduce_op="sum")
            values["train/num_tokens"] = torch.tensor(float(self._tokens.step(self.device, reduce)))
        if values is not None:  # train: per optimizer step; val: per epoch
            self.log_dict(values, on_step=prefix == "train", on_epoch=prefix == "val", sync_dist=False,
                          rank_zero_only=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (fused where torch supports it), no decay on 1-d parameters, warm-up then the
        chosen decay per optimizer step (`lightning_anatomy.optim`)."""
        hp = self.hparams
        optimizer = adamw(self.policy.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, betas=hp.betas,
                          eps=hp.adam_eps)
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(hp.scheduler, hp.warmup_steps, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints hold the policy, not the frozen reference (which would double their size).

        The reference is the initial policy: rebuilt by the constructor on resume (copy mode, its
        digest is checked), the base weights inside the policy (peft), or the table of reference
        log-probs, which is stored here (precomputed: recomputing it on resume would take the
        *trained* weights as the reference).
        """
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("reference.")]:
            del state[key]
        checkpoint[CHECKPOINT_KEY] = {"reference": self.hparams.reference, **self._reference.state_dict(),
                                      "num_tokens": self._tokens.total}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra, state = checkpoint.get(CHECKPOINT_KEY, {}), checkpoint.get("state_dict")
        self._tokens.total = int(extra.get("num_tokens", 0))
        self._reference.load_state_dict(extra, self._trainer, weights=state)

    def setup(self, stage: str) -> None:
        """Refuse sequences longer than the model's positions before any step (`policy.check_max_length`)."""
        check_max_length(self.policy, getattr(self.trainer, "datamodule", None) if self._trainer is not None else None)

    def configure_model(self) -> None:
        """Shard the policy and a copy reference for the Trainer's strategy (`sharding.shard_dpo_module`)."""
        if self._trainer is not None:
            shard_dpo_module(self, self.trainer)

    def save_pretrained(self, path: str | os.PathLike, merge_adapters: bool = True, *, tokenizer: Any = None
                        ) -> Path:
        """Write the policy as a Hugging Face model folder (`policy.save_policy`): a PEFT policy
        merged (`merge_adapters=True`) or adapter-only; the tokenizer (given, else the
        datamodule's) beside it. The folder appears complete or not at all."""
        if tokenizer is None and self._trainer is not None:
            tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        return save_policy(self.policy, Path(path), merge_adapters=merge_adapters, tokenizer=tokenizer)


__all__ = ["CHECKPOINT_KEY", "DPOModule", "METRIC_NAMES", "REFERENCE_MODES", "sequence_logps"]
