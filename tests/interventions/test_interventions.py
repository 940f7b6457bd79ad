"""Reward shaping (scores + callback), steering, DPOModule integration, and ConceptProjection under DDP."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_anatomy.concepts import ConceptSet
from lightning_anatomy.data import TokenizedPair, collate_pairs
from lightning_anatomy.interventions import reward_shaping
from lightning_anatomy.interventions.reward_shaping import compute_concept_scores, load_scores, save_scores
from lightning_anatomy.interventions.steering import signed_vectors, steer
from lightning_anatomy.models.tiny import build_tiny_model
from tests.helpers.intervention_helpers import TinyLM, hook_count, trainer, watch

PAD = 3
HOOK = "blocks.0.hook_resid_post"


def _pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return torch.randint(4, 260, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [TokenizedPair(10 + i, ids(2, 6), ids(2, 6) + [0], ids(3, 8) + [0]) for i in range(n)]


def _concepts(seed: int = 0) -> ConceptSet:
    g = torch.Generator().manual_seed(seed)
    vecs = torch.randn(3, 64, generator=g)
    base = ConceptSet.from_vectors(vecs, HOOK, names=["s", "a", "x"])
    return base.with_actions({"a": "amplify", "x": "allow"})


def _block0(model, ids: list[int]) -> torch.Tensor:
    """Block 0's output for one unpadded sequence, the way a reader would compute it by hand."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]


# --------------------------------------------------------------------------- reward-shaping scores


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_concept_scores_match_a_hand_computation(reduce):
    model = build_tiny_model("gpt2", num_layers=2)
    pairs, concepts = _pairs(5), _concepts()
    scores = compute_concept_scores(model, pairs, concepts, tokenizer_pad_id=PAD, batch_size=2, reduce=reduce)
    assert sorted(scores) == [p.row_id for p in pairs]

    s, a = concepts["s"].vector, concepts["a"].vector
    for p in pairs:
        sides = []
        for completion in (p.chosen_ids, p.rejected_ids):
            h = _block0(model, p.prompt_ids + completion)[len(p.prompt_ids):]  # completion tokens
            per_token = ((h @ (s / s.norm())) - (h @ (a / a.norm()))) / 2  # allow concept left out
            sides.append(per_token.mean() if reduce == "mean" else per_token.max())
        assert scores[p.row_id] == pytest.approx(float(sides[0] - sides[1]), abs=1e-5)


def test_concept_scores_from_an_sae_feature_and_the_cache(tmp_path, monkeypatch):
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=96))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    model = build_tiny_model("gpt2", num_layers=2)
    pairs = _pairs(4, seed=1)
    scores = compute_concept_scores(model, pairs, hook=HOOK, sae=sae, feature=[5, 7], tokenizer_pad_id=PAD,
                                    cache_dir=tmp_path)
    for p in pairs:
        sides = []
        for completion in (p.chosen_ids, p.rejected_ids):
            h = _block0(model, p.prompt_ids + completion)[len(p.prompt_ids):]
            with torch.no_grad():
                sides.append(sae.encode(h)[:, [5, 7]].mean(-1).mean())
        assert scores[p.row_id] == pytest.approx(float(sides[0] - sides[1]), abs=1e-5)

    (cached,) = tmp_path.glob("concept-scores-*.json")
    assert json.loads(cached.read_text())["meta"]["features"] == [5, 7]
    assert load_scores(cached) == scores

    def no_forward(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(reward_shaping, "capture_activations", no_forward)
    again = compute_concept_scores(model, pairs, hook=HOOK, sae=sae, feature=[5, 7], tokenizer_pad_id=PAD,
                                   cache_dir=tmp_path)
    assert again == scores
    with pytest.raises(AssertionError, match="cache should have answered"):  # another feature: another key
        compute_concept_scores(model, pairs, hook=HOOK, sae=sae, feature=5, tokenizer_pad_id=PAD, cache_dir=tmp_path)


def test_concept_score_errors_name_the_problem(tmp_path):
    model = build_tiny_model("gpt2", num_layers=2)
    pairs, concepts = _pairs(2), _concepts()
    with pytest.raises(ValueError, match="reduce='median' is not one of"):
        compute_concept_scores(model, pairs, concepts, tokenizer_pad_id=PAD, reduce="median")
    with pytest.raises(ValueError, match="row_id 10 appears more than once"):
        compute_concept_scores(model, pairs + pairs[:1], concepts, tokenizer_pad_id=PAD)
    two_hooks = concepts + ConceptSet.from_vectors(torch.randn(1, 64), "blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match="pass hook= to pick"):
        compute_concept_scores(model, pairs, two_hooks, tokenizer_pad_id=PAD)
    with pytest.raises(ValueError, match="no concept with action 'suppress' or 'amplify' at hook"):
        compute_concept_scores(model, pairs, concepts.select(action="allow"), tokenizer_pad_id=PAD)
    narrow = ConceptSet.from_vectors(torch.randn(1, 32), HOOK)
    with pytest.raises(ValueError, match="have d=32 but the model's activation there has width 64"):
        compute_concept_scores(model, pairs, narrow, tokenizer_pad_id=PAD)
    with pytest.raises(ValueError, match="tokenizer_pad_id must be"):
        compute_concept_scores(model, pairs, concepts, tokenizer_pad_id=None)
    with pytest.raises(ValueError, match="sae= needs feature="):
        compute_concept_scores(model, pairs, hook=HOOK, sae=object(), tokenizer_pad_id=PAD)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"scores": {"3": "high"}}))
    with pytest.raises(ValueError, match="score of row 3 is 'high'"):
        load_scores(bad)


