"""`DPOModule`: direct preference optimisation as a LightningModule.

Chosen and rejected share one forward (`[chosen; rejected]`, see docs/ARCHITECTURE.md), so hooks
installed by concept callbacks see both halves of a batch in one pass. Metrics follow TRL's
DPOTrainer names so dashboards carry over; they are accumulated with torchmetrics over the
micro-batches of an optimizer step, which keeps them right under gradient accumulation and DDP.

Log-probs come from the LM head run over chunks of completion positions only
(`lightning_anatomy.logprobs`), never from the full `[2B, T, V]` logits. Under
`ModelParallelStrategy` (FSDP2) `configure_model` shards the policy and a copy reference; under
`FSDPStrategy` (FSDP1) Lightning wraps the policy and the copy reference is wrapped on its own
(see `configure_model`).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from lightning_anatomy.data import TokenizedPair, collate_pairs
from lightning_anatomy.digests import combined_digest, full_model_digest, model_digest, pairs_digest
from lightning_anatomy.files import atomic_directory, atomic_write_file
from lightning_anatomy.logprobs import DEFAULT_CHUNK_SIZE, completion_logps, masked_logit_mean, sequence_logps
from lightning_anatomy.losses import preference_loss, validate_loss_options
from lightning_anatomy.model_access import reference_pass, unwrap_model
from lightning_anatomy.models.loading import load_model, max_positions
from lightning_anatomy.sharding import (
    fsdp2_data_mesh,
    has_fsdp1_units,
    is_fsdp2_module,
    is_sharded_module,
    is_sharded_strategy,
    shard_fsdp2,
)

REFERENCE_MODES = ("copy", "precomputed", "peft")
CHECKPOINT_KEY = "lightning_anatomy"
SCHEDULERS = ("cosine", "linear", "constant")
METRIC_NAMES = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
)


class DPOModule(L.LightningModule):
    """Train a causal LM on preference pairs with any loss of `lightning_anatomy.losses`.

    Args:
        policy: a Hugging Face causal LM object, a model id, a local directory, `"embedded"`
            or `"tiny:<family>"`.
        reference: `"copy"` (a frozen copy of the initial policy), `"precomputed"` (reference
            log-probs computed once before training from the initial policy and cached on disk
            under a fingerprint of model + tokenized data; no second model in memory) or `"peft"`
            (the policy's base model with LoRA adapters disabled).
        loss_type: the preference loss (`lightning_anatomy.losses.LOSS_TYPES`: sigmoid, hinge, ipo, ...).
        beta: the DPO temperature β.
        label_smoothing: cDPO label smoothing (sigmoid, robust, exo_pair).
        discopop_tau: DiscoPOP's τ.
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
        loss_type: str = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        rpo_alpha: float | None = None,
        discopop_tau: float = 0.05,
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
        self._validate(reference, loss_type, beta, label_smoothing, rpo_alpha, lr, warmup_steps, scheduler,
                       peft_config, policy, logps_chunk_size)
        self.save_hyperparameters(ignore=["policy"] if not isinstance(policy, str) else None)
        model = load_model(policy, dtype=dtype)
        if peft_config is not None:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(**peft_config))
        if reference == "peft" and not hasattr(model, "disable_adapter"):
            raise ValueError(
                "reference='peft' needs a PEFT policy: pass a peft.PeftModel or peft_config={...}, "
                "or use reference='copy' / 'precomputed'"
            )
        # HF models load in eval mode and Lightning keeps submodule modes as they are: without
        # this, dropout and gradient checkpointing would silently stay off while training.
        self.policy = model.train()
        if gradient_checkpointing:
            self.policy.config.use_cache = False
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if peft_config is not None:
                self.policy.enable_input_require_grads()
        self.reference: nn.Module | None = None
        self._reference_digest: str | None = None
        if reference == "copy":
            self.reference = copy.deepcopy(model).eval()
            self.reference.requires_grad_(False)
            # Frozen: its digest never changes, and read now it needs no gather once sharded.
            self._reference_digest = model_digest(self.reference)
        self._ref_cache: dict[int, tuple[float, float]] = {}
        self._auxiliary_losses: dict[str, Callable[[], Tensor | None]] = {}
        self._ref_from_checkpoint = False
        self._ref_pending = False  # fit started without a table: compute it before the first batch
        self.train_metrics = nn.ModuleDict({_key(n): MeanMetric() for n in METRIC_NAMES})
        self.val_metrics = nn.ModuleDict({_key(n): MeanMetric() for n in METRIC_NAMES})

    # ------------------------------------------------------------------ validation of options
    @staticmethod
    def _validate(reference, loss_type, beta, label_smoothing, rpo_alpha, lr, warmup_steps, scheduler,
                  peft_config, policy, logps_chunk_size) -> None:
        if reference not in REFERENCE_MODES:
            raise ValueError(f"reference={reference!r} is not one of {REFERENCE_MODES}")
        if reference == "peft" and peft_config is None and isinstance(policy, str):
            raise ValueError("reference='peft' needs peft_config={...} (LoRA settings) or a PEFT model object as policy")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={scheduler!r} is not one of {SCHEDULERS}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if rpo_alpha is not None and rpo_alpha < 0:
            raise ValueError(f"rpo_alpha must be >= 0 or None, got {rpo_alpha}")
        if logps_chunk_size is not None and (isinstance(logps_chunk_size, bool) or not isinstance(logps_chunk_size, int)
                                             or logps_chunk_size < 1):
            raise ValueError(f"logps_chunk_size must be an integer >= 1 or None (full logits), got {logps_chunk_size!r}")
        validate_loss_options(loss_type, beta, label_smoothing)

    # ------------------------------------------------------------------ forward passes
    def concatenated_forward(self, model: nn.Module, batch: dict[str, Tensor], *, with_stats: bool = False
                             ) -> dict[str, Tensor]:
        """One forward over `[chosen; rejected]`: per-pair log-probs (+ logit means and NLL for the policy)."""
        ids, mask = batch["input_ids"], batch["completion_mask"]
        n = ids.shape[0] // 2
        chunk = self.hparams.get("logps_chunk_size", DEFAULT_CHUNK_SIZE)
        if chunk is None:  # the full-logits path
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits
            logps, lengths = sequence_logps(logits, ids, mask)
            if with_stats:
                means = masked_logit_mean(logits[:n], mask[:n]), masked_logit_mean(logits[n:], mask[n:])
        else:
            out = completion_logps(model, ids, batch["attention_mask"], mask, chunk_size=chunk, logit_sums=with_stats)
            logps, lengths = out.logps, out.lengths
            if with_stats:
                means = out.logit_mean(slice(None, n)), out.logit_mean(slice(n, None))
        result = {
            "chosen_logps": logps[:n], "rejected_logps": logps[n:],
            "chosen_lengths": lengths[:n], "rejected_lengths": lengths[n:],
        }
        if with_stats:
            result["chosen_logits"], result["rejected_logits"] = means
            if self.hparams.rpo_alpha is not None:
                result["nll"] = -logps[:n].sum() / lengths[:n].sum().clamp_min(1)
        return result

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        mode = self.hparams.reference
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if mode == "precomputed":
            ids = batch["row_ids"].tolist()
            missing = [i for i in ids if i not in self._ref_cache]
            if missing:
                raise RuntimeError(
                    f"no precomputed reference log-probs for row ids {missing[:10]}: reference='precomputed' "
                    "computes them at fit start from the datamodule's train_pairs/val_pairs; for other rows call "
                    "DPOModule.precompute_reference(pairs) first"
                )
            vals = torch.tensor([self._ref_cache[i] for i in ids], dtype=torch.float32, device=self.device)
            return vals[:, 0], vals[:, 1]
        if mode == "peft":
            with self.policy.disable_adapter(), reference_pass():
                ref = self.concatenated_forward(self.policy, batch)
        else:
            with reference_pass():  # a separate model, but the same rule: no edit acts on it
                ref = self.concatenated_forward(self.reference, batch)
        return ref["chosen_logps"], ref["rejected_logps"]

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
        self._auxiliary_losses.pop(name, None)

    def _step(self, batch: dict[str, Tensor], *, training: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        hp = self.hparams
        pol = self.concatenated_forward(self.policy, batch, with_stats=True)
        ref_c, ref_r = self.reference_logps(batch)
        out = preference_loss(
            pol["chosen_logps"], pol["rejected_logps"], ref_c, ref_r,
            loss_type=hp.loss_type, beta=hp.beta, label_smoothing=hp.label_smoothing,
            chosen_lengths=pol["chosen_lengths"], rejected_lengths=pol["rejected_lengths"],
            margin_offset=batch.get("margin_offset"), discopop_tau=hp.discopop_tau,
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
        stats = {
            "loss": loss.detach(),
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean(),
            "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean(),
            "logps/chosen": pol["chosen_logps"].detach().mean(),
            "logps/rejected": pol["rejected_logps"].detach().mean(),
            "logits/chosen": pol["chosen_logits"],
            "logits/rejected": pol["rejected_logits"],
        }
        return loss, stats

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, stats = self._step(batch, training=True)
        n = batch["row_ids"].numel()
        for name, value in stats.items():
            self.train_metrics[_key(name)].update(value, weight=n)
        self.log("train_loss", loss.detach(), prog_bar=True, logger=False, batch_size=n)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Once per optimizer step, after every micro-batch of the step has been accumulated.
        self._log_metrics("train", self.train_metrics)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        _, stats = self._step(batch)
        n = batch["row_ids"].numel()
        for name, value in stats.items():
            self.val_metrics[_key(name)].update(value, weight=n)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def _log_metrics(self, prefix: str, metrics: nn.ModuleDict) -> None:
        if all(m.update_count == 0 for m in metrics.values()):
            return
        values = {f"{prefix}/{name}": metrics[_key(name)].compute() for name in METRIC_NAMES}
        for m in metrics.values():
            m.reset()
        train = prefix == "train"
        self.log_dict(values, on_step=train, on_epoch=not train, sync_dist=False, rank_zero_only=True)

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (fused where torch supports it: see `_fused_adamw_supported`), no decay on 1-d
        parameters, warm-up then the chosen decay per optimizer step."""
        hp = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=tuple(hp.betas),
                                      eps=hp.adam_eps, fused=_fused_adamw_supported(params))
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1
        schedule = _lr_lambda(hp.scheduler, hp.warmup_steps, total)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
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
        extra: dict[str, Any] = {"reference": self.hparams.reference}
        if self._reference_digest is not None:
            extra["reference_digest"] = self._reference_digest
        if self._ref_cache:
            ids = sorted(self._ref_cache)
            extra["reference_logps"] = {
                "row_ids": torch.tensor(ids, dtype=torch.long),
                "chosen": torch.tensor([self._ref_cache[i][0] for i in ids], dtype=torch.float32),
                "rejected": torch.tensor([self._ref_cache[i][1] for i in ids], dtype=torch.float32),
            }
        checkpoint[CHECKPOINT_KEY] = extra

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get(CHECKPOINT_KEY, {})
        state = checkpoint.get("state_dict")
        saved = extra.get("reference_digest")
        if self._reference_digest is not None and saved is not None and saved != self._reference_digest:
            raise ValueError(
                "this DPOModule's reference model is not the one the checkpoint was trained against "
                "(the weights differ); build DPOModule with the same initial policy the run started from"
            )
        if self.reference is not None and state is not None:
            # Old checkpoints carry the reference; new ones get it from this module (a sharded
            # reference lives outside the module tree, see configure_model: nothing to add).
            if "reference" in self._modules and not any(k.startswith("reference.") for k in state):
                state.update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})
        table = extra.get("reference_logps")
        if self.hparams.reference == "precomputed":
            if table is None:
                raise ValueError(
                    "the checkpoint holds no precomputed reference log-probs (reference='precomputed'), and they "
                    "cannot be recomputed from a trained policy; resume with the run's own checkpoint, or start "
                    "a new run"
                )
            self._ref_cache = {int(i): (float(c), float(r)) for i, c, r in zip(
                table["row_ids"].tolist(), table["chosen"].tolist(), table["rejected"].tolist())}
            self._ref_from_checkpoint = True
            self._check_reference_table()

    # ------------------------------------------------------------------ setup checks
    def setup(self, stage: str) -> None:
        """Refuse sequences longer than the model's positions before any step (they would crash
        mid-training with an IndexError, or silently wrap for some position schemes)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        limit = max_positions(self.policy)
        asked = getattr(dm, "max_length", None)
        if limit is not None and isinstance(asked, int) and asked > limit:
            raise ValueError(
                f"max_length={asked} is longer than the model's {limit} positions "
                f"({type(unwrap_model(self.policy)).__name__}); set max_length <= {limit} on the data module"
            )

    # ------------------------------------------------------------------ sharding (FSDP)
    def configure_model(self) -> None:
        """Shard for the Trainer's strategy; other strategies need nothing.

        `ModelParallelStrategy` (FSDP2): `fully_shard` on every decoder block and on the root, for
        the policy (a PEFT policy's reference is that same sharded model) and the copy reference,
        over the data-parallel mesh (no tensor parallelism: `tensor_parallel_size=1`).
        `FSDPStrategy` (FSDP1): Lightning wraps the module itself (pass
        `auto_wrap_policy=decoder_block_classes(policy)`); the copy reference is wrapped here as
        its own FSDP unit with the strategy's settings. Either way a sharded reference is taken
        out of the module tree: checkpoints hold no reference weights, so a strict load of a
        sharded or full checkpoint must not expect any.
        """
        if self._trainer is None:
            return
        strategy = self.trainer.strategy
        kind = {c.__name__ for c in type(strategy).__mro__}
        mesh = fsdp2_data_mesh(strategy, "DPOModule")
        if mesh is not None:
            if not is_fsdp2_module(self.policy):
                shard_fsdp2(self.policy, mesh)
            if self.reference is not None and not is_fsdp2_module(self.reference):
                reference = self.trainer.precision_plugin.convert_module(self.reference)
                self._keep_outside_module_tree(shard_fsdp2(reference, mesh))
        elif "FSDPStrategy" in kind and self.reference is not None and not has_fsdp1_units(self.reference):
            from torch.distributed.fsdp import FullyShardedDataParallel

            reference = self.trainer.precision_plugin.convert_module(self.reference)
            wrapped = FullyShardedDataParallel(
                reference, cpu_offload=strategy.cpu_offload, mixed_precision=strategy.mixed_precision_config,
                sharding_strategy=strategy.sharding_strategy, device_id=strategy.root_device.index,
                **strategy.kwargs,
            )
            self._keep_outside_module_tree(wrapped)

    def _keep_outside_module_tree(self, reference: nn.Module) -> None:
        """`self.reference` stays an attribute, but no longer a submodule (state_dict, parameters, `.to`)."""
        self._modules.pop("reference", None)
        self.__dict__["reference"] = reference

    # ------------------------------------------------------------------ precomputed reference
    def _data_pairs(self) -> list[TokenizedPair]:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return list(getattr(dm, "train_pairs", None) or []) + list(getattr(dm, "val_pairs", None) or [])

    def _check_reference_table(self) -> None:
        """A resumed run's table (from its checkpoint) must cover the data: a trained policy
        cannot stand in for the reference on rows the table lacks."""
        missing = [p.row_id for p in self._data_pairs() if p.row_id not in self._ref_cache]
        if missing:
            raise ValueError(
                f"the checkpoint's reference log-probs lack {len(missing)} row id(s) of this data (first: "
                f"{missing[:5]}); a resumed run cannot compute them from its trained weights. Resume with the "
                "same data and split"
            )

    def on_fit_start(self) -> None:
        if self.hparams.reference != "precomputed" or self._ref_from_checkpoint:
            return  # a checkpoint's table was checked against the data when it loaded
        # Computed at the first validation or training start, not here: some strategies (FSDP2's
        # ModelParallelStrategy) load a checkpoint only after on_fit_start, and a resumed run's
        # table comes with it. One rule for every strategy.
        self._ref_pending = True

    def on_validation_start(self) -> None:
        self._compute_pending_reference()

    def on_train_start(self) -> None:
        self._compute_pending_reference()

    def _compute_pending_reference(self) -> None:
        if not self._ref_pending:
            return
        self._ref_pending = False
        if self._ref_from_checkpoint:
            return
        pairs = self._data_pairs()
        dm = getattr(self.trainer, "datamodule", None)
        if not pairs:
            raise ValueError(
                "reference='precomputed' needs a datamodule with train_pairs/val_pairs (PreferenceDataModule), "
                "or call DPOModule.precompute_reference(pairs) before fit"
            )
        self.precompute_reference(pairs, pad_token_id=getattr(dm, "pad_token_id", 0))

    @torch.no_grad()
    def precompute_reference(self, pairs: list[TokenizedPair], *, pad_token_id: int = 0, batch_size: int = 8) -> None:
        """Reference log-probs of the current (initial) policy for `pairs`, cached on disk.

        The cache key hashes the policy weights and the tokenized pairs, so a changed model, data
        or tokenization never reuses stale numbers. A cache file that cannot be read or lacks rows
        is recomputed. Rank 0 computes and writes; others wait and read. Under a sharded strategy
        (FSDP) every forward is a collective, so every rank computes when rank 0 found no valid
        cache (as without a cache folder).
        """
        todo = [p for p in pairs if p.row_id not in self._ref_cache]
        if not todo:
            return
        cache_dir = self.hparams.reference_cache_dir
        path = Path(cache_dir) / f"{self._fingerprint(todo)}.safetensors" if cache_dir else None
        strategy = self.trainer.strategy if self._trainer is not None else None
        is_zero = strategy is None or strategy.is_global_zero
        every_rank = strategy is not None and (is_sharded_strategy(strategy) or path is None)
        wanted = [p.row_id for p in todo]
        table = None
        if is_zero and path is not None and path.exists():
            table, problem = _read_reference_table(path, wanted)
            if problem:
                warnings.warn(f"reference cache {path} {problem}; recomputing it", stacklevel=2)
        compute = table is None
        if every_rank:
            compute = strategy.broadcast(compute, src=0)
        if compute and (is_zero or every_rank):
            table = self._compute_reference(todo, pad_token_id, batch_size)
            if is_zero and path is not None:
                atomic_write_file(path, lambda tmp: save_file(table, str(tmp)))
        if strategy is not None and path is not None:
            strategy.barrier("anatomy_reference_cache")
        if table is None:  # another rank: read what rank 0 wrote
            table, problem = _read_reference_table(path, wanted)
            if problem:
                raise RuntimeError(f"reference cache {path} {problem} after rank 0 wrote it; is {path.parent} "
                                   "shared by all processes? Set reference_cache_dir to a shared folder")
        for rid, c, r in zip(table["row_ids"].tolist(), table["chosen"].tolist(), table["rejected"].tolist()):
            self._ref_cache[int(rid)] = (c, r)

    def _compute_reference(self, pairs: list[TokenizedPair], pad_token_id: int, batch_size: int) -> dict[str, Tensor]:
        was_training = self.policy.training
        self.policy.eval()
        ids, chosen, rejected = [], [], []
        try:
            for start in range(0, len(pairs), batch_size):
                batch = collate_pairs(pairs[start:start + batch_size], pad_token_id)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with reference_pass():
                    out = self.concatenated_forward(self.policy, batch)
                ids.append(batch["row_ids"].cpu())
                chosen.append(out["chosen_logps"].float().cpu())
                rejected.append(out["rejected_logps"].float().cpu())
        finally:
            self.policy.train(was_training)
        return {"row_ids": torch.cat(ids), "chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}

    # ------------------------------------------------------------------ the trained model
    def save_pretrained(self, path: str | os.PathLike, merge_adapters: bool = True, *, tokenizer: Any = None
                        ) -> Path:
        """Write the policy as a Hugging Face model folder (`AutoModelForCausalLM.from_pretrained`).

        A PEFT policy is merged into its base weights (`merge_adapters=True`, a plain model) or
        saved adapter-only (`peft.AutoPeftModelForCausalLM.from_pretrained`). The tokenizer (given,
        else the datamodule's) is saved beside it. The folder appears complete or not at all.
        """
        if tokenizer is None and self._trainer is not None:
            tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        model = self.policy
        if is_sharded_module(model):  # callers (the CLI) save from rank 0 alone: a gather would hang
            raise ValueError(
                "save_pretrained needs the policy's full weights, but they are sharded (FSDP); save a full "
                "checkpoint (ModelParallelStrategy(save_distributed_checkpoint=False) or FSDPStrategy("
                "state_dict_type='full')), load it into an unsharded DPOModule and call save_pretrained there"
            )
        is_peft = hasattr(model, "merge_and_unload")
        if is_peft and merge_adapters:
            model = copy.deepcopy(model).merge_and_unload()

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

        return atomic_directory(Path(path), write)

    def _fingerprint(self, pairs: list[TokenizedPair]) -> str:
        root = self.trainer.model if self._trainer is not None else None  # FSDP1: the unit owning the root weights
        digest = full_model_digest(self.policy, fsdp_root=root if root is not None and has_fsdp1_units(root) else None)
        return combined_digest("reference-logps", digest, pairs_digest(pairs))


def _read_reference_table(path: Path, row_ids: list[int]) -> tuple[dict[str, Tensor] | None, str | None]:
    """The cached table and None, or None and what is wrong with the file."""
    try:
        table = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for damaged files
        return None, f"cannot be read ({type(err).__name__}: {err})"
    if set(table) != {"row_ids", "chosen", "rejected"} or len({t.shape for t in table.values()}) != 1:
        return None, "does not hold a reference table (row_ids, chosen, rejected of one length)"
    missing = set(row_ids) - set(table["row_ids"].tolist())
    if missing:
        return None, f"lacks {len(missing)} of the {len(row_ids)} rows"
    if not (torch.isfinite(table["chosen"]).all() and torch.isfinite(table["rejected"]).all()):
        return None, "holds non-finite log-probs"
    return table, None


def _fused_adamw_supported(params: list[Tensor]) -> bool | None:
    """True where torch's fused AdamW kernel serves every parameter (floating point, CPU or CUDA).

    The fused step updates each parameter in one kernel: the default paths allocate temporaries
    of the largest parameter (CPU, twice: 226 MB for SmolLM2's tied embedding) or of all of them
    (CUDA's foreach path). The same update up to fp32 rounding (1 ulp). None: torch's default.
    """
    ok = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok else None


def _key(name: str) -> str:
    return name.replace("/", "__")


def _lr_lambda(kind: str, warmup: int, total: int):
    def schedule(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    return schedule


__all__ = ["DPOModule", "sequence_logps", "METRIC_NAMES", "REFERENCE_MODES"]
