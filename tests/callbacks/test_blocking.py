"""ConceptBlocking (BLOCK-EM): a penalty on blocked concepts that grow beyond the reference model."""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lightning_anatomy import ConceptBlocking, ConceptSet
from lightning_anatomy.callbacks.blocking import blocking_penalty
from lightning_anatomy.data import collate_pairs
from lightning_anatomy.models.tiny import build_tiny_model
from lightning_anatomy.module import DPOModule
from tests.helpers.concept_callback_helpers import (
    PAD,
    batches,
    hook_count,
    loader,
    random_pairs,
    random_sae,
    trainer,
)
from tests.helpers.intervention_helpers import MemoryLogger
from tests.helpers.resume_helpers import RestoresAfterSetup

HOOK = "blocks.0.hook_resid_post"  # block 0's output: hidden_states[1] of the tiny 2-layer GPT-2
TESTS = Path(__file__).resolve().parent
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True}

# Random SAEs reconstruct poorly; the fidelity warning is expected wherever one is checked.
pytestmark = pytest.mark.filterwarnings("ignore:SAE at .* explains only")


# --------------------------------------------------------------------------- helpers


def make_module(**kwargs) -> DPOModule:
    kwargs.setdefault("lr", 1e-3)
    return DPOModule(build_tiny_model("gpt2", seed=0), **kwargs)


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 7) -> None:
    """Move the policy away from the reference (which is a copy of the initial weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("h.0." in name or "lora_B" in name):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def directions(k: int = 2, seed: int = 0, actions: tuple[str, ...] = ("suppress", "amplify")) -> ConceptSet:
    g = torch.Generator().manual_seed(seed)
    concepts = ConceptSet.from_vectors(torch.randn(k, 64, generator=g), HOOK)
    return concepts.with_actions({name: actions[i % len(actions)] for i, name in enumerate(concepts.names)})


SAE = random_sae(seed=1)
SAE_CONCEPTS = {"up": (HOOK, 3), "down": (HOOK, 7, "amplify"), "third": f"{HOOK}:11"}


def blocking(kind: str, **kwargs) -> tuple[ConceptBlocking, Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """The callback, the score function it should use and the concepts' signs, for `kind`."""
    if kind == "sae":
        cb = ConceptBlocking(SAE_CONCEPTS, saes={HOOK: SAE}, **kwargs)
        feats = torch.tensor([3, 7, 11])
        return cb, lambda h: SAE.encode(h)[:, feats], torch.tensor([1.0, -1.0, 1.0])
    concepts = directions()
    vectors = torch.stack([c.vector / c.vector.norm() for c in concepts])
    return ConceptBlocking(concepts, **kwargs), lambda h: h @ vectors.T, torch.tensor([1.0, -1.0])


def block0(model, batch, reference: bool = False, ctx=nullcontext) -> torch.Tensor:
    """Block 0's output through transformers' own hidden_states (no hooks of ours involved)."""
    with ctx(), (torch.no_grad() if reference else nullcontext()):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     output_hidden_states=True).hidden_states[1]


