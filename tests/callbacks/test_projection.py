"""GradientProjection / GradientAmplification / project_out math, and the ConceptProjection callback."""

from __future__ import annotations

import pytest
import torch

from lightning_anatomy.interventions.activation_edits import component_along, orthonormal_union, project_out
from lightning_anatomy.interventions.projection import GradientAmplification, GradientProjection


def _basis(d: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q.float()


def _grad_through(fn, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    h = h.detach().clone().requires_grad_(True)
    fn(h).backward(g)
    return h.grad


# --------------------------------------------------------------------------- the autograd Functions


def test_projection_removes_exactly_the_in_span_component():
    torch.manual_seed(0)
    Q = _basis(32, 3)
    h, g = torch.randn(4, 7, 32), torch.randn(4, 7, 32)
    out = GradientProjection.apply(h, Q)
    assert torch.equal(out, h)  # identity forward
    grad = _grad_through(lambda x: GradientProjection.apply(x, Q), h, g)

    in_span = (grad.double() @ Q.double()).norm() / g.double().norm()
    assert in_span < 1e-6
    Qd = Q.double()
    orth = g.double() - (g.double() @ Qd) @ Qd.T
    torch.testing.assert_close(grad.double(), orth, rtol=0, atol=1e-6)  # the orthogonal part is unchanged
    # a gradient already orthogonal to Q passes through unchanged
    torch.testing.assert_close(_grad_through(lambda x: GradientProjection.apply(x, Q), h, orth.float()),
                               orth.float(), rtol=0, atol=1e-6)


def test_projection_is_idempotent_and_linear():
    torch.manual_seed(1)
    Q = _basis(16, 2)
    h, g1, g2 = torch.randn(3, 16), torch.randn(3, 16), torch.randn(3, 16)
    once = _grad_through(lambda x: GradientProjection.apply(x, Q), h, g1)
    twice = _grad_through(lambda x: GradientProjection.apply(GradientProjection.apply(x, Q), Q), h, g1)
    torch.testing.assert_close(twice, once, rtol=0, atol=1e-6)
    # linear in g: loss scaling and accumulation commute with it
    summed = _grad_through(lambda x: GradientProjection.apply(x, Q), h, 1024.0 * g1 + g2)
    parts = 1024.0 * once + _grad_through(lambda x: GradientProjection.apply(x, Q), h, g2)
    torch.testing.assert_close(summed, parts, rtol=1e-6, atol=1e-4)


def test_basis_gets_no_gradient_and_inputs_are_checked():
    Q = _basis(8, 2).requires_grad_(True)
    h = torch.randn(2, 8, requires_grad=True)
    GradientProjection.apply(h, Q).sum().backward()
    assert Q.grad is None and h.grad is not None
    with pytest.raises(ValueError, match="last dimension is 8 but the basis Q has d=4"):
        GradientProjection.apply(h, _basis(4, 1))
    with pytest.raises(ValueError, match="must be 2-D"):
        GradientProjection.apply(h, torch.ones(8))
    with pytest.raises(ValueError, match="factor must be a finite number > 1"):
        GradientAmplification.apply(h, Q, 1.0)
    with pytest.raises(ValueError, match="factor must be a finite number > 1"):
        GradientAmplification.apply(h, Q, float("nan"))
    with pytest.raises(ValueError, match="project_out: the activation's last dimension"):
        project_out(torch.randn(3, 5), Q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_are_projected_in_fp32(dtype):
    torch.manual_seed(2)
    Q = _basis(64, 4)
    h = torch.randn(5, 64).to(dtype)
    g = (torch.randn(5, 64) * 3).to(dtype)
    grad = _grad_through(lambda x: GradientProjection.apply(x, Q), h, g)
    assert grad.dtype == dtype
    g32 = g.float()
    expected = (g32 - (g32 @ Q) @ Q.T).to(dtype)  # fp32 math, one rounding at the end
    assert torch.equal(grad, expected)
    # what is left along Q is only the final rounding to `dtype`, far below the input component
    left = (grad.float() @ Q).norm() / (g32 @ Q).norm()
    assert left < torch.finfo(dtype).eps / 2


def test_autocast_does_not_lower_the_projection_precision():
    torch.manual_seed(5)
    Q = _basis(64, 4)
    x = torch.randn(8, 64)
    h = torch.randn(8, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = project_out(x, Q)
        out = GradientProjection.apply(h, Q)
        (out * torch.randn(8, 64)).sum().backward()
        coords = component_along(x, Q)
    assert y.dtype == torch.float32 and coords.dtype == torch.float32
    assert (y @ Q).norm() / (x @ Q).norm() < 1e-6  # bf16 matmuls would leave ~3e-3
    assert (h.grad @ Q).norm() / h.grad.norm() < 1e-6
    torch.testing.assert_close(coords, x @ Q, rtol=0, atol=1e-6)


def test_amplification_scales_the_in_span_component_exactly():
    torch.manual_seed(3)
    Q = _basis(24, 2)
    h, g = torch.randn(6, 24), torch.randn(6, 24)
    grad = _grad_through(lambda x: GradientAmplification.apply(x, Q, 3.0), h, g)
    assert torch.equal(GradientAmplification.apply(h, Q, 3.0), h)
    torch.testing.assert_close(grad @ Q, 3.0 * (g @ Q), rtol=1e-5, atol=1e-5)
    Qd = Q.double()
    orth = lambda x: x.double() - (x.double() @ Qd) @ Qd.T  # noqa: E731
    torch.testing.assert_close(orth(grad), orth(g), rtol=0, atol=1e-5)
    torch.testing.assert_close(grad.double(), g.double() + 2.0 * (g.double() @ Qd) @ Qd.T, rtol=0, atol=1e-5)


def test_project_out_and_component_along():
    torch.manual_seed(4)
    Q = _basis(16, 3)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = project_out(x, Q)
    assert (y @ Q).abs().max() < 1e-5
    torch.testing.assert_close(y + (x @ Q) @ Q.T, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(project_out(y, Q), y, rtol=0, atol=1e-6)  # idempotent
    y.sum().backward()  # the gradient flows through the ablation: (I − QQᵀ)·1
    torch.testing.assert_close(x.grad, project_out(torch.ones(2, 5, 16), Q), rtol=0, atol=1e-6)
    xb = x.detach().bfloat16()
    assert project_out(xb, Q).dtype == torch.bfloat16
    assert torch.equal(project_out(xb, Q), (xb.float() - (xb.float() @ Q) @ Q.T).bfloat16())
    torch.testing.assert_close(component_along(x.detach(), Q), x.detach() @ Q)


def test_orthonormal_union_spans_both_bases():
    a, b = _basis(12, 2, seed=0), _basis(12, 2, seed=1)
    u = orthonormal_union([a, b, a])  # a repeated basis adds nothing
    assert u.shape == (12, 4) and u.dtype == torch.float32
    torch.testing.assert_close(u.T @ u, torch.eye(4), rtol=0, atol=1e-5)
    for q in (a, b):
        torch.testing.assert_close(project_out(q.T, u), torch.zeros(2, 12), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="different widths"):
        orthonormal_union([a, _basis(8, 1)])


# --------------------------------------------------------------------------- the ConceptProjection callback

HOOK = "blocks.1.hook_resid_post"


def _concepts(hook: str = HOOK, k: int = 2, seed: int = 0, action: str = "suppress"):
    from lightning_anatomy.concepts import ConceptSet

    g = torch.Generator().manual_seed(seed)
    return ConceptSet.from_vectors(torch.randn(k, 64, generator=g), hook, action=action)


def _fit_and_watch(callbacks, hook=HOOK, acts=None, **module_kwargs):
    """Fit 2 steps; returns the module, the in-memory logger, and the gradients arriving at `hook`."""
    from tests.helpers.intervention_helpers import MemoryLogger, TinyLM, token_loader, trainer, watch

    module = TinyLM(**module_kwargs)
    grads: list[torch.Tensor] = []
    handle = watch(module.model, hook, grads=grads, acts=acts)  # registered first: sees what goes upstream
    logger = MemoryLogger()
    trainer(callbacks, logger=logger).fit(module, token_loader())
    handle.remove()
    return module, logger, grads


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gradient_mode_removes_the_concept_from_the_gradient_at_the_hook(family):
    from lightning_anatomy.callbacks import ConceptProjection
    from tests.helpers.intervention_helpers import hook_count, in_span_fraction

    concepts = _concepts()
    Q = concepts.basis(HOOK)
    _, _, baseline = _fit_and_watch([], family=family)
    callback = ConceptProjection(concepts)
    module, logger, grads = _fit_and_watch([callback], family=family)

    assert len(grads) == len(baseline) == 2  # one backward per step
    assert min(in_span_fraction(g, Q) for g in baseline) > 0.05  # without it the concept gets gradient
    assert max(in_span_fraction(g, Q) for g in grads) < 1e-6
    # the first step's raw gradient is the baseline's (same weights, same batch): only the projection differs
    torch.testing.assert_close(grads[0].double(), project_out(baseline[0], Q).double(), rtol=0, atol=1e-6)
    assert hook_count(module.model) == 0 and callback.hooked == []
    # the logged share of the squared gradient norm inside the subspace is the one each step had
    logged = logger.series(f"concepts/projection/{HOOK}/grad_fraction")
    assert [step for step, _ in logged] == [0, 1]
    # step 0's raw gradient (before the projection) is the baseline's: same weights, same batch
    assert logged[0][1] == pytest.approx(in_span_fraction(baseline[0], Q) ** 2, rel=1e-4)
    assert 0 < logged[1][1] < 1


def test_hooks_are_removed_after_an_exception_mid_fit():
    from tests.helpers.intervention_helpers import TinyLM, hook_count, token_loader, trainer

    module = TinyLM(fail_at=1)
    callback = ConceptProjection_ = None  # noqa: F841
    from lightning_anatomy.callbacks import ConceptProjection

    callback = ConceptProjection(_concepts(), mode="both", layers="all_later")
    seen = []

    class Spy(__import__("lightning").pytorch.Callback):
        def on_train_batch_start(self, *args):
            seen.append(hook_count(module.model))

    with pytest.raises(RuntimeError, match="planned failure at step 1"):
        trainer([callback, Spy()], max_steps=4).fit(module, token_loader())
    assert seen == [2, 2]  # installed while training (blocks 1 and 2) ...
    assert hook_count(module.model) == 0 and callback.hooked == []  # ... and gone after the failure


def test_ablation_changes_the_forward_only_while_training():
    from lightning_anatomy.callbacks import ConceptProjection
    from tests.helpers.intervention_helpers import TinyLM, in_span_fraction, token_loader, trainer, watch

    concepts = _concepts()
    Q = concepts.basis(HOOK)

    class Probe(TinyLM):
        """Records block 2's input per stage: what the layers after the ablated hook receive."""

        def on_fit_start(self):  # runs after the callbacks' on_fit_start: sees the edited activation
            self.acts = {"train": [], "val": []}
            self.sink = self.acts["train"]
            watch(self.model, "blocks.2.hook_resid_pre", acts=self)

        def append(self, x):
            self.sink.append(x)

        def on_validation_start(self):
            self.sink = self.acts["val"]

        def on_validation_end(self):
            self.sink = self.acts["train"]

    module = Probe()
    t = trainer([ConceptProjection(concepts, mode="ablate")], val_check_interval=1, limit_val_batches=1)
    t.fit(module, token_loader(), token_loader(n=4, seed=1))
    assert len(module.acts["train"]) == 2 and len(module.acts["val"]) >= 1
    assert max(in_span_fraction(a, Q) for a in module.acts["train"]) < 1e-6  # ablated in training
    assert min(in_span_fraction(a, Q) for a in module.acts["val"]) > 0.05  # untouched in validation

    # after fit the model is exactly the plain model again (eval or train mode alike)
    batch = next(iter(token_loader()))
    plain = TinyLM()
    plain.load_state_dict(module.state_dict())
    for mode in (True, False):
        module.model.train(mode)
        plain.model.train(mode)
        assert torch.equal(module.model(input_ids=batch).logits, plain.model(input_ids=batch).logits)


def test_reference_passes_are_left_alone():
    from lightning_anatomy.callbacks import ConceptProjection
    from lightning_anatomy.model_access import reference_pass
    from tests.helpers.intervention_helpers import TinyLM, trainer

    module = TinyLM()
    callback = ConceptProjection(_concepts(), mode="ablate")
    t = trainer([callback])
    batch = torch.randint(4, 260, (2, 9))
    before = module.model(input_ids=batch).logits
    callback.setup(t, module, "fit")
    callback.on_fit_start(t, module)
    t.state.stage = "train"  # what the fit loop sets while training
    try:
        assert not torch.equal(module.model(input_ids=batch).logits, before)
        with reference_pass():
            assert torch.equal(module.model(input_ids=batch).logits, before)
    finally:
        callback.on_fit_end(t, module)
    assert torch.equal(module.model(input_ids=batch).logits, before)


@pytest.mark.parametrize(
    "layers, hook, expected",
    [
        ("own", HOOK, [HOOK]),
        ("all_later", "blocks.0.hook_resid_post",
         ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]),
        ("all_later", "blocks.1.hook_resid_pre",
         ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]),
        ("all_later", "blocks.2.hook_resid_post", ["blocks.2.hook_resid_post"]),
        ([0, "blocks.2.hook_mlp_out"], HOOK, ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]),
    ],
)
def test_layers_option_picks_the_hooked_points(layers, hook, expected):
    from lightning_anatomy.callbacks import ConceptProjection
    from tests.helpers.intervention_helpers import TinyLM, hook_count, trainer

    module = TinyLM()
    callback = ConceptProjection(_concepts(hook), layers=layers)
    t = trainer([callback])
    callback.setup(t, module, "fit")
    callback.on_fit_start(t, module)
    assert callback.hooked == expected and hook_count(module.model) == len(expected)
    callback.teardown(t, module, "fit")
    assert hook_count(module.model) == 0


def test_all_later_projects_every_later_block_and_unions_bases():
    from lightning_anatomy.callbacks import ConceptProjection
    from tests.helpers.intervention_helpers import in_span_fraction

    first, second = _concepts("blocks.0.hook_resid_post", k=1, seed=1), _concepts(HOOK, k=2, seed=2)
    concepts = first + second
    callback = ConceptProjection(concepts, layers="all_later")
    _, _, grads = _fit_and_watch([callback], hook="blocks.2.hook_resid_post")
    union = orthonormal_union([first.basis("blocks.0.hook_resid_post"), second.basis(HOOK)])
    assert union.shape[1] == 3
    assert max(in_span_fraction(g, union) for g in grads) < 1e-6


@pytest.mark.parametrize("checkpointing", ["non_reentrant", "reentrant"])
def test_gradient_checkpointing_projects_once_and_counts_once(checkpointing):
    from lightning_anatomy.callbacks import ConceptProjection
    from tests.helpers.intervention_helpers import in_span_fraction

    hook = "blocks.1.hook_mlp_out"  # inside the checkpointed block: its hooks re-run in backward
    concepts = _concepts(hook)
    Q = concepts.basis(hook)
    plain_forwards: list[torch.Tensor] = []
    ckpt_forwards: list[torch.Tensor] = []
    _, log_plain, g_plain = _fit_and_watch([ConceptProjection(concepts)], hook, plain_forwards, checkpointing=None)
    _, log_ckpt, g_ckpt = _fit_and_watch([ConceptProjection(concepts)], hook, ckpt_forwards,
                                         checkpointing=checkpointing)
    # checkpointing really re-ran the hooked module (and with it the projection hook) in backward
    assert len(plain_forwards) == 2 and len(ckpt_forwards) == 4
    assert len(g_ckpt) == len(g_plain) == 2
    assert max(in_span_fraction(g, Q) for g in g_ckpt) < 1e-6
    torch.testing.assert_close(g_ckpt[0], g_plain[0], rtol=1e-5, atol=1e-7)
    key = f"concepts/projection/{hook}/grad_fraction"
    plain_logged, ckpt_logged = [v for _, v in log_plain.series(key)], [v for _, v in log_ckpt.series(key)]
    assert len(plain_logged) == 2 and plain_logged[0] > 0
    assert ckpt_logged == pytest.approx(plain_logged, rel=1e-4)  # a re-run hook is not counted twice


def test_amplified_concepts_get_a_scaled_gradient():
    from lightning_anatomy.callbacks import ConceptProjection
    from tests.helpers.intervention_helpers import in_span_fraction

    concepts = _concepts(action="amplify")
    Q = concepts.basis(HOOK, "amplify")
    _, _, baseline = _fit_and_watch([])
    _, _, grads = _fit_and_watch([ConceptProjection(concepts, strength=3.0)])
    torch.testing.assert_close(grads[0] @ Q, 3.0 * (baseline[0] @ Q), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(project_out(grads[0], Q), project_out(baseline[0], Q), rtol=1e-4, atol=1e-7)
    assert in_span_fraction(grads[0], Q) > in_span_fraction(baseline[0], Q)


def test_options_are_validated_by_name():
    from lightning_anatomy.callbacks import ConceptProjection

    concepts = _concepts()
    with pytest.raises(ValueError, match="mode='project' is not one of"):
        ConceptProjection(concepts, mode="project")
    with pytest.raises(ValueError, match="layers='later' is not one of"):
        ConceptProjection(concepts, layers="later")
    with pytest.raises(ValueError, match=r"layers\[1\]=-1 is neither"):
        ConceptProjection(concepts, layers=[0, -1])
    with pytest.raises(ValueError, match=r"strength \(the amplify factor\) must be a finite number > 1"):
        ConceptProjection(concepts, strength=0.5)
    with pytest.raises(ValueError, match="no concept with action 'suppress' or 'amplify'"):
        ConceptProjection(_concepts(action="allow"))
    with pytest.raises(ValueError, match="must be a ConceptSet"):
        ConceptProjection(torch.eye(4))


def test_setup_refuses_bad_hooks_widths_and_untested_strategies():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from lightning_anatomy.callbacks import ConceptProjection
    from lightning_anatomy.concepts import ConceptSet
    from tests.helpers.intervention_helpers import TinyLM, trainer

    module = TinyLM()
    t = trainer([])
    with pytest.raises(ValueError, match="concept hook 'blocks.7.hook_resid_post' does not fit"):
        ConceptProjection(_concepts("blocks.7.hook_resid_post")).setup(t, module, "fit")
    narrow = ConceptSet.from_vectors(torch.randn(1, 32), HOOK)
    with pytest.raises(ValueError, match="have d=32 but the model's activation at 'blocks.1.hook_resid_post' has width 64"):
        ConceptProjection(narrow).setup(t, module, "fit")
    with pytest.raises(ValueError, match=r"layers\[0\]='blocks.9.hook_resid_post'"):
        ConceptProjection(_concepts(), layers=["blocks.9.hook_resid_post"]).setup(t, module, "fit")

    fsdp = SimpleNamespace(strategy=FSDPStrategy(), training=False)
    accepted = ConceptProjection(_concepts())
    accepted.setup(fsdp, module, "fit")  # FSDP is supported (activation hooks; bases replicated)
    assert list(accepted._targets) == [HOOK]
    # DeepSpeedStrategy subclasses DDPStrategy; built without __init__ (deepspeed is not installed)
    deepspeed = SimpleNamespace(strategy=object.__new__(DeepSpeedStrategy), training=False)
    with pytest.raises(ValueError, match="not DeepSpeedStrategy"):
        ConceptProjection(_concepts()).setup(deepspeed, module, "fit")
    allowed = ConceptProjection(_concepts(), allow_untested_strategy=True)
    allowed.setup(fsdp, module, "fit")
    assert list(allowed._targets) == [HOOK]
    ConceptProjection(_concepts()).setup(fsdp, module, "validate")  # nothing to refuse outside fit


def test_state_dict_refuses_a_resume_with_another_concept_set(tmp_path):
    from lightning_anatomy.callbacks import ConceptProjection
    from tests.helpers.intervention_helpers import TinyLM, token_loader, trainer

    first = ConceptProjection(_concepts(seed=0), layers="all_later")
    t = trainer([first], max_steps=1)
    t.fit(TinyLM(), token_loader())
    ckpt = tmp_path / "last.ckpt"
    t.save_checkpoint(ckpt)

    other = ConceptProjection(_concepts(seed=5), layers="all_later")
    assert other.state_key == first.state_key and other.fingerprint != first.fingerprint
    with pytest.raises(ValueError, match="trained with a different concept set"):
        trainer([other], max_steps=2).fit(TinyLM(), token_loader(), ckpt_path=ckpt)
    assert other.hooked == []

    # the same concepts (rebuilt, so not the same tensors) resume fine and train on
    same = ConceptProjection(_concepts(seed=0), layers="all_later")
    resumed = trainer([same], max_steps=2)
    resumed.fit(TinyLM(), token_loader(), ckpt_path=ckpt)
    assert resumed.global_step == 2

    # another basis of the same span (other vectors, other order) is the same concept set
    from lightning_anatomy.concepts import ConceptSet

    v = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    respanned = ConceptProjection(ConceptSet.from_vectors(torch.stack([v[1] - 2 * v[0], v[0] + v[1]]), HOOK),
                                  layers="all_later")
    assert respanned.fingerprint == first.fingerprint
    respanned.load_state_dict(first.state_dict())

    # settings are part of the key, so differently configured instances can coexist
    assert ConceptProjection(_concepts(), mode="ablate").state_key != first.state_key
    bad_settings = first.state_dict()
    bad_settings["settings"] = {**bad_settings["settings"], "amplify_factor": 9.0}
    with pytest.raises(ValueError, match="the checkpoint used settings"):
        ConceptProjection(_concepts(seed=0), layers="all_later").load_state_dict(bad_settings)


# --------------------------------------------------------------------------- mean ablation


def test_mean_ablate_keeps_the_reference_mean_and_the_orthogonal_part():
    from lightning_anatomy.interventions.activation_edits import mean_ablate

    torch.manual_seed(6)
    Q = _basis(16, 3)
    reference = torch.randn(40, 16) + 2.0  # tokens with a non-zero mean along Q
    mu = component_along(reference, Q).mean(0)
    out = mean_ablate(reference, Q, mu)
    torch.testing.assert_close(component_along(out, Q).mean(0), mu, rtol=0, atol=1e-6)  # the mean is kept
    torch.testing.assert_close(component_along(out, Q), mu.expand(40, 3), rtol=0, atol=1e-5)  # on every token
    torch.testing.assert_close(project_out(out, Q), project_out(reference, Q), rtol=0, atol=1e-6)  # rest untouched
    # μ = 0 is zero-ablation, exactly
    assert torch.equal(mean_ablate(reference, Q, torch.zeros(3)), project_out(reference, Q))
    # the gradient is the projection's, and the dtype is kept
    x = torch.randn(2, 5, 16, requires_grad=True)
    mean_ablate(x, Q, mu).sum().backward()
    torch.testing.assert_close(x.grad, project_out(torch.ones(2, 5, 16), Q), rtol=0, atol=1e-6)
    assert mean_ablate(x.detach().bfloat16(), Q, mu).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="the mean has shape \\(2,\\) but the basis Q has k=3"):
        mean_ablate(x, Q, torch.zeros(2))


class _PairsData(__import__("lightning").LightningDataModule):
    """The minimum ablation='mean' reads: `train_pairs`, `pad_token_id` and a train loader."""

    def __init__(self, n: int = 12, seed: int = 0) -> None:
        from tests.helpers.concept_callback_helpers import PAD, random_pairs

        super().__init__()
        self.train_pairs = random_pairs(n, seed=seed)
        self.pad_token_id = PAD

    def train_dataloader(self):
        from tests.helpers.concept_callback_helpers import loader

        return loader(self.train_pairs, 4)


POST0 = "blocks.0.hook_resid_post"


def _hand_mean(model, pairs, Q) -> torch.Tensor:
    """Mean of Qᵀh over the completion tokens of `pairs`, via transformers' hidden_states (block 0's output)."""
    from lightning_anatomy.data import collate_pairs
    from tests.helpers.concept_callback_helpers import PAD

    batch = collate_pairs(pairs, PAD)
    with torch.no_grad():
        hidden = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              output_hidden_states=True).hidden_states[1]
    return component_along(hidden[batch["completion_mask"].bool()], Q).double().mean(0).float()


def test_mean_ablation_replaces_the_component_by_its_reference_mean():
    import copy

    from lightning_anatomy.callbacks import ConceptProjection, ConceptSteering
    from lightning_anatomy.concepts import ConceptSet
    from lightning_anatomy.models.tiny import build_tiny_model
    from lightning_anatomy.module import DPOModule
    from tests.helpers.intervention_helpers import trainer, watch

    data = _PairsData()
    # the mean activation's direction (plus a random one): a component with a clear non-zero mean
    offset = _hand_mean(build_tiny_model("gpt2", seed=0), data.train_pairs, torch.eye(64))
    concepts = ConceptSet.from_vectors(torch.stack([offset, torch.randn(64)]), POST0)
    Q = concepts.basis(POST0)
    raw: list[torch.Tensor] = []
    edited: list[torch.Tensor] = []

    class Probe(DPOModule):
        def on_fit_start(self):  # after the callbacks' on_fit_start: sees the edited activation
            watch(self.policy, "blocks.1.hook_resid_pre", acts=edited)
            super().on_fit_start()

    module = Probe(build_tiny_model("gpt2", seed=0), lr=1e-3)
    initial = copy.deepcopy(module.policy)
    watch(module.policy, POST0, acts=raw)  # registered first: the raw activation
    callback = ConceptProjection(concepts, mode="ablate", ablation="mean", mean_pairs=8)
    # another training-time edit upstream, installed first: the measurement must not see it
    steer = ConceptSteering(ConceptSet.from_vectors(torch.randn(1, 64), "blocks.0.hook_resid_pre"), strength=0.05)
    trainer([steer, callback]).fit(module, datamodule=data)

    mu = callback.means[POST0]
    torch.testing.assert_close(mu, _hand_mean(initial, data.train_pairs[:8], Q), rtol=0, atol=1e-5)
    assert mu.norm() > 0.03  # a real offset (tiny random models have small activations), ≫ the tolerances below
    # the training forward: the mean's component on every token, the orthogonal part untouched
    # raw: the measurement forward (8 pairs, no edit), then the 2 training steps' (the reference is another model)
    assert len(raw) == 3 and len(edited) == 2 and raw[0].shape[0] == 16
    for before, after in zip(raw[1:], edited):
        coords = component_along(after, Q)
        torch.testing.assert_close(coords, mu.expand_as(coords), rtol=0, atol=1e-5)
        torch.testing.assert_close(project_out(after, Q), project_out(before, Q), rtol=0, atol=1e-5)
    assert "means" in callback.state_dict() and torch.equal(callback.state_dict()["means"][POST0], mu)


def test_zero_ablation_is_unchanged_and_mean_options_are_refused_by_name():
    from lightning_anatomy.callbacks import ConceptProjection
    from tests.helpers.intervention_helpers import TinyLM, token_loader, trainer

    concepts = _concepts()
    default = ConceptProjection(concepts, mode="ablate")
    assert default.ablation == "zero"
    assert ConceptProjection(concepts, mode="ablate", ablation="zero").state_key == default.state_key
    assert ConceptProjection(concepts, mode="ablate", ablation="mean").state_key != default.state_key
    assert "means" not in default.state_dict()
    with pytest.raises(ValueError, match="ablation='median' is not one of"):
        ConceptProjection(concepts, mode="ablate", ablation="median")
    with pytest.raises(ValueError, match="ablation='mean' .* mode='gradient' ablates nothing"):
        ConceptProjection(concepts, ablation="mean")
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="mean_pairs must be an integer >= 1"):
            ConceptProjection(concepts, mode="both", ablation="mean", mean_pairs=bad)
    # without a datamodule's train_pairs there is nothing to take the mean over
    module = TinyLM()
    callback = ConceptProjection(concepts, mode="ablate", ablation="mean")
    with pytest.raises(ValueError, match="measures the mean component on the datamodule's train_pairs"):
        trainer([callback]).fit(module, token_loader())
    assert callback.hooked == []
    # an old checkpoint (no ablation settings) still resumes a zero-ablation callback
    old = default.state_dict()
    old["settings"] = {k: v for k, v in old["settings"].items() if k != "ablation"}
    ConceptProjection(concepts, mode="ablate").load_state_dict(old)
    mean_state = {**old, "settings": {**old["settings"], "ablation": "mean", "mean_pairs": 64}}
    with pytest.raises(ValueError, match="holds no ablation means"):
        ConceptProjection(concepts, mode="ablate", ablation="mean").load_state_dict(mean_state)


