"""The five loss types, mixtures, LD-DPO, f-divergences and WPO: equal to TRL 1.16's DPOTrainer.

`trl_1_16_dpo_loss` below is a frozen copy of the loss part of TRL 1.16.0's `DPOTrainer._compute_loss`
(trl/trainer/dpo_trainer.py), from per-token log-probs to the loss and the reward metrics, with
`self.<option>` turned into arguments. `test_frozen_copy_equals_installed_trl_source` runs the installed
TRL's own source text of that part (only its public options, no trainer) on the same inputs, so the copy
is checked against TRL wherever TRL 1.16 is installed, and stays a fixed oracle where it is not.
"""

from __future__ import annotations

import inspect
import itertools
import math
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

from lightning_anatomy.losses import (
    F_DIVERGENCE_TYPES,
    LOSS_TYPES,
    f_divergence_scores,
    ld_token_weights,
    preference_loss,
    validate_loss_options,
    wpo_weights,
)

TRL_VERSION = "1.16.0"


def trl_1_16_dpo_loss(
    per_token_logps,
    ref_per_token_logps,
    completion_mask,
    log_sum_sq_probs,
    *,
    loss_types,
    loss_weights=None,
    beta=0.1,
    label_smoothing=0.0,
    discopop_tau=0.05,
    ld_alpha=None,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    use_weighting=False,
):
    """TRL 1.16.0 `DPOTrainer._compute_loss`, loss and reward metrics (frozen copy).

    `per_token_logps` / `ref_per_token_logps` / `log_sum_sq_probs` are [2B, T-1] (zero off the completion,
    as TRL's fused head returns them), `completion_mask` [2B, T]; the batch is [chosen; rejected].
    """
    loss_weights = loss_weights or [1.0] * len(loss_types)
    device = per_token_logps.device
    shift_completion_mask = completion_mask[..., 1:]
    if ld_alpha is None:
        logps = per_token_logps.sum(dim=1)
        ref_logps = ref_per_token_logps.sum(dim=1)
    else:
        comp_pos = shift_completion_mask.cumsum(dim=1)
        comp_lens = shift_completion_mask.sum(dim=1).long()
        chosen_lens, rejected_lens = comp_lens.chunk(2, dim=0)
        shared_lens = torch.minimum(chosen_lens, rejected_lens)
        shared_lens = torch.cat([shared_lens, shared_lens], dim=0).to(device)
        shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1))
        tail_mask = comp_pos > shared_lens.unsqueeze(1)
        logps = (per_token_logps * shared_mask).sum(dim=1) + ld_alpha * (per_token_logps * tail_mask).sum(
            dim=1
        )
        ref_logps = (ref_per_token_logps * shared_mask).sum(dim=1) + ld_alpha * (
            ref_per_token_logps * tail_mask
        ).sum(dim=1)
    chosen_logps, rejected_logps = logps.chunk(2, dim=0)
    ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2, dim=0)

    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps

    if f_divergence_type == "reverse_kl":
        chosen_scores = chosen_logratios
        rejected_scores = rejected_logratios
    elif f_divergence_type == "forward_kl":
        chosen_scores = 1 - torch.exp(-chosen_logratios)
        rejected_scores = 1 - torch.exp(-rejected_logratios)
    elif f_divergence_type == "js_divergence":
        chosen_scores = math.log(2) + F.logsigmoid(chosen_logratios)
        rejected_scores = math.log(2) + F.logsigmoid(rejected_logratios)
    elif f_divergence_type == "alpha_divergence":
        if abs(f_alpha_divergence_coef - 1.0) < 1e-6:
            chosen_scores = chosen_logratios
            rejected_scores = rejected_logratios
        else:
            coef = 1.0 / (f_alpha_divergence_coef - 1.0)
            t_chosen = (f_alpha_divergence_coef - 1.0) * chosen_logratios
            t_rejected = (f_alpha_divergence_coef - 1.0) * rejected_logratios
            dtype = t_chosen.dtype
            clamp_max = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0}[dtype]
            t_chosen_float = torch.clamp(t_chosen.float(), max=clamp_max)
            t_rejected_float = torch.clamp(t_rejected.float(), max=clamp_max)
            chosen_scores = (torch.exp(t_chosen_float) - 1.0).to(dtype) * coef
            rejected_scores = (torch.exp(t_rejected_float) - 1.0).to(dtype) * coef
    else:
        raise ValueError(f_divergence_type)

    delta_score = chosen_scores - rejected_scores
    loss = 0.0
    for loss_type, loss_weight in zip(loss_types, loss_weights, strict=True):
        if loss_type == "sigmoid":
            per_sequence_loss = -F.logsigmoid(beta * delta_score)
        elif loss_type == "hinge":
            per_sequence_loss = torch.relu(1 - beta * delta_score)
        elif loss_type == "ipo":
            chosen_mask, rejected_mask = completion_mask.chunk(2, dim=0)
            chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
            rejected_avg_score = rejected_scores / rejected_mask.sum(dim=1).clamp(min=1.0)
            per_sequence_loss = (chosen_avg_score - rejected_avg_score - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":
            epsilon = torch.tensor(label_smoothing, device=device)
            qw = torch.sigmoid(beta * delta_score)
            log_qw = F.logsigmoid(beta * delta_score)
            log_pw = torch.log1p(-epsilon)
            ql = torch.sigmoid(-beta * delta_score)
            log_ql = F.logsigmoid(-beta * delta_score)
            log_pl = torch.log(epsilon)
            per_sequence_loss = qw * (log_qw - log_pw) + ql * (log_ql - log_pl)
        elif loss_type == "nca_pair":
            chosen_rewards = beta * chosen_logratios
            rejected_rewards = beta * rejected_logratios
            per_sequence_loss = (
                -F.logsigmoid(chosen_rewards)
                - 0.5 * F.logsigmoid(-chosen_rewards)
                - 0.5 * F.logsigmoid(-rejected_rewards)
            )
        elif loss_type == "robust":
            clean_loss_term = -(1 - label_smoothing) * F.logsigmoid(beta * delta_score)
            flipped_loss_term = -label_smoothing * F.logsigmoid(-beta * delta_score)
            per_sequence_loss = (clean_loss_term - flipped_loss_term) / (1 - 2 * label_smoothing)
        elif loss_type == "bco_pair":
            chosen_rewards = beta * chosen_logratios
            rejected_rewards = beta * rejected_logratios
            per_sequence_loss = -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
        elif loss_type == "sppo_hard":
            per_sequence_loss = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif loss_type == "aot":
            logratios_sorted, _ = torch.sort(chosen_logps - rejected_logps, dim=0)
            ref_logratios_sorted, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
            delta = logratios_sorted - ref_logratios_sorted
            per_sequence_loss = (
                -F.logsigmoid(beta * delta) * (1 - label_smoothing)
                - F.logsigmoid(-beta * delta) * label_smoothing
            )
        elif loss_type == "aot_unpaired":
            chosen_logratios_sorted, _ = torch.sort(chosen_logratios, dim=0)
            rejected_logratios_sorted, _ = torch.sort(rejected_logratios, dim=0)
            delta = chosen_logratios_sorted - rejected_logratios_sorted
            per_sequence_loss = (
                -F.logsigmoid(beta * delta) * (1 - label_smoothing)
                - F.logsigmoid(-beta * delta) * label_smoothing
            )
        elif loss_type == "apo_zero":
            per_sequence_loss = (
                1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
            )
        elif loss_type == "apo_down":
            per_sequence_loss = torch.sigmoid(beta * chosen_logratios) + (
                1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
            )
        elif loss_type == "discopop":
            logits = delta_score * beta
            log_ratio_modulation = torch.sigmoid(logits / discopop_tau)
            per_sequence_loss = (
                -F.logsigmoid(logits) * (1 - log_ratio_modulation) + torch.exp(-logits) * log_ratio_modulation
            )
        elif loss_type == "sft":
            chosen_mask, _ = shift_completion_mask.chunk(2, dim=0)
            chosen_per_token_logps, _ = per_token_logps.chunk(2, dim=0)
            batch_loss = -chosen_per_token_logps[chosen_mask.bool()].mean()
            per_sequence_loss = batch_loss.expand(chosen_per_token_logps.size(0))
        elif loss_type == "sigmoid_norm":
            chosen_mask, rejected_mask = completion_mask.chunk(2, dim=0)
            chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
            rejected_avg_score = rejected_scores / rejected_mask.sum(dim=1).clamp(min=1.0)
            per_sequence_loss = -F.logsigmoid(beta * (chosen_avg_score - rejected_avg_score))
        else:
            raise ValueError(loss_type)

        if use_weighting:
            completion_lengths = shift_completion_mask.sum(dim=1).clamp_min(1)
            with torch.no_grad():
                aligned_logps = (per_token_logps - log_sum_sq_probs) * shift_completion_mask
            weights = torch.exp(aligned_logps.sum(dim=1) / completion_lengths)
            chosen_weights, rejected_weights = weights.chunk(2, dim=0)
            per_sequence_loss = per_sequence_loss * chosen_weights * rejected_weights

        loss = loss + per_sequence_loss.mean() * loss_weight

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": chosen_logps.mean().item(),
        "logps/rejected": rejected_logps.mean().item(),
    }
    return loss, metrics