# --------------------------------------------------------------------------- the RewardShaping callback


class PairLM(L.LightningModule):
    """A plain module on `[chosen; rejected]` batches that records what the step receives."""

    def __init__(self) -> None:
        super().__init__()
        self.model = build_tiny_model("gpt2", num_layers=2)
        self.offsets: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.offsets.append(batch.get("margin_offset"))
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _pair_loader(pairs, batch_size=2):
    return DataLoader(pairs, batch_size=batch_size, collate_fn=lambda b: collate_pairs(b, PAD))


def test_reward_shaping_adds_lam_times_the_score(tmp_path):
    from lightning_anatomy.callbacks import RewardShaping

    pairs = _pairs(4)
    scores = {p.row_id: 0.25 * (i - 1.5) for i, p in enumerate(pairs)}
    path = save_scores(scores, tmp_path / "scores.json")
    module = PairLM()
    trainer([RewardShaping(str(path), lam=2.0)], max_steps=2).fit(module, _pair_loader(pairs))
    assert [o.tolist() for o in module.offsets] == [[-0.75, -0.25], [0.25, 0.75]]  # 2.0 · 0.25·(i − 1.5)

    # two shaping callbacks add up
    module = PairLM()
    trainer([RewardShaping(scores, lam=2.0), RewardShaping(scores, lam=-1.0)], max_steps=1).fit(
        module, _pair_loader(pairs))
    assert module.offsets[0].tolist() == [-0.375, -0.125]

    with pytest.raises(KeyError, match="no concept score for row_id 12 \\(and 1 more"):
        trainer([RewardShaping({10: 1.0, 11: 1.0}, lam=1.0)], max_steps=2).fit(PairLM(), _pair_loader(pairs))
    with pytest.raises(ValueError, match="lam must be a finite number"):
        RewardShaping(scores, lam=float("inf"))
    with pytest.raises(ValueError, match="key 'x' is not an integer row id"):
        RewardShaping({"x": 1.0}, lam=1.0)


