"""DPOModule: learning, reference modes, metrics contract, accumulation, resume, DDP, CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_anatomy import DPOModule, PreferenceDataModule
from lightning_anatomy.data import collate_pairs, tokenize_rows
from lightning_anatomy.data.rows import read_preferences
from lightning_anatomy.data.toy import make_toy_preferences
from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer
from lightning_anatomy.module import METRIC_NAMES, sequence_logps
from lightning_anatomy.reference import PrecomputedReference
from tests.helpers.resume_helpers import RestoresAfterSetup

REPO = Path(__file__).resolve().parents[2]


def _trainer(steps: int, logger=False, **kw) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, **kw)


def _dm(tok, n=32, batch_size=8, val_fraction=0.0, **kw) -> PreferenceDataModule:
    return PreferenceDataModule(make_toy_preferences(n, seed=0), tok, batch_size=batch_size,
                                val_fraction=val_fraction, max_length=48, max_prompt_length=32, seed=0, **kw)


def _read_csv_metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_sequence_logps_exact():
    logits = torch.randn(2, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4], [0, 1, 2, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    logps, lengths = sequence_logps(logits, ids, mask)
    lp = torch.log_softmax(logits, -1)
    expected = torch.stack([lp[0, 1, 3] + lp[0, 2, 4], lp[1, 0, 1] + lp[1, 1, 2]])
    torch.testing.assert_close(logps, expected)
    assert lengths.tolist() == [2.0, 2.0]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_short_fit_learns_toy_preference_and_changes_parameters(family, tmp_path):
    tok = build_tiny_tokenizer()
    policy = build_tiny_model(family, vocab_size=len(tok))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    module = DPOModule(policy, lr=3e-3, beta=0.1)
    logger = CSVLogger(tmp_path, name="fit")
    _trainer(24, logger=logger).fit(module, datamodule=_dm(tok))
    rows = _read_csv_metrics(Path(logger.log_dir))
    acc = [float(r["train/rewards/accuracies"]) for r in rows if r.get("train/rewards/accuracies")]
    assert len(acc) == 24, "one train metrics row per optimizer step"
    assert sum(acc[-4:]) / 4 > 0.9 and acc[0] <= 0.75
    for name in METRIC_NAMES:
        assert rows[-1][f"train/{name}"] != ""
    changed = [k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    ref_same = all(torch.equal(v, before[k]) for k, v in module.reference.state_dict().items())
    assert ref_same, "the frozen reference copy must not change"


@pytest.mark.slow
def test_val_metrics_logged_under_val_prefix(tmp_path):
    tok = build_tiny_tokenizer()
    logger = CSVLogger(tmp_path, name="val")
    module = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok)), lr=1e-3)
    _trainer(4, logger=logger, val_check_interval=2, num_sanity_val_steps=0).fit(
        module, datamodule=_dm(tok, n=40, val_fraction=0.2))
    rows = _read_csv_metrics(Path(logger.log_dir))
    vals = [r for r in rows if r.get("val/loss")]
    assert len(vals) == 2
    for name in METRIC_NAMES:
        assert vals[-1][f"val/{name}"] != ""


def test_precomputed_reference_equals_live_reference(tmp_path):
    tok = build_tiny_tokenizer()
    policy = build_tiny_model("gpt2", vocab_size=len(tok))
    init = {k: v.clone() for k, v in policy.state_dict().items()}
    pairs = tokenize_rows(read_preferences(make_toy_preferences(8)), tok, max_length=48, max_prompt_length=32)
    batch = collate_pairs(pairs, tok.pad_token_id)
    live = DPOModule(policy, reference="copy")
    pre = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok)), reference="precomputed",
                    reference_cache_dir=str(tmp_path / "cache"))
    pre.policy.load_state_dict(policy.state_dict())
    pre.precompute_reference(pairs, pad_token_id=tok.pad_token_id)
    assert pre.reference is None
    with torch.no_grad():
        # perturb both policies identically so the loss is not trivially log(2)
        for m in (live.policy, pre.policy):
            torch.manual_seed(1)
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
        live_loss, _ = live.compute_loss(batch)
        pre_loss, _ = pre.compute_loss(batch)
    assert abs(live_loss.item() - pre_loss.item()) < 1e-6
    cached = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(cached) == 1
    # a second module reuses the cache file instead of recomputing
    again = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok)), reference="precomputed",
                      reference_cache_dir=str(tmp_path / "cache"))
    again.policy.load_state_dict(init)
    mtime = cached[0].stat().st_mtime_ns
    again.precompute_reference(pairs, pad_token_id=tok.pad_token_id)
    assert cached[0].stat().st_mtime_ns == mtime
    assert again.reference_table == pre.reference_table
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def test_precomputed_reference_in_fit(tmp_path):
    tok = build_tiny_tokenizer()
    module = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok)), reference="precomputed", lr=3e-3,
                       reference_cache_dir=str(tmp_path / "cache"))
    _trainer(3).fit(module, datamodule=_dm(tok, n=16))
    assert len(module.reference_table) == 16


@pytest.mark.parametrize("late", [False, True], ids=["restore_before_fit_start", "restore_after_fit_start"])
def test_resumed_precomputed_run_takes_the_checkpoints_table(tmp_path, late, monkeypatch):
    """Whenever the strategy loads the checkpoint, a resumed run (here without the first run's
    cache) uses the checkpoint's table and computes none: the same numbers, no pass over the data."""
    tok = build_tiny_tokenizer()

    def module(cache: str) -> DPOModule:
        return DPOModule(build_tiny_model("gpt2", vocab_size=len(tok), seed=0), reference="precomputed", lr=3e-3,
                         reference_cache_dir=str(tmp_path / cache))

    def strategy() -> dict:
        return {"strategy": RestoresAfterSetup(device=torch.device("cpu"))} if late else {}

    first = module("a")
    t = _trainer(2, **strategy())
    t.fit(first, datamodule=_dm(tok, n=16))
    t.save_checkpoint(tmp_path / "half.ckpt")
    resumed = module("b")
    monkeypatch.setattr(PrecomputedReference, "_compute", lambda *a: pytest.fail("the resumed run computed a table"))
    _trainer(3, **strategy()).fit(resumed, datamodule=_dm(tok, n=16), ckpt_path=tmp_path / "half.ckpt")
    assert resumed.reference_table.keys() == first.reference_table.keys()
    assert not list((tmp_path / "b").glob("*"))  # no cache written either