def random_batch(seed: int, pairs: int = 6, width: int = 14):
    """Per-token inputs as TRL's fused head gives them: zero off the completion; prompt first."""
    gen = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * pairs, width, dtype=torch.long)
    for row in range(2 * pairs):
        prompt = int(torch.randint(1, 4, (1,), generator=gen))
        length = int(torch.randint(1, width - prompt + 1, (1,), generator=gen))
        completion_mask[row, prompt : prompt + length] = 1
    shift = completion_mask[:, 1:].float()
    policy = -torch.rand(2 * pairs, width - 1, generator=gen) * 4 * shift
    ref = (policy + torch.randn(2 * pairs, width - 1, generator=gen) * 0.6).clamp(max=0) * shift
    # log Σ_v p_v² ≥ max log p: a sharp distribution (high value) down-weights a token's probability
    log_sum_sq = (-torch.rand(2 * pairs, width - 1, generator=gen) * 2) * shift
    return policy, ref, completion_mask, log_sum_sq


def ours(
    policy, ref, completion_mask, log_sum_sq, *, loss_types, ld_alpha=None, use_weighting=False, **options
):
    """Our path: per-token → sums (LD weights, WPO weights via the helpers) → preference_loss."""
    shift = completion_mask[:, 1:]
    token_weights = shift.float() if ld_alpha is None else ld_token_weights(shift, ld_alpha)
    logps = (policy * token_weights).sum(1)
    ref_logps = (ref * token_weights).sum(1)
    lengths = shift.sum(1)
    pairs = logps.shape[0] // 2
    validate_loss_options(loss_types, ld_alpha=ld_alpha, use_weighting=use_weighting, **options)
    return preference_loss(
        logps[:pairs],
        logps[pairs:],
        ref_logps[:pairs],
        ref_logps[pairs:],
        loss_type=loss_types,
        chosen_lengths=lengths[:pairs],
        rejected_lengths=lengths[pairs:],
        wpo_weights=wpo_weights(policy, log_sum_sq, shift) if use_weighting else None,
        sft_chosen_logps=(policy * shift).sum(1)[:pairs] if ld_alpha is not None else None,
        **options,
    )