def hand_penalty(module: DPOModule, batch, score, signs, lam: float, one_sided: bool = True,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """The documented formula written out: lam · mean_{t,c} relu(σ_c·(s_c(policy) − s_c(reference)))²."""
    if module.reference_mode == "peft":
        ref = block0(module.policy, batch, reference=True, ctx=module.policy.disable_adapter)
    else:
        ref = block0(module.reference, batch, reference=True)
    pol = block0(module.policy, batch)
    mask = batch["completion_mask"].bool() if mask is None else mask
    signed = (score(pol[mask]) - score(ref[mask])) * signs
    hinge = signed.clamp_min(0) if one_sided else signed
    return lam * hinge.square().mean()


def penalty_value(*args, **kwargs) -> float:
    return float(hand_penalty(*args, **kwargs).detach())


def hand_grads(module: DPOModule, micro_batches, penalty=None, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """∂/∂θ of Σ_micro scale·(DPO loss + penalty(module, batch)) by plain autograd."""
    module = copy.deepcopy(module)
    for batch in micro_batches:
        loss = module.compute_loss(batch)[0]
        if penalty is not None:
            loss = loss + penalty(module, batch)
        (scale * loss).backward()
    return {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}


class GradRecorder(L.Callback):
    """The policy's gradients of each optimizer step, before the step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append({n: p.grad.clone() for n, p in pl_module.policy.named_parameters() if p.grad is not None})


def fit(module: DPOModule, callbacks: list, pairs, batch_size: int, **kwargs) -> tuple[MemoryLogger, GradRecorder]:
    logger, grads = MemoryLogger(), GradRecorder()
    kwargs.setdefault("max_steps", 1)
    trainer([*callbacks, grads], logger=logger, log_every_n_steps=1, **kwargs).fit(module, loader(pairs, batch_size))
    return logger, grads


def assert_grads_close(got: dict, expected: dict, **tol) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **(tol or {"rtol": 1e-4, "atol": 1e-5}), msg=name)


def logged(logger: MemoryLogger, key: str) -> list[float]:
    return [v for _, v in logger.series(key)]


# --------------------------------------------------------------------------- the formula


def test_penalty_function_is_the_squared_hinge_mean():
    excess = torch.tensor([[0.5, 0.5], [-2.0, -2.0], [1.0, -1.0]])
    signs = torch.tensor([1.0, -1.0])
    # suppress column pays for +, amplify column for −: 0.25 + 4 + 1 + 1 over 6 entries
    assert float(blocking_penalty(excess, signs)) == pytest.approx((0.25 + 4 + 1 + 1) / 6)
    assert float(blocking_penalty(excess, signs, one_sided=False)) == pytest.approx(excess.square().mean().item())
    empty = torch.zeros(0, 2, requires_grad=True)
    assert float(blocking_penalty(empty, signs).detach()) == 0.0


@pytest.mark.parametrize("kind", ["sae", "direction"])
def test_gradient_equals_the_analytic_gradient_of_dpo_plus_the_penalty(kind):
    module = make_module()
    perturb(module.policy)
    pairs = random_pairs(4, seed=3)
    batch = batches(pairs, 4)[0]
    cb, score, signs = blocking(kind, lam=50.0)

    expected = hand_grads(module, [batch], lambda m, b: hand_penalty(m, b, score, signs, 50.0))
    vanilla = hand_grads(module, [batch])
    pen = penalty_value(module, batch, score, signs, 50.0)
    logger, grads = fit(module, [cb], pairs, 4)

    assert pen > 1e-3  # the penalty is live, so the comparison below tests it
    assert_grads_close(grads.steps[0], expected)
    assert any(not torch.allclose(grads.steps[0][n], vanilla[n], rtol=1e-3, atol=1e-6) for n in vanilla)
    assert logged(logger, "concepts/blocking/penalty") == [pytest.approx(pen, rel=1e-5)]


def test_logged_excess_is_the_mean_score_difference():
    module = make_module()
    perturb(module.policy)
    pairs = random_pairs(4, seed=3)
    batch = batches(pairs, 4)[0]
    cb, score, _ = blocking("sae", lam=1.0)
    mask = batch["completion_mask"].bool()
    expected = (score(block0(module.policy, batch, reference=True)[mask])
                - score(block0(module.reference, batch, reference=True)[mask])).mean(0)
    logger, _ = fit(module, [cb], pairs, 4)
    for name, value in zip(cb.names, expected.tolist()):
        assert logged(logger, f"concepts/blocking/{name}") == [pytest.approx(value, rel=1e-5, abs=1e-7)]


@pytest.mark.parametrize(
    "action, shift, one_sided, zero",
    [("suppress", -1.0, True, True), ("amplify", 1.0, True, True),
     ("suppress", -1.0, False, False), ("suppress", 1.0, True, False)],
)
def test_one_sided_is_exactly_zero_on_the_allowed_side_and_two_sided_is_not(action, shift, one_sided, zero):
    # Adding δ to block 0's MLP output bias moves block 0's output by exactly δ on every token,
    # so the excess along v̂ is shift·α everywhere.
    concepts = directions(k=1, actions=(action,))
    v = concepts[0].vector / concepts[0].vector.norm()
    alpha = 0.5
    module = make_module()
    with torch.no_grad():
        module.policy.transformer.h[0].mlp.c_proj.bias.add_(shift * alpha * v)
    pairs = random_pairs(4, seed=3)
    vanilla_module = copy.deepcopy(module)
    logger, grads = fit(module, [ConceptBlocking(concepts, lam=10.0, one_sided=one_sided)], pairs, 4)
    vanilla_logger, vanilla = fit(vanilla_module, [], pairs, 4)

    penalty = logged(logger, "concepts/blocking/penalty")[0]
    assert logged(logger, f"concepts/blocking/{concepts.names[0]}") == [pytest.approx(shift * alpha, rel=1e-4)]
    if zero:
        assert penalty == 0.0
        assert logged(logger, "train/loss") == logged(vanilla_logger, "train/loss")
        assert all(torch.equal(grads.steps[0][n], vanilla.steps[0][n]) for n in vanilla.steps[0])
    else:
        assert penalty == pytest.approx(10.0 * alpha**2, rel=1e-4)
        assert not all(torch.allclose(grads.steps[0][n], vanilla.steps[0][n]) for n in vanilla.steps[0])


@pytest.mark.parametrize("kind", ["sae", "direction"])
def test_penalty_is_zero_at_step_0_where_the_policy_is_the_reference(kind):
    pairs = random_pairs(4, seed=3)
    cb, _, _ = blocking(kind, lam=100.0, one_sided=False)
    logger, grads = fit(make_module(), [cb], pairs, 4, max_steps=2)
    _, vanilla = fit(make_module(), [], pairs, 4)
    assert logged(logger, "concepts/blocking/penalty")[0] == 0.0
    assert all(logged(logger, f"concepts/blocking/{n}")[0] == 0.0 for n in cb.names)
    assert all(torch.equal(grads.steps[0][n], vanilla.steps[0][n]) for n in vanilla.steps[0])
    assert logged(logger, "concepts/blocking/penalty")[1] > 0  # after one step they differ


# --------------------------------------------------------------------------- it works


def _completion_acts(model, pairs) -> torch.Tensor:
    batch = collate_pairs(pairs, PAD)
    return block0(model.eval(), batch, reference=True)[batch["completion_mask"].bool()]


@pytest.mark.slow
def test_blocking_keeps_the_feature_from_rising_on_held_out_pairs():
    train, held_out = random_pairs(16, seed=1), random_pairs(16, seed=2, start_id=100)

    def run(callbacks: list) -> DPOModule:
        module = make_module(lr=3e-3, scheduler="constant", beta=0.5)
        trainer(callbacks, max_steps=16).fit(module, loader(train, 4))
        return module

    def excess(module: DPOModule, pairs, feature: int) -> float:
        pol, ref = _completion_acts(module.policy, pairs), _completion_acts(module.reference, pairs)
        return float((SAE.encode(pol) - SAE.encode(ref))[:, feature].mean())

    vanilla = run([])
    # the feature vanilla DPO raises most on the training pairs
    rise = (SAE.encode(_completion_acts(vanilla.policy, train)) - SAE.encode(_completion_acts(vanilla.reference, train)))
    feature = int(rise.mean(0).argmax())
    blocked = run([ConceptBlocking({"target": (HOOK, feature)}, saes={HOOK: SAE}, lam=100.0)])

    vanilla_rise, blocked_rise = excess(vanilla, held_out, feature), excess(blocked, held_out, feature)
    assert vanilla_rise > 0.05
    assert blocked_rise < 0.5 * vanilla_rise


# --------------------------------------------------------------------------- accumulation, checkpointing


def test_gradient_accumulation_counts_each_micro_batch_once():
    module = make_module()
    perturb(module.policy)
    pairs = random_pairs(4, seed=5)
    micro = batches(pairs, 2)
    cb, score, signs = blocking("sae", lam=50.0)
    pens = [penalty_value(module, b, score, signs, 50.0) for b in micro]
    # Lightning backpropagates loss / accumulate_grad_batches for each micro-batch
    expected = hand_grads(module, micro, lambda m, b: hand_penalty(m, b, score, signs, 50.0), scale=0.5)
    logger, grads = fit(module, [cb], pairs, 2, accumulate_grad_batches=2)
    assert len(grads.steps) == 1 and cb.blocked_steps == 1
    assert_grads_close(grads.steps[0], expected)
    assert logged(logger, "concepts/blocking/penalty") == [pytest.approx(sum(pens) / 2, rel=1e-5)]


def test_gradient_checkpointing_counts_the_penalty_once():
    hook = "blocks.1.hook_attn_out"  # inside a checkpointed block: its hook re-runs in backward
    concepts = ConceptSet.from_vectors(torch.randn(2, 64, generator=torch.Generator().manual_seed(3)), hook)
    pairs = random_pairs(4, seed=6)

    def run(checkpointing: bool):
        module = make_module(gradient_checkpointing=checkpointing)
        perturb(module.policy)
        attn_calls: list[bool] = []
        module.policy.transformer.h[1].attn.register_forward_pre_hook(lambda m, a, k: attn_calls.append(True),
                                                                      with_kwargs=True)
        cb = ConceptBlocking(concepts, lam=50.0)
        calls: list[tuple[bool, bool]] = []  # (on the reference model, while a capture was due)
        original = cb._on_activation
        cb._on_activation = lambda h_, hidden, ref: (calls.append((ref, cb._armed)), original(h_, hidden, ref))[1]
        logger, grads = fit(module, [cb], pairs, 4)
        return logger, grads, attn_calls, calls

    runs = {checkpointing: run(checkpointing) for checkpointing in (False, True)}
    plain, ckpt = runs[False], runs[True]
    assert len(plain[2]) == 1 and len(ckpt[2]) == 2  # the checkpointed attention really re-ran in backward
    assert plain[3] == [(False, True), (True, True)]  # policy forward, then the reference's
    assert ckpt[3] == [(False, True), (True, True), (False, False)]  # + the recomputation, not captured
    assert logged(plain[0], "concepts/blocking/penalty")[0] > 0
    assert logged(ckpt[0], "concepts/blocking/penalty") == pytest.approx(logged(plain[0], "concepts/blocking/penalty"),
                                                                          rel=1e-6)
    assert_grads_close(ckpt[1].steps[0], plain[1].steps[0], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- reference modes


def test_peft_reference_is_captured_inside_the_reference_pass():
    module = make_module(reference="peft", peft_config=LORA)
    pairs = random_pairs(4, seed=8)
    batch = batches(pairs, 4)[0]
    cb, score, signs = blocking("sae", lam=50.0, one_sided=False)
    # LoRA's B starts at zero: the policy is the reference, the penalty is 0 at step 0
    logger, _ = fit(copy.deepcopy(module), [blocking("sae", lam=50.0)[0]], pairs, 4)
    assert logged(logger, "concepts/blocking/penalty") == [0.0]

    perturb(module.policy, scale=0.5)
    expected = hand_grads(module, [batch], lambda m, b: hand_penalty(m, b, score, signs, 50.0, one_sided=False))
    pen = penalty_value(module, batch, score, signs, 50.0, one_sided=False)
    peft_hooks = hook_count(module.policy)  # PEFT's and transformers' own (output_hidden_states above)
    logger, grads = fit(module, [cb], pairs, 4)
    assert pen > 1e-3
    assert {n for n in grads.steps[0]} == {n for n, p in module.policy.named_parameters() if p.requires_grad}
    assert_grads_close(grads.steps[0], expected)
    assert logged(logger, "concepts/blocking/penalty") == [pytest.approx(pen, rel=1e-5)]
    assert hook_count(module.policy) == peft_hooks and module.auxiliary_loss_names == ()


def test_precomputed_reference_is_refused_before_any_work(tmp_path):
    module = make_module(reference="precomputed", reference_cache_dir=str(tmp_path))
    cb, _, _ = blocking("direction")
    with pytest.raises(ValueError, match=r"reference='precomputed'.*reference='copy'.*reference='peft'"):
        trainer([cb]).fit(module, loader(random_pairs(4), 2))
    assert module.reference_table == {}  # refused before the reference log-probs were computed
    assert hook_count(module.policy) == 0


# --------------------------------------------------------------------------- clean-up


def test_hooks_and_the_loss_term_are_removed_after_fit_and_after_an_exception():
    class Failing(DPOModule):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("boom in step 1")
            return super().training_step(batch, batch_idx)

    cb, _, _ = blocking("sae", lam=1.0)
    live: list[tuple[int, int, int]] = []
    spy = L.pytorch.callbacks.LambdaCallback(on_train_batch_start=lambda tr, pl, *a: live.append(
        (hook_count(pl.policy), hook_count(pl.reference), len(pl.auxiliary_loss_names))))
    module = make_module()
    trainer([cb, spy], max_steps=2).fit(module, loader(random_pairs(4), 2))
    assert live == [(1, 1, 1)] * 2
    assert hook_count(module.policy) == hook_count(module.reference) == 0 and module.auxiliary_loss_names == ()
    assert cb.hooked == []

    failing = Failing(build_tiny_model("gpt2", seed=0), lr=1e-3)
    with pytest.raises(RuntimeError, match="boom in step 1"):
        trainer([cb, spy], max_steps=3).fit(failing, loader(random_pairs(6), 2))
    assert hook_count(failing.policy) == hook_count(failing.reference) == 0 and failing.auxiliary_loss_names == ()
    assert cb.hooked == [] and not cb._armed


def test_a_module_that_never_asks_for_the_term_is_an_error():
    class Ignoring(DPOModule):
        def training_step(self, batch, batch_idx):
            return self.compute_loss(batch)[0]  # training=False: auxiliary terms are skipped

    cb, _, _ = blocking("direction")
    module = Ignoring(build_tiny_model("gpt2", seed=0))
    with pytest.raises(RuntimeError, match="without asking for the blocking penalty"):
        trainer([cb]).fit(module, loader(random_pairs(2), 2))
    assert hook_count(module.policy) == 0 and module.auxiliary_loss_names == ()


# --------------------------------------------------------------------------- logging, warm-up, resume


def test_warmup_and_log_schedule():
    module = make_module()
    perturb(module.policy)
    cb, _, _ = blocking("direction", lam=10.0, warmup_steps=4, one_sided=False)
    factors: list[float] = []
    spy = L.pytorch.callbacks.LambdaCallback(on_train_batch_start=lambda *a: factors.append(cb.warmup_factor()))
    logger = MemoryLogger()
    trainer([cb, spy], max_steps=5, logger=logger, log_every_n_steps=2).fit(module, loader(random_pairs(10), 2))
    assert factors == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [step for step, _ in logger.series("concepts/blocking/penalty")] == [0, 2, 4]
    assert cb.blocked_steps == 5
    assert cb.state_dict()["blocked_steps"] == 5


@pytest.mark.slow
def test_resume_logs_what_the_uninterrupted_run_logs(tmp_path):
    pairs = random_pairs(4, seed=9)  # 2 batches of 2: one epoch = 2 optimizer steps, no shuffling

    def run(epochs: int, ckpt_path=None, **overrides) -> tuple[MemoryLogger, ConceptBlocking, L.Trainer]:
        cb, _, _ = blocking("sae", **{"lam": 20.0, "warmup_steps": 3, "one_sided": False, **overrides})
        logger = MemoryLogger()
        t = trainer([cb], max_steps=-1, max_epochs=epochs, logger=logger, log_every_n_steps=1, root=tmp_path)
        # a constant lr: a schedule's length would differ between the 1- and the 2-epoch run
        t.fit(make_module(scheduler="constant"), loader(pairs, 2), ckpt_path=ckpt_path)
        return logger, cb, t

    full, full_cb, _ = run(2)
    _, _, first = run(1)
    ckpt = tmp_path / "half.ckpt"
    first.save_checkpoint(ckpt)  # at an epoch end: the resumed run starts epoch 1 with its first batch
    resumed, resumed_cb, _ = run(2, ckpt_path=ckpt)

    keys = [f"concepts/blocking/{n}" for n in full_cb.names] + ["concepts/blocking/penalty", "train/loss"]
    for key in keys:
        series = dict(full.series(key))
        assert dict(resumed.series(key)) == {2: series[2], 3: series[3]}, key  # exact in fp32 on CPU
    assert full.series("concepts/blocking/penalty")[3][1] > 0
    assert resumed_cb.blocked_steps == full_cb.blocked_steps == 4

    with pytest.raises(ValueError, match="settings or concepts differ"):
        run(2, ckpt_path=ckpt, lam=5.0)
    # ... also where the strategy loads the checkpoint only after on_fit_start (as FSDP2 does)
    changed, _, _ = blocking("sae", lam=5.0, warmup_steps=3, one_sided=False)
    late = trainer([changed], max_steps=-1, max_epochs=2, root=tmp_path,
                   strategy=RestoresAfterSetup(device=torch.device("cpu")))
    with pytest.raises(ValueError, match="settings or concepts differ"):
        late.fit(make_module(scheduler="constant"), loader(pairs, 2), ckpt_path=ckpt)
    other = ConceptBlocking({"up": (HOOK, 3), "down": (HOOK, 7, "amplify"), "third": f"{HOOK}:11"},
                            saes={HOOK: random_sae(seed=2)}, lam=20.0, warmup_steps=3, one_sided=False)
    assert other.state_key == full_cb.state_key and other.fingerprint != full_cb.fingerprint
    with pytest.raises(ValueError, match="blocked other concepts"):
        other.load_state_dict(full_cb.state_dict())
    bad = {**full_cb.state_dict(), "settings": {**full_cb.state_dict()["settings"], "lam": 1.0}}
    with pytest.raises(ValueError, match="the checkpoint used settings"):
        full_cb.load_state_dict(bad)


def test_state_key_includes_the_settings():
    a = blocking("direction")[0]
    assert blocking("direction", lam=2.0)[0].state_key != a.state_key
    assert blocking("direction", one_sided=False)[0].state_key != a.state_key
    assert blocking("direction", sides="chosen")[0].state_key != a.state_key
    assert blocking("sae")[0].state_key != a.state_key


@pytest.mark.parametrize("sides, tokens", [("chosen", "completion"), ("rejected", "all"), ("both", "all"),
                                          ("both", "predicting")])
def test_sides_and_tokens_select_what_is_penalised(sides, tokens):
    module = make_module()
    perturb(module.policy)
    pairs = random_pairs(4, seed=3)
    batch = batches(pairs, 4)[0]
    _, score, signs = blocking("sae")
    mask = (batch["attention_mask"] if tokens == "all" else batch["completion_mask"]).bool().clone()
    if tokens == "predicting":  # the positions whose logits score a completion token
        mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    if sides == "chosen":
        mask[4:] = False
    elif sides == "rejected":
        mask[:4] = False
    expected = penalty_value(module, batch, score, signs, 3.0, mask=mask)
    logger, _ = fit(module, [blocking("sae", lam=3.0, sides=sides, tokens=tokens)[0]], pairs, 4)
    assert logged(logger, "concepts/blocking/penalty") == [pytest.approx(expected, rel=1e-5)]






# --------------------------------------------------------------------------- options


def test_bad_options_are_refused_by_name():
    concepts = directions()
    for lam in (0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="lam must be a finite number > 0"):
            ConceptBlocking(concepts, lam=lam)
    with pytest.raises(ValueError, match="one_sided must be True or False"):
        ConceptBlocking(concepts, one_sided="yes")
    with pytest.raises(ValueError, match="sides='left' is not one of"):
        ConceptBlocking(concepts, sides="left")
    with pytest.raises(ValueError, match="tokens='prompt' is not one of"):
        ConceptBlocking(concepts, tokens="prompt")
    for warmup in (-1, 1.5):
        with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0"):
            ConceptBlocking(concepts, warmup_steps=warmup)
    with pytest.raises(ValueError, match="no concept with action 'suppress' or 'amplify'"):
        ConceptBlocking(concepts.with_actions({n: "allow" for n in concepts.names}))
    with pytest.raises(ValueError, match="a ConceptSet carries its own directions"):
        ConceptBlocking(concepts, saes={HOOK: SAE})
    with pytest.raises(ValueError, match="need saes="):
        ConceptBlocking({"a": (HOOK, 3)})
    with pytest.raises(ValueError, match="must be a ConceptSet"):
        ConceptBlocking(torch.eye(3))
    with pytest.raises(ValueError, match=r"concepts\['a'\]: action 'allow' is not one of"):
        ConceptBlocking({"a": (HOOK, 3, "allow")}, saes={HOOK: SAE})
    with pytest.raises(ValueError, match="feature 999 is out of range"):
        ConceptBlocking({"a": (HOOK, 999)}, saes={HOOK: SAE})
    with pytest.raises(ValueError, match="hook 'blocks.1.hook_resid_post' has no SAE"):
        ConceptBlocking({"a": ("blocks.1.hook_resid_post", 3)}, saes={HOOK: SAE})
    with pytest.raises(ValueError, match="without '/'"):
        ConceptBlocking({"a/b": (HOOK, 3)}, saes={HOOK: SAE})
    assert ConceptBlocking([(HOOK, 3), f"{HOOK}:5"], saes={HOOK: SAE}).names == [f"{HOOK}:3", f"{HOOK}:5"]


def test_setup_refuses_modules_without_the_loss_hook_bad_hooks_widths_and_deepspeed():
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from tests.helpers.intervention_helpers import TinyLM

    t = trainer([])
    with pytest.raises(ValueError, match="register_auxiliary_loss.*TinyLM does not have"):
        ConceptBlocking(directions()).setup(t, TinyLM(), "fit")
    far = ConceptSet.from_vectors(torch.randn(1, 64), "blocks.7.hook_resid_post")
    with pytest.raises(ValueError, match="concept hook 'blocks.7.hook_resid_post' does not fit the policy"):
        ConceptBlocking(far).setup(t, make_module(), "fit")
    narrow = ConceptSet.from_vectors(torch.randn(1, 32), HOOK)
    with pytest.raises(ValueError, match="concept vectors have d=32 but the model's activation there has width 64"):
        ConceptBlocking(narrow).setup(t, make_module(), "fit")
    wide_sae = random_sae(d_in=32, d_sae=16)
    with pytest.raises(ValueError, match="SAE d_in=32"):
        ConceptBlocking({"a": (HOOK, 1)}, saes={HOOK: wide_sae}).setup(t, make_module(), "fit")
    ConceptBlocking(directions()).setup(SimpleNamespace(strategy=FSDPStrategy(), training=False), make_module(), "fit")
    deepspeed = SimpleNamespace(strategy=object.__new__(DeepSpeedStrategy), training=False)  # deepspeed not installed
    with pytest.raises(ValueError, match="not DeepSpeedStrategy.*allow_untested_strategy=True"):
        ConceptBlocking(directions()).setup(deepspeed, make_module(), "fit")
    ConceptBlocking(directions()).setup(deepspeed, make_module(), "validate")  # nothing to refuse outside fit


def test_built_from_a_yaml_config_entry(tmp_path):
    """As LightningCLI builds `trainer.callbacks` items: class_path + plain init_args."""
    import json

    from jsonargparse import ArgumentParser
    from lightning.pytorch import Callback

    sae_dir = tmp_path / "sae"
    SAE.save_model(str(sae_dir))
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback])
    entry = {"class_path": "lightning_anatomy.ConceptBlocking",
             "init_args": {"concepts": {"bad": [HOOK, 3]}, "saes": {HOOK: str(sae_dir)}, "lam": 5.0,
                           "warmup_steps": 2, "sides": "rejected"}}
    (cb,) = parser.instantiate_classes(parser.parse_args(["--callbacks", json.dumps([entry])])).callbacks
    assert isinstance(cb, ConceptBlocking) and cb.names == ["bad"] and cb.lam == 5.0 and cb.sides == "rejected"


def test_predicting_positions_are_the_completion_shifted_left():
    from lightning_anatomy.callbacks.blocking import predicting_positions

    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    assert predicting_positions(mask).tolist() == [[False, True, True, False, False], [True, True, True, True, False]]

