"""DPOModule with TRL 1.16's options on a tiny model: one step equal to TRL's formulas, metrics, refusals.

The oracle is `trl_1_16_dpo_loss` (the frozen copy of TRL 1.16's loss, test_losses_trl116.py) fed with
per-token log-probs, entropies, log Σp² and top-1 hits computed by brute force from the model's full
logits, and TRL's own metric formulas for `entropy`, `mean_token_accuracy` and `num_tokens`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LambdaCallback

from lightning_anatomy import DPOModule, PreferenceDataModule
from lightning_anatomy.data import read_preferences, tokenize_rows
from lightning_anatomy.data.tokenize import collate_pairs
from lightning_anatomy.data.toy import make_toy_preferences
from lightning_anatomy.losses import LOSS_TYPES
from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer
from lightning_anatomy.reference_sync import SyncReference
from tests.helpers.intervention_helpers import MemoryLogger
from tests.training.test_losses_trl116 import SMOOTHED, trl_1_16_dpo_loss


def _batch(tok, n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    pairs = tokenize_rows(read_preferences(make_toy_preferences(n, seed=seed)), tok, max_length=48,
                          max_prompt_length=24)  # fmt: skip
    batch = collate_pairs(pairs, tok.pad_token_id)
    return batch


def _brute_force(model, batch):
    """TRL's per-token inputs from the full logits: log p, entropy, log Σp², top-1 (0 off the completion)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["input_ids"][:, 1:]
    shift = batch["completion_mask"][:, 1:].float()
    log_p = logits.log_softmax(-1)
    token_logps = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * shift
    entropy = -(log_p.exp() * log_p).sum(-1) * shift
    log_sum_sq = torch.logsumexp(2 * log_p, -1) * shift
    top1 = (logits.argmax(-1) == labels) & shift.bool()
    return token_logps, entropy, log_sum_sq, top1


STEP_CASES = [
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0], "ld_alpha": 0.4, "use_weighting": True},
    {"loss_type": "sigmoid_norm", "f_divergence_type": "js_divergence", "ld_alpha": 0.0},
    {"loss_type": "ipo", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5, "use_weighting": True},
    {"loss_type": "aot", "label_smoothing": 0.1},
    {"loss_type": "aot_unpaired"},
    {"loss_type": "sft", "ld_alpha": 0.5},
    {"loss_type": "hinge", "f_divergence_type": "forward_kl"},
]


@pytest.mark.parametrize("chunk", [4, None])
@pytest.mark.parametrize("options", STEP_CASES)
def test_tiny_model_step_equals_trl_1_16(options, chunk):
    tok = build_tiny_tokenizer()
    module = DPOModule(build_tiny_model("gpt2", seed=0, vocab_size=len(tok)), beta=0.3, logps_chunk_size=chunk,
                       **options)  # fmt: skip
    with torch.no_grad():  # a policy that differs from its reference
        for p in module.policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batch = _batch(tok)
    loss, stats = module.compute_loss(batch)

    policy_tokens, entropy, log_sum_sq, top1 = _brute_force(module.policy, batch)
    ref_tokens = _brute_force(module.reference, batch)[0]
    types = options["loss_type"] if isinstance(options["loss_type"], list) else [options["loss_type"]]
    trl_options = {k: v for k, v in options.items() if k != "loss_type"}
    trl_loss, metrics = trl_1_16_dpo_loss(policy_tokens, ref_tokens, batch["completion_mask"], log_sum_sq,
                                          loss_types=types, beta=0.3, **trl_options)  # fmt: skip
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    # the sums behind rewards/logps come from two forwards (chunked head vs full logits): fp32 rounding of
    # a sum of |log p| ~ 1e2 is ~1e-5 relative to that sum, not to the (small) difference
    scale = float(policy_tokens.abs().sum(1).mean())
    for name, value in metrics.items():
        assert stats[name].item() == pytest.approx(value, rel=1e-5, abs=1e-5 * scale), name
    shift = batch["completion_mask"][:, 1:]
    n = shift.shape[0] // 2
    assert stats["entropy"].item() == pytest.approx((entropy.sum() / shift.sum()).item(), rel=1e-5)
    assert stats["mean_token_accuracy"].item() == pytest.approx((top1[:n].sum() / shift[:n].sum()).item(), rel=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_trains_the_policy(loss_type):
    """TRL's habit: one optimizer step with each loss type changes the parameters."""
    tok = build_tiny_tokenizer()
    module = DPOModule(build_tiny_model("gpt2", seed=0, vocab_size=len(tok)), loss_type=loss_type, lr=1e-2,
                       label_smoothing=SMOOTHED.get(loss_type, 0.0))  # fmt: skip
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    optimizer = torch.optim.SGD(module.policy.parameters(), lr=1.0)
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # off the reference: sppo/apo gradients are 0 there by symmetry
    loss, _ = module.compute_loss(_batch(tok), training=True)
    loss.backward()
    optimizer.step()
    changed = [k for k, v in module.policy.state_dict().items() if not torch.equal(v, before[k])]
    assert changed


def _fit(root, max_steps: int, **options: Any) -> tuple[MemoryLogger, list[int], DPOModule]:
    L.seed_everything(0, verbose=False)
    tok = build_tiny_tokenizer()
    data = PreferenceDataModule(make_toy_preferences(40, seed=0), tok, batch_size=4, max_length=48,
                                max_prompt_length=24, val_fraction=0.2, shuffle=True, seed=3)  # fmt: skip
    module = DPOModule(build_tiny_model("gpt2", seed=0, vocab_size=len(tok)), lr=1e-3, **options)
    logger, tokens = MemoryLogger(), []
    seen = LambdaCallback(on_train_batch_start=lambda tr, pl, b, i: tokens.append(int(b["attention_mask"].sum())))
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=logger, callbacks=[seen],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, log_every_n_steps=1, val_check_interval=2,
                        check_val_every_n_epoch=None, accumulate_grad_batches=2,
                        default_root_dir=str(root))  # fmt: skip
    trainer.fit(module, datamodule=data)
    return logger, tokens, module