SMOOTHED = {"robust": 0.2, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.15}
# (loss_types, options): every type alone; smoothing; TRL's mixtures; f-divergences; LD-DPO; WPO; combinations
CASES = [((k,), {"label_smoothing": SMOOTHED.get(k, 0.0)}) for k in LOSS_TYPES]
CASES += [(("exo_pair",), {"label_smoothing": 0.3}), (("discopop",), {"discopop_tau": 0.7})]
CASES += [(("aot",), {}), (("aot_unpaired",), {}), (("robust",), {})]
CASES += [
    (("sigmoid", "bco_pair", "sft"), {"loss_weights": [0.8, 0.2, 1.0]}),  # MPO, TRL's example
    (("sigmoid", "sft"), {"loss_weights": [1.0, 0.5]}),  # RPO
    (("sigmoid", "sft"), {}),
    (("ipo", "hinge", "aot"), {"loss_weights": [0.3, 2.0, 0.0]}),
]
F_DIV_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
for f_div, k in itertools.product(F_DIVERGENCE_TYPES[1:], F_DIV_TYPES):
    CASES.append(((k,), {"f_divergence_type": f_div, "label_smoothing": SMOOTHED.get(k, 0.0)}))
for coef in (0.5, 1.0, 2.0, -1.5, 30.0):  # 30: the exponent hits TRL's clamp at 80
    CASES.append((("sigmoid",), {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": coef}))
for ld_alpha, k in itertools.product((0.0, 0.5, 1.0), ("sigmoid", "ipo", "sft", "aot", "nca_pair")):
    CASES.append(((k,), {"ld_alpha": ld_alpha, "label_smoothing": SMOOTHED.get(k, 0.0)}))
for k in ("sigmoid", "ipo", "sft", "bco_pair", "exo_pair", "sigmoid_norm", "discopop", "apo_down"):
    CASES.append(((k,), {"use_weighting": True, "label_smoothing": SMOOTHED.get(k, 0.0)}))
CASES += [
    (
        ("sigmoid", "bco_pair", "sft"),
        {"loss_weights": [0.8, 0.2, 1.0], "ld_alpha": 0.3, "use_weighting": True},
    ),
    (("sigmoid_norm", "sft"), {"f_divergence_type": "js_divergence", "ld_alpha": 0.5, "use_weighting": True}),
    (("robust", "ipo"), {"f_divergence_type": "forward_kl", "label_smoothing": 0.1, "beta": 0.7}),
    (("aot_unpaired", "apo_zero"), {"ld_alpha": 0.2, "beta": 0.05, "label_smoothing": 0.05}),
]


def _case_id(case):
    loss_types, options = case
    return "+".join(loss_types) + "".join(f"-{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_trl_1_16_loss_metrics_and_gradients(case, seed):
    loss_types, options = case
    options = {"beta": 0.2, **options}
    policy, ref, completion_mask, log_sum_sq = random_batch(seed)
    policy_ours = policy.clone().requires_grad_(True)
    policy_trl = policy.clone().requires_grad_(True)

    out = ours(policy_ours, ref, completion_mask, log_sum_sq, loss_types=list(loss_types), **options)
    trl_loss, metrics = trl_1_16_dpo_loss(
        policy_trl, ref, completion_mask, log_sum_sq, loss_types=list(loss_types), **options
    )
    loss = out.losses.mean()
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-7)
    assert out.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-5, abs=1e-7)
    assert out.rejected_rewards.mean().item() == pytest.approx(
        metrics["rewards/rejected"], rel=1e-5, abs=1e-7
    )
    margins = out.chosen_rewards - out.rejected_rewards
    assert margins.mean().item() == pytest.approx(metrics["rewards/margins"], rel=1e-5, abs=1e-7)
    assert (margins > 0).float().mean().item() == metrics["rewards/accuracies"]

    loss.backward()
    trl_loss.backward()
    # on the completion tokens (elsewhere TRL's fused head returns constant zeros, so no gradient reaches the model)
    shift = completion_mask[:, 1:]
    torch.testing.assert_close(policy_ours.grad * shift, policy_trl.grad * shift, rtol=1e-5, atol=1e-7)
    if sum(options.get("loss_weights", [1.0] * len(loss_types))) > 0:
        assert policy_ours.grad.abs().sum() > 0


def test_every_trl_1_16_loss_type_and_f_divergence_is_covered():
    assert set(LOSS_TYPES) == {
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    }  # fmt: skip
    assert {k for types_, _ in CASES for k in types_} == set(LOSS_TYPES)
    assert {o.get("f_divergence_type", "reverse_kl") for _, o in CASES} == set(F_DIVERGENCE_TYPES)


# --- the frozen copy against the installed TRL ------------------------------------------------------


def _installed_trl_loss_source() -> str:
    """The installed TRL's own source of `_compute_loss` from the log-ratios to the summed loss."""
    trl = pytest.importorskip("trl")
    if trl.__version__ != TRL_VERSION:
        pytest.skip(f"installed TRL is {trl.__version__}, the frozen copy is TRL {TRL_VERSION}")
    from trl.trainer.dpo_trainer import DPOTrainer

    source = textwrap.dedent(inspect.getsource(DPOTrainer._compute_loss))
    start = source.index("chosen_logratios = chosen_logps - ref_chosen_logps")
    end = source.index("if self.aux_loss_enabled:", start)
    start = source.rindex("\n", 0, start) + 1  # from the start of those lines, for dedent
    end = source.rindex("\n", 0, end) + 1
    return textwrap.dedent(source[start:end])


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_frozen_copy_equals_installed_trl_source(case):
    """Run TRL 1.16's own loss code (its source text, with only its public options set) on the sums the
    frozen copy computes, and compare the two losses."""
    code = _installed_trl_loss_source()
    loss_types, options = case
    options = {"beta": 0.2, "loss_weights": None, "label_smoothing": 0.0, "discopop_tau": 0.05,
               "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5, "use_weighting": False,
               "ld_alpha": None, **options}  # fmt: skip
    policy, ref, completion_mask, log_sum_sq = random_batch(3)
    frozen, _ = trl_1_16_dpo_loss(
        policy, ref, completion_mask, log_sum_sq, loss_types=list(loss_types), **options
    )
    # TRL's LD-DPO sums (its lines before this part) from the frozen copy's own formula: check them via ours
    shift = completion_mask[:, 1:]
    weights = shift.float() if options["ld_alpha"] is None else ld_token_weights(shift, options["ld_alpha"])
    logps, ref_logps = (policy * weights).sum(1), (ref * weights).sum(1)
    chosen_logps, rejected_logps = logps.chunk(2)
    ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2)
    public_options = types.SimpleNamespace(
        beta=options["beta"],
        loss_types=list(loss_types),
        loss_weights=options["loss_weights"] or [1.0] * len(loss_types),
        label_smoothing=options["label_smoothing"],
        f_divergence_type=options["f_divergence_type"],
        f_alpha_divergence_coef=options["f_alpha_divergence_coef"],
        use_weighting=options["use_weighting"],
        args=types.SimpleNamespace(discopop_tau=options["discopop_tau"]),
    )
    scope = {
        "self": public_options, "torch": torch, "F": F, "math": math, "device": torch.device("cpu"),
        "chosen_logps": chosen_logps, "rejected_logps": rejected_logps,
        "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps,
        "completion_mask": completion_mask, "shift_completion_mask": shift, "per_token_logps": policy,
        "seq_len": shift.size(1), "outputs": types.SimpleNamespace(log_sum_sq_probs=log_sum_sq),
    }  # fmt: skip
    if "sft" in loss_types and options["use_weighting"]:
        # TRL 1.16 multiplies the expanded sft batch loss in place (`per_sequence_loss *= weights`), which
        # torch refuses for B > 1: TRL cannot run sft with use_weighting. The frozen copy (and ours) use
        # the evident meaning, the same product out of place, which equals TRL at B = 1.
        with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
            exec(compile(code, "trl/trainer/dpo_trainer.py", "exec"), scope)
        one = [t[[0, 6]] for t in (policy, ref, completion_mask, log_sum_sq)]
        frozen, _ = trl_1_16_dpo_loss(*one, loss_types=list(loss_types), **options)
        weights = (
            one[2][:, 1:].float()
            if options["ld_alpha"] is None
            else ld_token_weights(one[2][:, 1:], options["ld_alpha"])
        )
        logps, ref_logps = (one[0] * weights).sum(1), (one[1] * weights).sum(1)
        scope.update(
            chosen_logps=logps[:1], rejected_logps=logps[1:], ref_chosen_logps=ref_logps[:1],
            ref_rejected_logps=ref_logps[1:], completion_mask=one[2], shift_completion_mask=one[2][:, 1:],
            per_token_logps=one[0], outputs=types.SimpleNamespace(log_sum_sq_probs=one[3]),
        )  # fmt: skip
    exec(compile(code, "trl/trainer/dpo_trainer.py", "exec"), scope)
    assert frozen.item() == pytest.approx(scope["loss"].item(), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.25, 1.0])
