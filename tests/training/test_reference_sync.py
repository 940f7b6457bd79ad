"""TR-DPO (`SyncReference`): TRL 1.16's update rule and schedule, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_anatomy import DPOModule, PreferenceDataModule
from lightning_anatomy.data.toy import make_toy_preferences
from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer
from lightning_anatomy.reference_sync import SyncReference, mix_into_reference, validate_sync_options
from tests.helpers.intervention_helpers import MemoryLogger
from tests.helpers.resume_helpers import interruption


def test_mix_equals_trl_1_16_sync_ref_model_callback():
    callbacks = pytest.importorskip("trl.trainer.callbacks")
    from accelerate import Accelerator

    Accelerator(cpu=True)  # TRL's public sync_target_model reads the accelerator state
    torch.manual_seed(0)
    policy = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    trl_reference = copy.deepcopy(reference)
    mix_into_reference(policy, reference, 0.6)
    callbacks.SyncRefModelCallback.sync_target_model(policy, trl_reference, 0.6)
    for ours, trl in zip(reference.parameters(), trl_reference.parameters(), strict=True):
        torch.testing.assert_close(ours, trl, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("alpha", "steps", "message"),
    [
        (1.5, 512, "ref_model_mixup_alpha must lie in [0, 1], got 1.5"),
        (float("nan"), 512, "got nan"),
        (0.6, 0, "ref_model_sync_steps must be an integer >= 1, got 0"),
        (0.6, 2.5, "got 2.5"),
    ],
)
def test_bad_sync_options_are_refused(alpha, steps, message):
    with pytest.raises(ValueError) as info:
        validate_sync_options(alpha, steps)
    assert message in str(info.value)
    with pytest.raises(ValueError):
        SyncReference(alpha, steps)


def _run(root: Path, max_steps: int, *, ckpt_path: str | None = None, stop_at: int | None = None,
         accumulate: int = 1) -> dict[str, Any]:  # fmt: skip
    L.seed_everything(0, verbose=False)
    tok = build_tiny_tokenizer()
    data = PreferenceDataModule(make_toy_preferences(40, seed=0), tok, batch_size=4, max_length=64,
                                max_prompt_length=32, val_fraction=0.1, shuffle=True, seed=3)  # fmt: skip
    module = DPOModule(build_tiny_model("gpt2", seed=0, vocab_size=len(tok)), lr=5e-3, warmup_steps=1,
                       sync_ref_model=True, ref_model_mixup_alpha=0.6, ref_model_sync_steps=2)  # fmt: skip
    logger = MemoryLogger()
    callbacks: list[Any] = []
    if stop_at is not None:
        callbacks += interruption(stop_at, root)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=logger, callbacks=callbacks,
        enable_checkpointing=stop_at is not None, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=1, val_check_interval=3, check_val_every_n_epoch=None,
        accumulate_grad_batches=accumulate, default_root_dir=str(root), deterministic=True,
    )  # fmt: skip
    initial = {k: v.clone() for k, v in module.reference.state_dict().items()}
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    saved = sorted((root / "ckpt").glob("*.ckpt")) if stop_at is not None else []
    (sync,) = [c for c in trainer.callbacks if isinstance(c, SyncReference)]  # DPOModule(sync_ref_model=True) adds it
    return {
        "records": logger.records(),
        "ckpt": str(saved[0]) if saved else None,
        "reference": {k: v.clone() for k, v in module.reference.state_dict().items()},
        "policy": {k: v.clone() for k, v in module.policy.state_dict().items()},
        "initial_reference": initial,
        "syncs": sync.syncs,
        "synced_step": sync.synced_step,
    }


@pytest.mark.slow
@pytest.mark.parametrize(("stop_at", "accumulate"), [(3, 1), (4, 2)])
def test_resumed_tr_dpo_run_logs_what_the_uninterrupted_run_logs(tmp_path, stop_at, accumulate):
    """τ = 2, 6 steps: mixes at steps 2, 4, 6. Interrupted right after a mix (4, with accumulation, where
    a repeated mix per micro-batch would show) or between mixes (3), then resumed from the checkpoint."""
    full = _run(tmp_path / "full", 6, accumulate=accumulate)
    assert full["syncs"] == 3 and full["synced_step"] == 6
    changed = [k for k, v in full["reference"].items() if not torch.equal(v, full["initial_reference"][k])]
    assert changed, "the reference never moved"
    first = _run(tmp_path / "resumed", 6, stop_at=stop_at, accumulate=accumulate)
    assert first["syncs"] == stop_at // 2
    resumed = _run(tmp_path / "resumed", 6, ckpt_path=first["ckpt"], accumulate=accumulate)
    assert resumed["syncs"] == 3 and resumed["synced_step"] == 6
    for key, value in full["reference"].items():
        torch.testing.assert_close(resumed["reference"][key], value, rtol=0, atol=0)
    for key, value in full["policy"].items():
        torch.testing.assert_close(resumed["policy"][key], value, rtol=0, atol=0)
    after = {(s, k): v for s, row in full["records"] if s > stop_at for k, v in row.items()}
    got = {(s, k): v for s, row in resumed["records"] if s > stop_at for k, v in row.items()}
    assert after and got == after
    assert any(k == "train/num_tokens" for _, k in after)  # the cumulative token count resumes too


def test_reference_follows_the_policy_by_the_tr_dpo_recurrence(tmp_path):
    """With τ = 2, after 2 steps π_ref = 0.6·π_θ(2) + 0.4·π_ref(0) exactly."""
    run = _run(tmp_path, 2)
    assert run["syncs"] == 1
    for key, ref in run["reference"].items():
        if ref.dtype.is_floating_point and key in run["policy"]:
            expected = 0.4 * run["initial_reference"][key] + 0.6 * run["policy"][key]
            torch.testing.assert_close(ref, expected, rtol=1e-6, atol=1e-7)


def test_setup_refuses_a_module_without_a_reference_model(tmp_path):
    tok = build_tiny_tokenizer()
    module = DPOModule(build_tiny_model("gpt2", seed=0, vocab_size=len(tok)), reference="precomputed",
                       reference_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False)
    with pytest.raises(
        ValueError, match="with reference='peft' or 'precomputed' there is no reference model"
    ):
        SyncReference().setup(trainer, module, "fit")