def test_resume_keeps_the_measured_mean(tmp_path):
    from lightning_anatomy.callbacks import ConceptProjection
    from lightning_anatomy.models.tiny import build_tiny_model
    from lightning_anatomy.module import DPOModule
    from tests.helpers.intervention_helpers import trainer

    concepts = _concepts(POST0)
    first = ConceptProjection(concepts, mode="both", ablation="mean", mean_pairs=8)
    module = DPOModule(build_tiny_model("gpt2", seed=0), lr=1e-2)
    t = trainer([first], max_steps=2)
    t.fit(module, datamodule=_PairsData())
    ckpt = tmp_path / "last.ckpt"
    t.save_checkpoint(ckpt)
    saved = first.means[POST0]

    resumed = ConceptProjection(concepts, mode="both", ablation="mean", mean_pairs=8)
    t2 = trainer([resumed], max_steps=3)
    t2.fit(DPOModule(build_tiny_model("gpt2", seed=0), lr=1e-2), datamodule=_PairsData(), ckpt_path=ckpt)
    assert t2.global_step == 3
    assert torch.equal(resumed.means[POST0], saved)  # the initial weights' mean, not the trained ones'
    trained = _hand_mean(module.policy, _PairsData().train_pairs[:8], concepts.basis(POST0))
    assert not torch.allclose(trained, saved, atol=1e-4)