def test_ld_token_weights_match_trl_1_16_shared_and_tail_masks(ld_alpha):
    _, _, completion_mask, _ = random_batch(5, pairs=8)
    shift = completion_mask[:, 1:]
    comp_pos = shift.cumsum(dim=1)
    chosen_lens, rejected_lens = shift.sum(dim=1).long().chunk(2, dim=0)
    shared = torch.minimum(chosen_lens, rejected_lens).repeat(2).unsqueeze(1)
    trl = ((comp_pos > 0) & (comp_pos <= shared)).float() + ld_alpha * (comp_pos > shared).float()
    weights = ld_token_weights(shift, ld_alpha)
    assert torch.equal(
        weights, trl * shift
    )  # equal on the completion, 0 elsewhere (TRL's log-probs are 0 there)
    # the shared part has the same token count in both responses of a pair
    full = (weights == 1).sum(1)
    assert torch.equal(full[:8], full[8:]) or ld_alpha == 1.0


# --- hand-checked properties -------------------------------------------------------------------------


def test_rpo_alpha_is_sigmoid_plus_sft():
    """DPOModule's `rpo_alpha` (loss + α·NLL of the chosen tokens) is TRL's ["sigmoid", "sft"], [1, α]."""
    policy, ref, completion_mask, log_sum_sq = random_batch(7)
    shift = completion_mask[:, 1:]
    logps, ref_logps, lengths = (policy * shift).sum(1), (ref * shift).sum(1), shift.sum(1)
    n = logps.shape[0] // 2
    alpha = 0.4
    mixed = preference_loss(
        logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], loss_type=["sigmoid", "sft"], loss_weights=[1.0, alpha],
        chosen_lengths=lengths[:n], rejected_lengths=lengths[n:],
    )  # fmt: skip
    dpo = preference_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:])
    nll = -logps[:n].sum() / lengths[:n].sum()
    assert mixed.losses.mean().item() == pytest.approx((dpo.losses.mean() + alpha * nll).item(), rel=1e-6)