def test_reward_shaping_reaches_the_dpo_loss_exactly():
    from lightning_anatomy.callbacks import RewardShaping
    from lightning_anatomy.module import DPOModule

    pairs = _pairs(4, seed=3)
    policy = build_tiny_model("gpt2", num_layers=2)
    scores = compute_concept_scores(policy, pairs, _concepts(), tokenizer_pad_id=PAD)
    losses = []

    class Grab(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    module = DPOModule(policy, beta=0.1, lr=1e-9, reference="copy")
    trainer([RewardShaping(scores, lam=3.0), Grab()], max_steps=1).fit(module, _pair_loader(pairs, 4))
    # at step 0 the policy is the reference, so β·Δθ = 0 and the loss is −log σ(λ·ΔA) averaged
    delta = torch.tensor([scores[p.row_id] for p in pairs])
    assert losses[0] == pytest.approx(float(-F.logsigmoid(3.0 * delta).mean()), abs=1e-6)
    assert abs(losses[0] - math.log(2)) > 1e-3


# --------------------------------------------------------------------------- steering


def test_steer_shifts_only_the_chosen_rows():
    h = torch.zeros(4, 3, 5)
    v = torch.arange(5.0)
    out = steer(h, v, 0.5, "chosen")
    assert torch.equal(out[:2], (0.5 * v).expand(2, 3, 5)) and torch.equal(out[2:], h[2:])
    assert torch.equal(steer(h, v, 0.5, "rejected")[2:], (0.5 * v).expand(2, 3, 5))
    assert torch.equal(steer(h, v, 0.5, "both"), (0.5 * v).expand(4, 3, 5))
    with pytest.raises(ValueError, match="even number of rows, got 3"):
        steer(h[:3], v, 1.0, "chosen")
    with pytest.raises(ValueError, match="steering vector has d=4"):
        steer(h, v[:4], 1.0, "both")
    signed = signed_vectors(_concepts(), HOOK)
    c = _concepts()
    assert torch.equal(signed, torch.stack([c["s"].vector, -c["a"].vector]))


@pytest.mark.parametrize("sides", ["chosen", "rejected"])
def test_concept_steering_adds_alpha_v_to_one_half_while_training(sides):
    from lightning_anatomy.callbacks import ConceptSteering

    concepts = _concepts()
    v = concepts["s"].vector - concepts["a"].vector
    raw, steered = [], []

    class Probe(PairLM):
        def on_fit_start(self):  # after the callback's hook: sees the steered activation
            self.probe = watch(self.model, HOOK, acts=steered)

        def validation_step(self, batch, batch_idx):
            self.model(input_ids=batch["input_ids"])

    module = Probe()
    handle = watch(module.model, HOOK, acts=raw)  # before the callback's hook: the raw activation
    callback = ConceptSteering(concepts, strength=0.5, sides=sides)
    pairs = _pairs(4)
    trainer([callback], max_steps=1, limit_val_batches=1, val_check_interval=1).fit(
        module, _pair_loader(pairs), _pair_loader(pairs))
    handle.remove()
    module.probe.remove()
    assert len(raw) == len(steered) == 2  # one training forward, one validation forward
    diff = steered[0] - raw[0]
    steered_rows = slice(0, 2) if sides == "chosen" else slice(2, 4)
    other_rows = slice(2, 4) if sides == "chosen" else slice(0, 2)
    torch.testing.assert_close(diff[steered_rows], (0.5 * v).expand_as(diff[steered_rows]), rtol=0, atol=1e-6)
    assert torch.equal(diff[other_rows], torch.zeros_like(diff[other_rows]))
    assert torch.equal(steered[1], raw[1])  # validation is not steered
    assert hook_count(module.model) == 0


def test_concept_steering_cleans_up_and_validates():
    from lightning_anatomy.callbacks import ConceptSteering

    module = TinyLM(fail_at=0)
    callback = ConceptSteering(_concepts(), strength=1.0, sides="both")
    from tests.helpers.intervention_helpers import token_loader

    with pytest.raises(RuntimeError, match="planned failure"):
        trainer([callback]).fit(module, token_loader())
    assert hook_count(module.model) == 0
    with pytest.raises(ValueError, match="strength must be a finite non-zero number"):
        ConceptSteering(_concepts(), strength=0.0)
    with pytest.raises(ValueError, match="sides='prompt' is not one of"):
        ConceptSteering(_concepts(), strength=1.0, sides="prompt")
    with pytest.raises(ValueError, match="no concept with action 'suppress' or 'amplify'"):
        ConceptSteering(_concepts().select(action="allow"), strength=1.0)
    narrow = ConceptSet.from_vectors(torch.randn(1, 32), HOOK)
    with pytest.raises(ValueError, match="have d=32 but the model's activation there has width 64"):
        trainer([ConceptSteering(narrow, strength=1.0)]).fit(TinyLM(), token_loader())


# --------------------------------------------------------------------------- DPOModule integration


def test_projection_on_dpo_module_with_a_peft_reference_skips_the_reference_pass():
    pytest.importorskip("peft")
    from lightning_anatomy.callbacks import ConceptProjection
    from lightning_anatomy.module import DPOModule

    pairs = _pairs(4, seed=5)
    losses = []

    class Grab(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    def run(callbacks):
        losses.clear()
        module = DPOModule(build_tiny_model("gpt2", num_layers=2), reference="peft", lr=1e-9, beta=1.0,
                           peft_config={"r": 4, "target_modules": ["c_attn"], "lora_dropout": 0.0})
        trainer([*callbacks, Grab()], max_steps=1).fit(module, _pair_loader(pairs, 4))
        return losses[0], module

    plain, _ = run([])
    assert plain == pytest.approx(math.log(2), abs=1e-6)  # fresh LoRA: policy == reference
    ablated, module = run([ConceptProjection(_concepts(), mode="ablate")])
    # only the policy forward is ablated; an ablated reference would give log 2 again
    assert abs(ablated - math.log(2)) > 1e-4
    assert hook_count(module.policy) == 0