def test_peft_reference_has_no_second_copy():
    pytest.importorskip("peft")
    tok = build_tiny_tokenizer()
    policy = build_tiny_model("llama", vocab_size=len(tok))
    module = DPOModule(policy, reference="peft", lr=5e-3,
                       peft_config={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                    "lora_dropout": 0.0})
    assert module.reference is None
    n_params = sum(p.numel() for p in module.parameters())
    base = sum(p.numel() for p in build_tiny_model("llama", vocab_size=len(tok)).parameters())
    assert n_params < 1.2 * base, "PEFT reference must reuse the base weights"
    pairs = tokenize_rows(read_preferences(make_toy_preferences(4)), tok, max_length=48, max_prompt_length=32)
    batch = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        ref_c, ref_r = module.reference_logps(batch)
        pol = module.concatenated_forward(module.policy, batch)
    # LoRA B starts at zero: policy == reference at init, so the loss is exactly log 2
    torch.testing.assert_close(ref_c, pol["chosen_logps"])
    _trainer(6).fit(module, datamodule=_dm(tok, n=16))
    with torch.no_grad():
        ref_c2, _ = module.reference_logps(batch)
        pol2 = module.concatenated_forward(module.policy, batch)
    torch.testing.assert_close(ref_c2, ref_c)
    assert not torch.allclose(pol2["chosen_logps"], ref_c2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reference": "other"}, "reference"),
        ({"reference": "peft"}, "peft_config"),
        ({"scheduler": "step"}, "scheduler"),
        ({"lr": 0.0}, "lr"),
        ({"loss_type": "nope"}, "loss_type"),
        ({"rpo_alpha": -1.0}, "rpo_alpha"),
        ({"beta": -0.1}, "beta"),
    ],
)
def test_invalid_options_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOModule("tiny:gpt2", **kwargs)


def test_rpo_alpha_adds_chosen_nll():
    tok = build_tiny_tokenizer()
    policy = build_tiny_model("gpt2", vocab_size=len(tok))
    pairs = tokenize_rows(read_preferences(make_toy_preferences(4)), tok, max_length=48, max_prompt_length=32)
    batch = collate_pairs(pairs, tok.pad_token_id)
    plain = DPOModule(policy)
    rpo = DPOModule(policy, rpo_alpha=0.5)
    with torch.no_grad():
        l0, _ = plain.compute_loss(batch)
        l1, _ = rpo.compute_loss(batch)
        out = plain.concatenated_forward(policy, batch, with_stats=True)
    nll = -out["chosen_logps"].sum() / out["chosen_lengths"].sum()
    torch.testing.assert_close(l1, l0 + 0.5 * nll)