def test_bco_pair_is_stateless_and_per_pair():
    """TRL 1.16's bco_pair has no running reward mean: the same pair gives the same loss in any batch."""
    c, r, rc, rr = (
        torch.tensor([-3.0, -9.0]),
        torch.tensor([-5.0, -4.0]),
        torch.tensor([-4.0, -8.0]),
        torch.zeros(2),
    )
    beta = 0.5
    both = preference_loss(c, r, rc, rr, loss_type="bco_pair", beta=beta).losses
    again = preference_loss(c, r, rc, rr, loss_type="bco_pair", beta=beta).losses
    first = preference_loss(c[:1], r[:1], rc[:1], rr[:1], loss_type="bco_pair", beta=beta).losses
    assert torch.equal(both, again) and both[0].item() == pytest.approx(first.item(), rel=1e-7)
    expected = -F.logsigmoid(torch.tensor(beta * (-3.0 + 4.0))) - F.logsigmoid(torch.tensor(-beta * -5.0))
    assert both[0].item() == pytest.approx(expected.item(), rel=1e-6)


def test_aot_sorts_the_batch_so_pair_order_does_not_matter():
    policy, ref, completion_mask, log_sum_sq = random_batch(9)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    full = torch.cat([perm, perm + 6])
    a = ours(policy, ref, completion_mask, log_sum_sq, loss_types=["aot"], beta=0.3).losses
    b = ours(
        policy[full], ref[full], completion_mask[full], log_sum_sq[full], loss_types=["aot"], beta=0.3
    ).losses
    torch.testing.assert_close(a, b)