@pytest.mark.slow
def test_num_tokens_is_cumulative_and_new_metrics_are_logged(tmp_path):
    logger, tokens, _ = _fit(tmp_path, 3)
    logged = [v for _, v in logger.series("train/num_tokens")]
    per_step = [tokens[0] + tokens[1], tokens[2] + tokens[3], tokens[4] + tokens[5]]
    assert logged == [float(sum(per_step[: i + 1])) for i in range(3)]
    for key in ("train/entropy", "train/mean_token_accuracy", "val/entropy", "val/mean_token_accuracy"):
        values = [v for _, v in logger.series(key)]
        assert values, key
        assert all(0 <= v for v in values) and (key.endswith("entropy") or all(v <= 1 for v in values))


def test_sync_ref_model_adds_the_tr_dpo_callback(tmp_path):
    _, _, module = _fit(tmp_path, 2, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    (sync,) = [c for c in module.trainer.callbacks if isinstance(c, SyncReference)]
    assert (sync.alpha, sync.sync_steps, sync.syncs) == (0.5, 1, 2)
    assert not module.configure_callbacks() == []
    plain = DPOModule(build_tiny_model("gpt2", seed=0), lr=1e-3)
    assert plain.configure_callbacks() == []


MISSING = "/nonexistent/model/dir"  # loading it would fail with another error: the refusal comes first


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sync_ref_model": True, "reference": "peft", "peft_config": {"r": 2}}, "not supported with PEFT"),
        ({"sync_ref_model": True, "reference": "precomputed"}, "cannot be combined with reference='precomputed'"),
        ({"sync_ref_model": True, "ref_model_mixup_alpha": 2.0}, "ref_model_mixup_alpha must lie in [0, 1]"),
        ({"sync_ref_model": True, "ref_model_sync_steps": 0}, "ref_model_sync_steps must be an integer >= 1"),
        ({"loss_type": "aot", "use_weighting": True}, "'aot' and 'aot_unpaired' sort the batch"),
        ({"loss_type": "apo_zero", "f_divergence_type": "js_divergence"}, "not supported with loss_type ['apo_zero']"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights must have the same length"),
        ({"ld_alpha": 2.0}, "ld_alpha must lie in [0, 1]"),
        ({"ld_alpha": 0.5, "reference": "precomputed"}, "ld_alpha with reference='precomputed' is not supported"),
        ({"loss_type": ["sigmoid", "sft"], "rpo_alpha": 0.5}, "both add the chosen NLL"),
        ({"loss_type": ["sigmoid", "exo_pair"]}, "'exo_pair' needs label_smoothing > 0"),
    ],
)
def test_illegal_options_are_refused_before_the_model_loads(options, message):
    with pytest.raises(ValueError) as info:
        DPOModule(MISSING, **options)
    assert message in str(info.value)


def test_rpo_alpha_equals_trl_sigmoid_plus_sft():
    tok = build_tiny_tokenizer()
    batch = _batch(tok, seed=2)
    rpo = DPOModule(build_tiny_model("gpt2", seed=0, vocab_size=len(tok)), rpo_alpha=0.7)
    mixed = DPOModule(build_tiny_model("gpt2", seed=0, vocab_size=len(tok)), loss_type=["sigmoid", "sft"],
                      loss_weights=[1.0, 0.7])  # fmt: skip
    for module in (rpo, mixed):
        torch.manual_seed(5)
        with torch.no_grad():
            for p in module.policy.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    assert rpo.compute_loss(batch)[0].item() == pytest.approx(mixed.compute_loss(batch)[0].item(), rel=1e-6)
