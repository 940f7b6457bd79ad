"""One small training run, interrupted and resumed or not: what the resume tests compare.

Used in-process by tests/test_resume.py and in a 2-process DDP subprocess by the same file, so
both paths build exactly the same run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LambdaCallback, ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_anatomy import ConceptAttribution, ConceptDriftMonitor, DPOModule, PreferenceDataModule
from lightning_anatomy.data.toy import make_toy_preferences
from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer
from tests.helpers.concept_callback_helpers import random_sae
from tests.helpers.intervention_helpers import MemoryLogger

HOOK = "blocks.0.hook_resid_post"
N_ROWS = 40  # 36 training pairs, batch 4: 9 batches per epoch
BATCH = 4
TRACK = {f"f{i}": (HOOK, i) for i in range(16)}  # enough features that some fire
PEFT = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], "lora_dropout": 0.0}


class RestoresAfterSetup(SingleDeviceStrategy):
    """Loads checkpoints only after `on_fit_start`, as `ModelParallelStrategy` (FSDP2) does: the
    late-restore path of a resume, in one process."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def run(reference: str, max_steps: int, root: Path, *, ckpt_path: str | None = None, stop_at: int | None = None,
        devices: int = 1, accumulate: int = 1) -> dict[str, Any]:
    """Train the tiny run to `max_steps` (from `ckpt_path` when given), or interrupt it right after
    the checkpoint at step `stop_at`; returns what it logged, the row ids of every training batch,
    and the checkpoint's path."""
    L.seed_everything(0, verbose=False)
    tok = build_tiny_tokenizer()
    data = PreferenceDataModule(make_toy_preferences(N_ROWS, seed=0), tok, batch_size=BATCH, max_length=64,
                                max_prompt_length=32, val_fraction=0.1, shuffle=True, seed=3)
    module = DPOModule(build_tiny_model("gpt2", seed=0, vocab_size=len(tok)), reference=reference, lr=2e-3,
                       peft_config=copy.deepcopy(PEFT) if reference == "peft" else None,
                       reference_cache_dir=str(root / "refcache"), warmup_steps=2)
    sae = random_sae(64, 64, seed=5)
    probe = make_toy_preferences(6, seed=9)
    from lightning_anatomy.data import read_preferences, tokenize_rows

    probe_pairs = tokenize_rows(read_preferences(probe), tok, max_length=64, max_prompt_length=32)
    batches: list[list[int]] = []
    logger = MemoryLogger()
    callbacks: list[Any] = [
        ConceptAttribution({HOOK: sae}, every_n_steps=1, track=TRACK),
        ConceptDriftMonitor({HOOK: sae}, probe_pairs, every_n_steps=2, track=TRACK),
        LambdaCallback(on_train_batch_start=lambda tr, pl, batch, i: batches.append(batch["row_ids"].tolist())),
    ]
    if stop_at is not None:
        callbacks += interruption(stop_at, root)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=max_steps,
        logger=logger, callbacks=callbacks, enable_checkpointing=stop_at is not None, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1, val_check_interval=6,
        check_val_every_n_epoch=None, accumulate_grad_batches=accumulate, default_root_dir=str(root),
        deterministic=True,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    saved = sorted((root / "ckpt").glob("*.ckpt")) if stop_at is not None else []
    return {"records": logger.records(), "batches": batches, "ckpt": str(saved[0]) if saved else None,
            "state_keys": list(module.state_dict())}


def after(records: list[tuple[int, dict[str, float]]], step: int) -> dict[tuple[int, str], float]:
    """Every logged value at a step after `step`, keyed by (step, metric)."""
    return {(s, k): v for s, metrics in records if s > step for k, v in metrics.items()}


def interruption(stop_at: int, root: Path) -> list[L.Callback]:
    """Stop the run after optimizer step `stop_at`, with a checkpoint of that step in `root/ckpt`."""

    def interrupt(trainer: L.Trainer, *_: Any) -> None:
        if trainer.global_step == stop_at:
            trainer.should_stop = True

    return [LambdaCallback(on_train_batch_end=interrupt),
            ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=stop_at, save_top_k=-1)]