def test_f_divergence_scores_limits():
    u = torch.linspace(-3, 3, 13)
    torch.testing.assert_close(f_divergence_scores(u, "alpha_divergence", 1.0), u)
    torch.testing.assert_close(
        f_divergence_scores(u, "alpha_divergence", 1.0 + 1e-4), u, rtol=1e-3, atol=1e-3
    )
    torch.testing.assert_close(
        f_divergence_scores(u, "alpha_divergence", 0.0), 1 - torch.exp(-u)
    )  # α=0: forward KL
    torch.testing.assert_close(
        f_divergence_scores(u, "js_divergence"), torch.log(2 * torch.exp(u) / (torch.exp(u) + 1))
    )
    assert torch.equal(f_divergence_scores(u, "reverse_kl"), u)


def test_wpo_weights_are_detached_probability_products():
    policy, _, completion_mask, log_sum_sq = random_batch(11, pairs=3)
    policy.requires_grad_(True)
    shift = completion_mask[:, 1:]
    w = wpo_weights(policy, log_sum_sq, shift)
    assert w.shape == (3,) and not w.requires_grad and bool((w > 0).all())
    per_seq = torch.exp(((policy - log_sum_sq) * shift).sum(1) / shift.sum(1))
    torch.testing.assert_close(w, (per_seq[:3] * per_seq[3:]).detach())


