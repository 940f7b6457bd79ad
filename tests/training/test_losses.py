"""The preference-loss family: hand-written formulas, TRL 1.16 parity, gradients, shaping, bad options."""

from __future__ import annotations

import math
import os
import types
from collections import defaultdict

import pytest
import torch

from lightning_anatomy.losses import LOSS_TYPES, PreferenceLossOutput, preference_loss, validate_loss_options

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BETA = 0.5
# (policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_len, rejected_len); with β = 0.5
# the margins z = β·Δ are 0.75, −2.5, 0 and 6 (both signs, zero, saturated; no hinge kink at z = 1).
PAIRS = [
    (-12.0, -14.5, -13.0, -14.0, 6, 9),
    (-30.5, -22.0, -29.0, -25.5, 12, 4),
    (-8.25, -9.5, -8.25, -9.5, 3, 3),
    (-40.0, -55.0, -44.0, -47.0, 20, 31),
]
# (loss_type, label_smoothing, discopop_tau): every loss type, plus cDPO and a second τ
CASES = [
    ("sigmoid", 0.0, 0.05),
    ("sigmoid", 0.1, 0.05),
    ("hinge", 0.0, 0.05),
    ("ipo", 0.0, 0.05),
    ("robust", 0.0, 0.05),
    ("robust", 0.2, 0.05),
    ("exo_pair", 1e-3, 0.05),
    ("exo_pair", 0.25, 0.05),
    ("nca_pair", 0.0, 0.05),
    ("sppo_hard", 0.0, 0.05),
    ("apo_zero", 0.0, 0.05),
    ("apo_down", 0.0, 0.05),
    ("discopop", 0.0, 0.05),
    ("discopop", 0.0, 0.7),
]


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def hand_loss(loss_type, pc, pr, rc, rr, lc, lr, beta, eps, tau, offset=0.0):
    """Each loss written out from its paper / TRL 1.16 with plain floats."""
    c, r = pc - rc, pr - rr
    z = beta * (c - r) + offset
    if loss_type == "sigmoid":
        return -(1 - eps) * _logsig(z) - eps * _logsig(-z)
    if loss_type == "hinge":
        return max(0.0, 1.0 - z)
    if loss_type == "ipo":
        return (c / max(lc, 1) - r / max(lr, 1) - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return ((1 - eps) * -_logsig(z) - eps * -_logsig(-z)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        return _sig(z) * (_logsig(z) - math.log(1 - eps)) + _sig(-z) * (_logsig(-z) - math.log(eps))
    if loss_type == "nca_pair":
        return -_logsig(beta * c) - 0.5 * _logsig(-beta * c) - 0.5 * _logsig(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return (1 - _sig(beta * c)) + _sig(beta * r)
    if loss_type == "apo_down":
        return _sig(beta * c) + (1 - _sig(beta * (c - r)))
    if loss_type == "discopop":
        m = _sig(z / tau)
        return (1 - m) * -_logsig(z) + m * math.exp(-z)
    raise AssertionError(loss_type)


def _tensors(pairs, dtype=torch.float32):
    cols = list(zip(*pairs))
    logps = [torch.tensor(col, dtype=dtype) for col in cols[:4]]
    lengths = [torch.tensor(col, dtype=torch.long) for col in cols[4:]]
    return logps, lengths


def _run(loss_type, eps, tau, pairs=PAIRS, beta=BETA, dtype=torch.float32, requires_grad=False, **kw):
    (pc, pr, rc, rr), (lc, lr) = _tensors(pairs, dtype)
    pc.requires_grad_(requires_grad)
    pr.requires_grad_(requires_grad)
    out = preference_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=eps,
        discopop_tau=tau,
        chosen_lengths=lc,
        rejected_lengths=lr,
        **kw,
    )
    return out, pc, pr


def test_loss_types_are_the_ten_published():
    # the other five TRL 1.16 types are tested in test_losses_trl116.py
    assert LOSS_TYPES[:10] == (
        "sigmoid",
        "hinge",
        "ipo",
        "robust",
        "exo_pair",
        "nca_pair",
        "sppo_hard",
        "apo_zero",
        "apo_down",
        "discopop",
    )
    assert {case[0] for case in CASES} == set(LOSS_TYPES[:10])


@pytest.mark.parametrize(("loss_type", "eps", "tau"), CASES)
def test_matches_hand_written_formula(loss_type, eps, tau):
    out, _, _ = _run(loss_type, eps, tau)
    assert isinstance(out, PreferenceLossOutput)
    expected = [hand_loss(loss_type, *p, BETA, eps, tau) for p in PAIRS]
    assert out.losses.dtype == torch.float32 and out.losses.shape == (len(PAIRS),)
    torch.testing.assert_close(out.losses, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    # rewards are β·(policy − ref), never length-normalised, detached
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([BETA * (p[0] - p[2]) for p in PAIRS]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([BETA * (p[1] - p[3]) for p in PAIRS]))
    if loss_type == "ipo":
        expected_logits = [BETA * ((p[0] - p[2]) / p[4] - (p[1] - p[3]) / p[5]) for p in PAIRS]
    else:
        expected_logits = [BETA * ((p[0] - p[2]) - (p[1] - p[3])) for p in PAIRS]
    torch.testing.assert_close(out.logits, torch.tensor(expected_logits))


@pytest.mark.parametrize(("loss_type", "eps", "tau"), CASES)
def test_gradients_reach_policy_logps_and_match_finite_differences(loss_type, eps, tau):
    out, pc, pr = _run(loss_type, eps, tau, requires_grad=True)
    assert out.losses.requires_grad
    assert not (
        out.chosen_rewards.requires_grad or out.rejected_rewards.requires_grad or out.logits.requires_grad
    )
    out.losses.sum().backward()
    h = 1e-5
    for i, p in enumerate(PAIRS):
        for col, grad in ((0, pc.grad), (1, pr.grad)):
            up, down = list(p), list(p)
            up[col] += h
            down[col] -= h
            fd = (hand_loss(loss_type, *up, BETA, eps, tau) - hand_loss(loss_type, *down, BETA, eps, tau)) / (
                2 * h
            )
            assert grad[i].item() == pytest.approx(fd, rel=1e-3, abs=1e-4), (i, col)
    assert pc.grad.abs().sum() > 0 and pr.grad.abs().sum() > 0


def test_sigmoid_gradient_is_exact_dpo_gradient():
    out, pc, pr = _run("sigmoid", 0.0, 0.05, requires_grad=True)
    out.losses.sum().backward()
    z = torch.tensor([BETA * ((p[0] - p[2]) - (p[1] - p[3])) for p in PAIRS])
    torch.testing.assert_close(pc.grad, -BETA * torch.sigmoid(-z))
    torch.testing.assert_close(pr.grad, BETA * torch.sigmoid(-z))


def test_margin_offset_shifts_sigmoid_logits_exactly():
    offset = torch.tensor([0.3, -1.2, 2.0, 0.0])
    base, _, _ = _run("sigmoid", 0.0, 0.05)
    shaped, pc, _ = _run("sigmoid", 0.0, 0.05, margin_offset=offset, requires_grad=True)
    torch.testing.assert_close(shaped.logits, base.logits + offset, rtol=0, atol=0)
    expected = [hand_loss("sigmoid", *p, BETA, 0.0, 0.05, offset=o) for p, o in zip(PAIRS, offset.tolist())]
    torch.testing.assert_close(shaped.losses, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    assert torch.equal(shaped.chosen_rewards, base.chosen_rewards)
    assert torch.equal(shaped.rejected_rewards, base.rejected_rewards)
    shaped.losses.sum().backward()
    torch.testing.assert_close(pc.grad, -BETA * torch.sigmoid(-(base.logits + offset)))
    zero, _, _ = _run("sigmoid", 0.0, 0.05, margin_offset=torch.zeros(4))
    assert torch.equal(zero.losses, base.losses)
    # cDPO smooths the shaped margin too
    smoothed, _, _ = _run("sigmoid", 0.1, 0.05, margin_offset=offset)
    expected = [hand_loss("sigmoid", *p, BETA, 0.1, 0.05, offset=o) for p, o in zip(PAIRS, offset.tolist())]
    torch.testing.assert_close(smoothed.losses, torch.tensor(expected), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_computes_in_fp32_whatever_the_input_dtype(dtype):
    (pc, pr, rc, rr), _ = _tensors(PAIRS, dtype)
    out = preference_loss(pc, pr, rc, rr, beta=BETA)
    ref = preference_loss(pc.float(), pr.float(), rc.float(), rr.float(), beta=BETA)
    for field in ("losses", "chosen_rewards", "rejected_rewards", "logits"):
        assert getattr(out, field).dtype == torch.float32
        assert torch.equal(getattr(out, field), getattr(ref, field))


def test_ipo_length_normalisation_and_zero_length_clamp():
    pairs = [(-6.0, -9.0, -5.0, -3.0, 4, 2)]
    out, _, _ = _run("ipo", 0.0, 0.05, pairs=pairs, beta=0.25)
    assert out.losses.item() == pytest.approx(((-1.0 / 4) - (-6.0 / 2) - 1 / (2 * 0.25)) ** 2, rel=1e-6)
    # doubling both lengths halves the normalised margin
    longer, _, _ = _run("ipo", 0.0, 0.05, pairs=[(-6.0, -9.0, -5.0, -3.0, 8, 4)], beta=0.25)
    assert longer.logits.item() == pytest.approx(out.logits.item() / 2, rel=1e-6)
    # like TRL, a zero-length completion counts as one token
    zero, _, _ = _run("ipo", 0.0, 0.05, pairs=[(-6.0, -9.0, -5.0, -3.0, 0, 2)], beta=0.25)
    one, _, _ = _run("ipo", 0.0, 0.05, pairs=[(-6.0, -9.0, -5.0, -3.0, 1, 2)], beta=0.25)
    assert torch.equal(zero.losses, one.losses)


def test_lengths_are_ignored_by_length_free_losses():
    (pc, pr, rc, rr), (lc, lr) = _tensors(PAIRS)
    with_lengths = preference_loss(pc, pr, rc, rr, beta=BETA, chosen_lengths=lc, rejected_lengths=lr)
    without = preference_loss(pc, pr, rc, rr, beta=BETA)
    assert torch.equal(with_lengths.losses, without.losses)


# --- TRL 1.16 parity -------------------------------------------------------------------------------


def _trl_dpo_loss(trl_trainer, loss_type, beta, eps, tau, pc, pr, rc, rr, lc, lr):
    """Run TRL's own `DPOTrainer._compute_loss` on a stand-in trainer and model.

    The stand-in model returns per-token log-probs whose sum is the given sequence log-prob, and the
    reference log-probs go in as precomputed (`precompute_ref_logps=True`), so TRL's loss code runs
    unchanged on exactly our inputs; `completion_mask` carries the lengths IPO divides by.
    """
    n = pc.numel()
    width = int(max(lc.max(), lr.max())) + 2
    completion_mask = torch.zeros(2 * n, width, dtype=torch.long)
    for row, length in enumerate(torch.cat([lc, lr]).tolist()):
        completion_mask[row, 1 : 1 + length] = 1
    log_probs = torch.zeros(2 * n, width - 1)
    log_probs[:, 0] = torch.cat([pc, pr])

    def model(**kwargs):
        shape = (kwargs["input_ids"].shape[0], width - 1)
        return types.SimpleNamespace(
            log_probs=log_probs,
            entropy=torch.zeros(shape),
            mean_logits=torch.zeros(shape),
            is_top1=torch.zeros(shape, dtype=torch.bool),
        )

    model.training = True
    trainer = types.SimpleNamespace(
        model=model,
        accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
        ),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=tau),
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * n, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = trl_trainer.DPOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


TRL_CASES = [c for c in CASES if not (c[0] == "sigmoid" and c[1] > 0)]  # TRL 1.16 has no cDPO (see losses.py)


@pytest.mark.parametrize(("loss_type", "eps", "tau"), TRL_CASES)
def test_matches_trl_dpo_trainer(loss_type, eps, tau):
    trl_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    gen = torch.Generator().manual_seed(1234)
    n, beta = 8, 0.2
    ref_c = -torch.rand(n, generator=gen) * 60 - 5
    ref_r = -torch.rand(n, generator=gen) * 60 - 5
    pol_c = ref_c + torch.randn(n, generator=gen) * 8
    pol_r = ref_r + torch.randn(n, generator=gen) * 8
    len_c = torch.randint(1, 25, (n,), generator=gen)
    len_r = torch.randint(1, 25, (n,), generator=gen)
    ours = preference_loss(
        pol_c,
        pol_r,
        ref_c,
        ref_r,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=eps,
        discopop_tau=tau,
        chosen_lengths=len_c,
        rejected_lengths=len_r,
    )
    trl_mean, metrics = _trl_dpo_loss(
        trl_trainer, loss_type, beta, eps, tau, pol_c, pol_r, ref_c, ref_r, len_c, len_r
    )
    assert ours.losses.mean().item() == pytest.approx(trl_mean.item(), rel=1e-5, abs=1e-6)
    for i in range(n):  # TRL reports only the mean: compare each pair as a batch of one
        one, _ = _trl_dpo_loss(
            trl_trainer,
            loss_type,
            beta,
            eps,
            tau,
            *(t[i : i + 1] for t in (pol_c, pol_r, ref_c, ref_r, len_c, len_r)),
        )
        assert ours.losses[i].item() == pytest.approx(one.item(), rel=1e-5, abs=1e-6), i
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-6)
    assert ours.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], rel=1e-6)
    margins = ours.chosen_rewards - ours.rejected_rewards
    assert margins.mean().item() == pytest.approx(metrics["rewards/margins"], rel=1e-6)
    assert (margins > 0).float().mean().item() == metrics["rewards/accuracies"]


# --- bad options and inputs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "dpo"}, "unknown loss_type='dpo'; valid loss types: ['sigmoid', 'hinge'"),
        ({"loss_type": "bco_pair", "label_smoothing": 0.1}, "no effect with loss_type='bco_pair'"),
        ({"loss_type": ["sigmoid", 3]}, "loss_type must be a string or a non-empty list of strings"),
        ({"beta": 0.0}, "beta must be a finite number > 0, got beta=0.0"),
        ({"beta": -0.1}, "got beta=-0.1"),
        ({"beta": float("nan")}, "got beta=nan"),
        ({"beta": float("inf")}, "got beta=inf"),
        ({"label_smoothing": 0.5}, "label_smoothing must lie in [0, 0.5), got label_smoothing=0.5"),
        ({"label_smoothing": -0.01}, "got label_smoothing=-0.01"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "no effect with loss_type='hinge'"),
        ({"loss_type": "discopop", "label_smoothing": 0.1}, "use one of ['sigmoid', 'robust', 'exo_pair', 'aot', 'aot_unpaired']"),
        ({"loss_type": "exo_pair"}, "recommends label_smoothing=1e-3"),
        ({"loss_type": "discopop", "discopop_tau": 0.0}, "discopop_tau must be a finite number > 0"),
        ({"loss_type": "ipo", "has_lengths": False}, "'ipo' needs chosen_lengths and rejected_lengths"),
        ({"loss_type": "ipo", "has_margin_offset": True}, "not supported with loss_type='ipo'"),
        ({"loss_type": "robust", "label_smoothing": 0.1, "has_margin_offset": True}, "only for ['sigmoid']"),
    ],
)
def test_validate_loss_options_rejects_with_named_option(kwargs, message):
    kwargs = {"loss_type": "sigmoid", **kwargs}
    with pytest.raises(ValueError) as info:
        validate_loss_options(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(("loss_type", "eps", "tau"), CASES)
def test_validate_loss_options_accepts_every_legal_case(loss_type, eps, tau):
    validate_loss_options(loss_type, BETA, eps, discopop_tau=tau)
    if loss_type == "sigmoid":
        validate_loss_options(loss_type, BETA, eps, has_margin_offset=True)


def test_preference_loss_rejects_missing_ipo_lengths_and_unsupported_offset():
    (pc, pr, rc, rr), (lc, _) = _tensors(PAIRS)
    with pytest.raises(ValueError, match="needs chosen_lengths and rejected_lengths"):
        preference_loss(pc, pr, rc, rr, loss_type="ipo")
    with pytest.raises(ValueError, match="needs chosen_lengths and rejected_lengths"):
        preference_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=lc)
    with pytest.raises(ValueError, match=r"not supported with loss_type='hinge'.*\['sigmoid'\]"):
        preference_loss(pc, pr, rc, rr, loss_type="hinge", margin_offset=torch.zeros(4))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"policy_rejected_logps": torch.zeros(3)},
            "policy_rejected_logps has 3 values but policy_chosen_logps has 4",
        ),
        ({"policy_chosen_logps": torch.zeros(4, 1)}, "policy_chosen_logps must have shape [B]"),
        ({"ref_chosen_logps": torch.zeros(())}, "ref_chosen_logps must have shape [B]"),
        ({"policy_chosen_logps": torch.zeros(0)}, "B >= 1"),
        ({"ref_rejected_logps": [0.0, 0.0, 0.0, 0.0]}, "ref_rejected_logps must be a torch.Tensor"),
        (
            {"ref_rejected_logps": torch.zeros(4, dtype=torch.bool)},
            "ref_rejected_logps must be a real-valued tensor",
        ),
        ({"margin_offset": torch.zeros(5)}, "margin_offset has 5 values"),
        (
            {"loss_type": "ipo", "rejected_lengths": torch.tensor([3, -2, 3, 3])},
            "rejected_lengths[1] = -2 is negative",
        ),
        ({"loss_type": "ipo", "chosen_lengths": torch.ones(2)}, "chosen_lengths has 2 values"),
    ],
)
def test_preference_loss_rejects_bad_tensors_naming_the_argument(change, message):
    (pc, pr, rc, rr), (lc, lr) = _tensors(PAIRS)
    args = {
        "policy_chosen_logps": pc,
        "policy_rejected_logps": pr,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
        "chosen_lengths": lc,
        "rejected_lengths": lr,
        **change,
    }
    positional = [
        args.pop(k)
        for k in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    ]
    with pytest.raises(ValueError) as info:
        preference_loss(*positional, beta=BETA, **args)
    assert message in str(info.value)