def test_pair_weights_scale_the_loss():
    tok = build_tiny_tokenizer()
    policy = build_tiny_model("gpt2", vocab_size=len(tok))
    pairs = tokenize_rows(read_preferences(make_toy_preferences(4)), tok, max_length=48, max_prompt_length=32)
    batch = collate_pairs(pairs, tok.pad_token_id)
    module = DPOModule(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
        full, _ = module.compute_loss(batch)
        batch["weights"] = torch.tensor([1.0, 0.0, 1.0, 0.0])
        half, _ = module.compute_loss(batch)
        kept = collate_pairs([pairs[0], pairs[2]], tok.pad_token_id)
        sub, _ = module.compute_loss(kept)
    torch.testing.assert_close(half, sub / 2)
    assert full != half


@pytest.mark.slow
def test_gradient_accumulation_equals_big_batch(tmp_path):
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    init = build_tiny_model("gpt2", vocab_size=len(tok)).state_dict()
    results = {}
    for name, bs, acc in (("big", 8, 1), ("accum", 4, 2)):
        policy = build_tiny_model("gpt2", vocab_size=len(tok))
        policy.load_state_dict(init)
        logger = CSVLogger(tmp_path, name=name)
        module = DPOModule(policy, lr=1e-3, adam_eps=1e-4)
        trainer = _trainer(3, logger=logger, accumulate_grad_batches=acc)
        trainer.fit(module, datamodule=_dm(tok, n=24, batch_size=bs, shuffle=False))
        rows = _read_csv_metrics(Path(logger.log_dir))
        results[name] = ([float(r["train/loss"]) for r in rows if r.get("train/loss")], policy.state_dict())
    assert len(results["big"][0]) == len(results["accum"][0]) == 3
    for a, b in zip(results["big"][0], results["accum"][0]):
        assert abs(a - b) < 1e-5
    for k, v in results["big"][1].items():
        torch.testing.assert_close(v, results["accum"][1][k], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    tok = build_tiny_tokenizer()
    init = build_tiny_model("gpt2", vocab_size=len(tok)).state_dict()

    def make():
        policy = build_tiny_model("gpt2", vocab_size=len(tok))
        policy.load_state_dict(init)
        return DPOModule(policy, lr=1e-3, warmup_steps=2)

    straight = make()
    _trainer(6).fit(straight, datamodule=_dm(tok, n=24, shuffle=False))

    class Killed(RuntimeError):
        pass

    class Interrupt(L.Callback):
        """Checkpoint at the end of epoch 0 (3 steps), then die inside epoch 1."""

        def on_train_epoch_end(self, trainer, *args):
            trainer.save_checkpoint(tmp_path / "mid.ckpt")

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 5:
                raise Killed

    first = make()
    with pytest.raises(Killed):
        _trainer(6, callbacks=[Interrupt()]).fit(first, datamodule=_dm(tok, n=24, shuffle=False))
    resumed = make()
    _trainer(6).fit(resumed, datamodule=_dm(tok, n=24, shuffle=False), ckpt_path=tmp_path / "mid.ckpt")
    for k, v in straight.policy.state_dict().items():
        torch.testing.assert_close(v, resumed.policy.state_dict()[k], atol=1e-6, rtol=1e-5)






@pytest.mark.slow
def test_cli_fit_on_tiny_config(tmp_path):
    from lightning_anatomy.cli import main

    rc = main(["fit", "--config", str(REPO / "configs" / "tiny.yaml"), "--trainer.max_steps=3",
               f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    assert rc == 0
    rows = _read_csv_metrics(tmp_path / "tiny" / "version_0")
    assert len([r for r in rows if r.get("train/loss")]) == 3


def test_cli_rejects_unknown_keys(tmp_path, capsys):
    from lightning_anatomy.cli import main

    assert main(["fit", "modle.policy=tiny:gpt2"]) == 2
    assert "modle.policy" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "sppo_hard",
                                       "apo_zero", "apo_down", "discopop"])
def test_every_loss_type_trains_the_policy(loss_type):
    from lightning_anatomy.losses import LOSS_TYPES

    assert loss_type in LOSS_TYPES
    tok = build_tiny_tokenizer()
    policy = build_tiny_model("gpt2", vocab_size=len(tok))
    smoothing = 1e-3 if loss_type == "exo_pair" else 0.1 if loss_type == "robust" else 0.0
    module = DPOModule(policy, loss_type=loss_type, label_smoothing=smoothing, lr=1e-3)
    pairs = tokenize_rows(read_preferences(make_toy_preferences(4)), tok, max_length=48, max_prompt_length=32)
    batch = collate_pairs(pairs, tok.pad_token_id)
    before = [p.detach().clone() for p in policy.parameters()]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    for _ in range(2):  # the first step of some losses (policy == reference) has zero gradient by design
        loss, stats = module.compute_loss(batch)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = sum(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert changed > len(before) // 2, f"{loss_type}: only {changed} parameter tensors changed"