# --- refusals, with TRL's meaning ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": ["sigmoid", "dpo"]}, "unknown loss_type='dpo'"),
        ({"loss_type": []}, "non-empty list of strings"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "got 1 weights [1.0] for 2 loss types"),
        ({"loss_type": "sigmoid", "loss_weights": [1.0, 2.0]}, "same length as loss_type"),
        (
            {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, -1.0]},
            "entry for 'sft' must be a finite number >= 0",
        ),
        (
            {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, float("nan")]},
            "finite number >= 0, got nan",
        ),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": "1,1"}, "loss_weights must be a list of numbers"),
        (
            {"loss_type": "nca_pair", "f_divergence_type": "js_divergence"},
            "not supported with loss_type ['nca_pair']",
        ),
        (
            {"loss_type": ["sigmoid", "bco_pair"], "f_divergence_type": "forward_kl"},
            "use f_divergence_type='reverse_kl' with these losses",
        ),
        (
            {"loss_type": "aot", "f_divergence_type": "alpha_divergence"},
            "not supported with loss_type ['aot']",
        ),
        ({"f_divergence_type": "kl"}, "unknown f_divergence_type='kl'"),
        ({"f_alpha_divergence_coef": float("inf")}, "f_alpha_divergence_coef must be a finite number"),
        ({"loss_type": "aot", "use_weighting": True}, "'aot' and 'aot_unpaired' sort the batch"),
        ({"loss_type": ["sigmoid", "aot_unpaired"], "use_weighting": True}, "use_weighting=True (WPO)"),
        ({"ld_alpha": 1.5}, "ld_alpha must lie in [0, 1] or be None, got ld_alpha=1.5"),
        ({"ld_alpha": -0.1}, "got ld_alpha=-0.1"),
        ({"loss_type": ["sigmoid", "exo_pair"]}, "'exo_pair' needs label_smoothing > 0"),
        ({"loss_type": ["bco_pair", "sft"], "label_smoothing": 0.1}, "has no effect"),
        (
            {"loss_type": "sigmoid_norm", "has_lengths": False},
            "loss_type='sigmoid_norm' needs chosen_lengths",
        ),
        ({"loss_type": ["sigmoid", "sft"], "has_lengths": False}, "loss_type='sft' needs chosen_lengths"),
        (
            {"loss_type": ["sigmoid", "bco_pair"], "has_margin_offset": True},
            "not supported with loss_type='bco_pair'",
        ),
    ],
)
def test_illegal_combinations_are_refused_naming_the_option(kwargs, message):
    kwargs = {"loss_type": "sigmoid", **kwargs}
    with pytest.raises(ValueError) as info:
        validate_loss_options(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
        {"loss_type": "aot", "label_smoothing": 0.1},
        {"loss_type": ["sigmoid", "sft"], "has_margin_offset": True},  # reward shaping keeps working with RPO
        {"loss_type": "sft", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 2.0},
        {"loss_type": "bco_pair", "use_weighting": True, "ld_alpha": 0.0},
    ],
)
def test_legal_combinations_are_accepted(kwargs):
    validate_loss_options(**kwargs)


def test_preference_loss_refuses_wpo_with_aot_and_offset_with_sft_alone():
    c = torch.tensor([-3.0, -4.0])
    with pytest.raises(ValueError, match="sort the batch"):
        preference_loss(c, c, c, c, loss_type="aot", wpo_weights=torch.ones(2))
    with pytest.raises(ValueError, match="not supported with loss_type='sft'"):
        preference_loss(c, c, c, c, loss_type="sft", chosen_lengths=torch.ones(2), rejected_lengths=torch.ones(2),
                        margin_offset=torch.zeros(2))  # fmt: skip
    with pytest.raises(ValueError, match="wpo_weights has 3 values"):
        preference_loss(c, c, c, c, wpo_weights=torch.ones(3))


# --- per-token statistics behind entropy / mean_token_accuracy / WPO ------------------------------------


def test_token_stats_equal_trl_1_16_chunked_logprob_kernel():
    """`token_stats` against TRL's own `ChunkedLogProbFunction` (its torch path on CPU), fp32."""
    kernels = pytest.importorskip("trl.kernels.chunked_logprob")
    from lightning_anatomy.token_stats import token_stats

    gen = torch.Generator().manual_seed(21)
    hidden, weight, bias = (
        torch.randn(37, 16, generator=gen),
        torch.randn(50, 16, generator=gen),
        torch.randn(50, generator=gen),
    )
    targets = torch.randint(0, 50, (37,), generator=gen)
    logits = hidden @ weight.T + bias
    targets[:5] = logits[:5].argmax(-1)  # some hits for the accuracy
    logps, entropy, log_sum_sq, mean_logits, is_top1 = kernels.ChunkedLogProbFunction.apply(
        hidden, weight, bias, targets, 1.0, 16
    )
    ours = token_stats(logits, targets)
    torch.testing.assert_close(ours.logps, logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.entropy, entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.log_sum_sq_probs, log_sum_sq, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.is_top1, is_top1) and int(is_top1.sum()) >= 5
    assert not (ours.entropy.requires_grad or ours.log_sum_sq_probs.requires_grad)
