"""ConceptAttribution: online attribution patching of the DPO loss to SAE features."""

from __future__ import annotations

import copy
import csv
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from lightning_anatomy.callbacks.attribution import TABLE_COLUMNS, ConceptAttribution, feature_attribution
from lightning_anatomy.model_access import reference_pass
from lightning_anatomy.models.tiny import build_tiny_model
from lightning_anatomy.module import DPOModule
from tests.helpers.concept_callback_helpers import (
    batches,
    hook_count,
    loader,
    offline_wandb_env,
    random_pairs,
    random_sae,
    reference_push,
    trainer,
)

POST0 = "blocks.0.hook_resid_post"  # a block output (kind "output")
PRE1 = "blocks.1.hook_resid_pre"    # a block input (kind "input"), same tensor as POST0


def make_module(family: str = "gpt2", **kwargs) -> DPOModule:
    kwargs.setdefault("lr", 1e-3)
    return DPOModule(build_tiny_model(family, seed=0), **kwargs)


def count_captures(cb: ConceptAttribution) -> list[str]:
    calls: list[str] = []
    original = cb._capture

    def counting(hook, hidden):
        calls.append(hook)
        return original(hook, hidden)

    cb._capture = counting
    return calls


# --------------------------------------------------------------------------- the formula


def test_feature_attribution_is_the_token_sum_per_half_exactly():
    torch.manual_seed(0)
    sae = random_sae(d_in=6, d_sae=5, seed=1)
    h, g = torch.randn(4, 3, 6), torch.randn(4, 3, 6)
    mask = torch.tensor([[0, 1, 1], [0, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=torch.bool)
    got = feature_attribution(sae, h, g, mask)
    expected = torch.zeros(2, 5)
    for row in range(4):
        for t in range(3):
            if mask[row, t]:
                a = sae.encode(h[row, t]).detach()
                for f in range(5):
                    expected[row // 2, f] += a[f] * torch.dot(g[row, t], sae.W_dec[f].detach())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got != 0).any(dim=1).all()
    # A gradient only on one rejected token leaves the chosen row exactly zero.
    g_rej = torch.zeros_like(g)
    g_rej[3, 2] = g[3, 2]
    only = feature_attribution(sae, h, g_rej, mask)
    assert torch.equal(only[0], torch.zeros(5))
    torch.testing.assert_close(only[1], sae.encode(h[3, 2]).detach() * (sae.W_dec.detach() @ g[3, 2]))
    # Prompt and pad positions (mask False) never count.
    assert torch.equal(feature_attribution(sae, h, g, torch.zeros_like(mask)), torch.zeros(2, 5))


# --------------------------------------------------------------------------- against brute force


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_step_attribution_equals_brute_force_per_half(family):
    saes = {POST0: random_sae(seed=1), PRE1: random_sae(seed=2)}
    module = make_module(family)
    pairs = random_pairs(4, seed=3)
    expected = reference_push(module, batches(pairs, 4)[0], saes)
    cb = ConceptAttribution(saes, track={"a": (POST0, 5), "b": f"{PRE1}:7"})
    trainer([cb]).fit(module, loader(pairs, 4))
    assert cb.attributed_steps == 1 and cb.last_step == 0
    for hook in saes:
        torch.testing.assert_close(cb.last_push[hook], expected[hook], rtol=1e-4, atol=1e-6)
        assert not torch.allclose(expected[hook][0], expected[hook][1])  # chosen and rejected differ
        torch.testing.assert_close(cb.total_push[hook], expected[hook], rtol=1e-4, atol=1e-6)
    assert hook_count(module.policy) == 0 and cb._handles == []


def test_gradient_accumulation_sums_the_micro_batches_of_a_step():
    saes = {POST0: random_sae(seed=1)}
    module = make_module()
    pairs = random_pairs(4, seed=4)
    micro = batches(pairs, 2)
    # Lightning backpropagates loss / accumulate_grad_batches for each micro-batch.
    expected = sum(reference_push(module, b, saes, loss_scale=0.5)[POST0] for b in micro)
    cb = ConceptAttribution(saes)
    trainer([cb], accumulate_grad_batches=2).fit(module, loader(pairs, 2))
    assert cb.attributed_steps == 1
    torch.testing.assert_close(cb.last_push[POST0], expected, rtol=1e-4, atol=1e-6)
    single = reference_push(module, micro[0], saes, loss_scale=0.5)[POST0]
    assert not torch.allclose(cb.last_push[POST0], single, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("reentrant", [False, True])
def test_one_capture_per_micro_batch_under_gradient_checkpointing(reentrant):
    # transformers checkpoints a block's forward, so hooks on sublayers (mlp_out) re-run in backward.
    mlp1 = "blocks.1.hook_mlp_out"
    saes = {POST0: random_sae(seed=1), mlp1: random_sae(seed=2)}
    module = make_module()
    pairs = random_pairs(4, seed=5)
    expected = reference_push(module, batches(pairs, 4)[0], saes)
    module.policy.train()  # HF only checkpoints in train mode
    module.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    mlp_calls = []
    module.policy.transformer.h[1].mlp.register_forward_pre_hook(lambda m, a: mlp_calls.append(torch.is_grad_enabled()))
    cb = ConceptAttribution(saes)
    captures = count_captures(cb)
    trainer([cb]).fit(module, loader(pairs, 4))
    # The MLP ran twice (forward, then the recomputation in backward): checkpointing was live.
    assert mlp_calls == [not reentrant, True]
    assert sorted(captures) == sorted(saes)
    for hook in saes:
        torch.testing.assert_close(cb.last_push[hook], expected[hook], rtol=1e-4, atol=1e-6)


def test_skips_reference_passes_and_validation_and_unscheduled_steps():
    saes = {POST0: random_sae(seed=1)}

    class WithGradReferencePass(DPOModule):
        def training_step(self, batch, batch_idx):
            with reference_pass():  # e.g. a PEFT reference forward with grad enabled
                self.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return super().training_step(batch, batch_idx)

    module = WithGradReferencePass(build_tiny_model("gpt2", seed=0), lr=1e-3)
    pairs = random_pairs(6, seed=6)
    expected = reference_push(module, batches(pairs, 2)[0], saes)
    live_hooks: list[int] = []
    probe = L.pytorch.callbacks.LambdaCallback(
        on_before_backward=lambda tr, pl, loss: live_hooks.append(hook_count(pl.policy)))
    cb = ConceptAttribution(saes, every_n_steps=2, log_table_every=2)
    captures = count_captures(cb)
    trainer([cb, probe], max_steps=3, val_check_interval=1, limit_val_batches=1).fit(
        module, loader(pairs, 2), loader(random_pairs(2, seed=7), 2))
    assert live_hooks == [1, 0, 1]  # hooks only exist during attributed steps 0 and 2
    assert captures == [POST0, POST0]
    assert cb.attributed_steps == 2 and cb.last_step == 2
    # Step 0's numbers are the brute-force ones: the reference pass was not captured.
    torch.testing.assert_close(cb.total_push[POST0] - cb.last_push[POST0], expected[POST0], rtol=1e-4, atol=1e-6)
    assert hook_count(module.policy) == 0


def test_peft_policy_with_frozen_layers_below_the_hook():
    # LoRA on block 1 only: block 0's output does not require grad, and the reference forward
    # runs through the same modules with adapters off (inside reference_pass, without grad).
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "layers_to_transform": [1], "fan_in_fan_out": True}
    module = make_module(reference="peft", peft_config=lora)
    saes = {POST0: random_sae(seed=1)}
    pairs = random_pairs(4, seed=12)
    batch = batches(pairs, 4)[0]
    expected = reference_push(module, batch, saes)
    hidden = module.policy(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
    assert not hidden[1].requires_grad and hidden[2].requires_grad
    peft_hooks = hook_count(module.policy)  # PEFT's own
    cb = ConceptAttribution(saes)
    captures = count_captures(cb)
    trainer([cb]).fit(module, loader(pairs, 4))
    assert captures == [POST0]
    assert expected[POST0].abs().max() > 1e-4
    torch.testing.assert_close(cb.last_push[POST0], expected[POST0], rtol=1e-4, atol=1e-6)
    assert hook_count(module.policy) == peft_hooks


def test_hooks_removed_after_an_exception():
    saes = {POST0: random_sae(seed=1)}

    class Failing(DPOModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if batch_idx == 1:
                raise RuntimeError("boom in step 1")
            return loss

    module = Failing(build_tiny_model("gpt2", seed=0), lr=1e-3)
    cb = ConceptAttribution(saes)
    captures = count_captures(cb)
    with pytest.raises(RuntimeError, match="boom in step 1"):
        trainer([cb], max_steps=3).fit(module, loader(random_pairs(6, seed=8), 2))
    assert captures == [POST0, POST0]  # hooks were live in the failing step
    assert hook_count(module.policy) == 0 and cb._handles == [] and cb._armed_step is None
    assert cb.attributed_steps == 1


# --------------------------------------------------------------------------- logging


def _csv_rows(root) -> list[dict[str, str]]:
    (path,) = list(root.rglob("metrics.csv"))
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_scalars_reach_csv_and_wandb_and_the_table_reaches_wandb(tmp_path, monkeypatch):
    import wandb

    from lightning_anatomy.wandb_offline import find_offline_runs, read_run

    offline_wandb_env(monkeypatch, tmp_path)
    saes = {POST0: random_sae(seed=1), PRE1: random_sae(seed=2)}
    module, pairs = make_module(), random_pairs(6, seed=9)
    step0 = reference_push(module, batches(pairs, 2)[0], saes)[POST0]
    feat = int(step0.abs().min(0).values.argmax())  # a feature active in both halves at step 0
    labels = {(POST0, 0): "zero", f"{PRE1}:1": "one"}
    cb = ConceptAttribution(saes, track={"c5": (POST0, feat)}, labels=labels, top_k=3, log_table_every=2)
    seen: dict[int, dict[str, torch.Tensor]] = {}
    keep = L.pytorch.callbacks.LambdaCallback(
        on_train_batch_end=lambda tr, pl, *a: seen.__setitem__(cb.last_step, copy.deepcopy(cb.last_push)))
    loggers = [CSVLogger(tmp_path / "csv", name="run"), WandbLogger(project="attr", save_dir=str(tmp_path), offline=True)]
    try:
        trainer([cb, keep], max_steps=3, logger=loggers, log_every_n_steps=50).fit(module, loader(pairs, 2))
    finally:
        wandb.finish()
    assert sorted(seen) == [0, 1, 2]
    expected = {s: (float(v[POST0][0, feat]), float(v[POST0][1, feat])) for s, v in seen.items()}
    assert all(c != 0 and j != 0 for c, j in expected.values())

    rows = [r for r in _csv_rows(tmp_path / "csv") if r.get("concepts/attribution/c5")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]  # not thinned by log_every_n_steps=50
    for r in rows:
        c, j = expected[int(r["step"])]
        assert float(r["concepts/attribution/c5/chosen"]) == pytest.approx(c, rel=1e-6)
        assert float(r["concepts/attribution/c5/rejected"]) == pytest.approx(j, rel=1e-6)
        assert float(r["concepts/attribution/c5"]) == pytest.approx(c + j, rel=1e-5)

    (run_path,) = find_offline_runs(tmp_path / "wandb")
    run = read_run(run_path, wait=30)  # wandb.finish() may return before the file is flushed
    series = run.series("concepts/attribution/c5", step_key="trainer/global_step")
    assert [s for s, _ in series] == [0, 1, 2]
    for s, v in series:
        assert v == pytest.approx(sum(expected[s]), rel=1e-5)
    tables = run.series("concepts/attribution_top", step_key="trainer/global_step")
    assert [s for s, _ in tables] == [0, 2]
    table = run.table(tables[-1][1])
    assert table["columns"] == list(TABLE_COLUMNS)
    ups = [r for r in table["data"] if r[0] == "up"]
    downs = [r for r in table["data"] if r[0] == "down"]
    assert 1 <= len(ups) <= 3 and 1 <= len(downs) <= 3
    assert all(r[5] > 0 for r in ups) and all(r[5] < 0 for r in downs)
    assert [r[5] for r in ups] == sorted((r[5] for r in ups), reverse=True)
    # The table at step 2 ranks the window since the step-0 table (steps 1 and 2).
    for _, _, hook, feat, _, push, chosen, rejected, cumulative in table["data"]:
        window = seen[1][hook][:, feat] + seen[2][hook][:, feat]
        assert (push, chosen, rejected) == pytest.approx((float(window.sum()), float(window[0]), float(window[1])),
                                                         rel=1e-4, abs=1e-7)
        assert cumulative == pytest.approx(float(window.sum() + seen[0][hook][:, feat].sum()), rel=1e-4, abs=1e-7)
    window_all = torch.cat([(seen[1][h] + seen[2][h]).sum(0) for h in saes])
    assert ups[0][5] == pytest.approx(float(window_all.max()), rel=1e-5)
    assert downs[0][5] == pytest.approx(float(window_all.min()), rel=1e-5)
    names = {(POST0, 0): "zero", (PRE1, 1): "one"}
    assert all(r[4] == names.get((r[2], r[3]), "") for r in table["data"])


# --------------------------------------------------------------------------- state and settings


def test_state_roundtrip_and_state_key_includes_settings(tmp_path):
    saes = {POST0: random_sae(seed=1)}
    cb = ConceptAttribution(saes)
    trainer([cb], max_steps=2).fit(make_module(), loader(random_pairs(4, seed=10), 2))
    path = tmp_path / "state.pt"
    torch.save(cb.state_dict(), path)
    fresh = ConceptAttribution(saes)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.attributed_steps == 2 and fresh.last_step == 1
    assert torch.equal(fresh.total_push[POST0], cb.total_push[POST0])
    assert cb.state_key == fresh.state_key
    assert cb.state_key != ConceptAttribution(saes, every_n_steps=2).state_key
    assert cb.state_key != ConceptAttribution(saes, track=[(POST0, 1)]).state_key
    other = ConceptAttribution({POST0: random_sae(d_sae=64)})
    with pytest.raises(ValueError, match="SAE widths"):
        other.load_state_dict(cb.state_dict())


def test_bad_options_name_the_problem():
    sae = random_sae()
    with pytest.raises(ValueError, match="non-empty dict"):
        ConceptAttribution({})
    with pytest.raises(ValueError, match=r"saes\['x'\] is not a sae-lens SAE"):
        ConceptAttribution({"x": object()})
    with pytest.raises(ValueError, match="every_n_steps must be an integer >= 1"):
        ConceptAttribution({POST0: sae}, every_n_steps=0)
    with pytest.raises(ValueError, match="multiple of every_n_steps=2"):
        ConceptAttribution({POST0: sae}, every_n_steps=2, log_table_every=3)
    with pytest.raises(ValueError, match=r"feature 128 is out of range for hook .* \(d_sae=128\)"):
        ConceptAttribution({POST0: sae}, track=[(POST0, 128)])
    with pytest.raises(ValueError, match=r"track\[0\]: hook 'blocks.5.hook_resid_post' has no SAE"):
        ConceptAttribution({POST0: sae}, track=["blocks.5.hook_resid_post:1"])
    with pytest.raises(ValueError, match="bare feature id 3 is ambiguous"):
        ConceptAttribution({POST0: sae, PRE1: random_sae()}, track=[3])
    with pytest.raises(ValueError, match=r"labels\['nope'\]"):
        ConceptAttribution({POST0: sae}, labels={"nope": "x"})


def test_setup_refuses_unknown_hooks_wrong_widths_bad_batches_and_deepspeed():
    module = make_module()
    tr = trainer([])
    with pytest.raises(ValueError, match="unknown hook 'blocks.7.hook_resid_post'"):
        ConceptAttribution({"blocks.7.hook_resid_post": random_sae()}).setup(tr, module, "fit")
    with pytest.raises(ValueError, match=r"SAE d_in=32 but model width at 'blocks.0.hook_resid_post' is 64"):
        ConceptAttribution({POST0: random_sae(d_in=32)}).setup(tr, module, "fit")
    cb = ConceptAttribution({POST0: random_sae()})
    with pytest.raises(ValueError, match="completion_mask"):
        cb.on_train_batch_start(tr, module, {"input_ids": torch.zeros(2, 3, dtype=torch.long)}, 0)
    cb.setup(SimpleNamespace(strategy=FSDPStrategy()), module, "fit")  # FSDP is tested (tests/test_fsdp.py)
    deepspeed = SimpleNamespace(strategy=object.__new__(DeepSpeedStrategy))
    with pytest.raises(ValueError, match="not DeepSpeedStrategy .* allow_untested_strategy=True"):
        cb.setup(deepspeed, module, "fit")
    ConceptAttribution({POST0: random_sae()}, allow_untested_strategy=True).setup(deepspeed, module, "fit")
