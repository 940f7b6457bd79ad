"""The reference strategies (copy / precomputed / peft) through their one interface, and the
surface `DPOModule` offers callbacks (`reference_mode`, `reference_forward_module()`,
`reference_table`, `compute_loss`, auxiliary losses)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from lightning_anatomy import DPOModule
from lightning_anatomy.data import collate_pairs, tokenize_rows
from lightning_anatomy.data.rows import read_preferences
from lightning_anatomy.data.toy import make_toy_preferences
from lightning_anatomy.logprobs import pair_logps, sequence_logps
from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer
from lightning_anatomy.preference_module import PreferenceModule
from lightning_anatomy.reference import (
    CopyReference,
    PeftReference,
    PrecomputedReference,
    ReferenceModel,
    make_reference,
)

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def pairs(tok):
    return tokenize_rows(read_preferences(make_toy_preferences(6)), tok, max_length=48, max_prompt_length=32)


class Host(torch.nn.Module):
    """The least a strategy needs of its module (`ReferenceHost`): the policy, a copy reference or
    None, a device and the `[chosen; rejected]` scoring forward."""

    def __init__(self, policy: torch.nn.Module, reference: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.policy, self.reference = policy, reference

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def concatenated_forward(self, model, batch, *, with_stats=False):
        return pair_logps(model, batch, chunk_size=7, with_stats=with_stats)  # several chunks


def _oracle(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force: full logits of `model` in eval mode, log-softmax, sum over the completion tokens."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, _ = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
    n = logps.shape[0] // 2
    return logps[:n], logps[n:]


def _perturb(model: torch.nn.Module, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def test_copy_and_precomputed_give_the_initial_policys_logps_after_the_policy_moved(tok, pairs, tmp_path):
    initial = build_tiny_model("gpt2", vocab_size=len(tok), seed=0)
    batch = collate_pairs(pairs, tok.pad_token_id)
    want_c, want_r = _oracle(initial, batch)
    policy = copy.deepcopy(initial)
    live = make_reference("copy", Host(policy, CopyReference.build(policy)), cache_dir=None)
    pre = make_reference("precomputed", Host(copy.deepcopy(initial)), cache_dir=str(tmp_path))
    pre.precompute(pairs, None, pad_token_id=tok.pad_token_id, batch_size=4)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    for strategy in (live, pre):
        assert isinstance(strategy, ReferenceModel)
        _perturb(strategy.host.policy)  # training moved the policy; the reference must not follow
        got_c, got_r = strategy.logps(batch)
        torch.testing.assert_close(got_c, want_c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_r, want_r, atol=1e-5, rtol=1e-5)
        pol_c, _ = _oracle(strategy.host.policy, batch)
        assert (pol_c - want_c).abs().max() > 1e-3  # the policy did move: the check above can fail
    assert live.forward_module() is live.host.reference and pre.forward_module() is None
    assert dict(live.table) == {} and len(pre.table) == len(pairs)
    # a second strategy over the same initial weights reads the cache instead of computing
    (cached,) = tmp_path.glob("*.safetensors")
    mtime = cached.stat().st_mtime_ns
    again = PrecomputedReference(Host(copy.deepcopy(initial)), str(tmp_path))
    again.precompute(pairs, None, pad_token_id=tok.pad_token_id)
    assert again.table == pre.table and cached.stat().st_mtime_ns == mtime


def test_the_surface_names_the_mode_and_the_module_the_reference_forward_runs_through(tok, tmp_path):
    pytest.importorskip("peft")
    live = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok)), reference="copy")
    pre = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok)), reference="precomputed",
                    reference_cache_dir=str(tmp_path))
    peft = DPOModule(build_tiny_model("llama", vocab_size=len(tok)), reference="peft", peft_config=dict(LORA))
    assert [m.reference_mode for m in (live, pre, peft)] == ["copy", "precomputed", "peft"]
    assert live.reference_forward_module() is live.reference and live.reference is not live.policy
    assert pre.reference_forward_module() is None and pre.reference is None
    assert peft.reference_forward_module() is peft.policy
    for module in (live, pre, peft):
        assert isinstance(module, PreferenceModule)
    assert not isinstance(torch.nn.Linear(2, 2), PreferenceModule)
    assert dict(live.reference_table) == {} and dict(peft.reference_table) == {}


def test_peft_reference_is_the_base_model_with_adapters_off(tok, pairs):
    pytest.importorskip("peft")
    base = build_tiny_model("llama", vocab_size=len(tok), seed=0)
    batch = collate_pairs(pairs, tok.pad_token_id)
    want_c, want_r = _oracle(base, batch)
    from peft import LoraConfig, get_peft_model

    strategy = PeftReference(Host(get_peft_model(copy.deepcopy(base), LoraConfig(**LORA))))
    _perturb(strategy.host.policy, scale=0.5)  # only the LoRA weights train
    got_c, got_r = strategy.logps(batch)
    torch.testing.assert_close(got_c, want_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_r, want_r, atol=1e-5, rtol=1e-5)
    assert strategy.forward_module() is strategy.host.policy and strategy.state_dict() == {}
    with torch.no_grad():
        pol = strategy.host.concatenated_forward(strategy.host.policy, batch)
    assert (pol["chosen_logps"] - want_c).abs().max() > 1e-3  # adapters on: the policy moved


def test_precomputed_table_round_trips_through_the_checkpoint_entry(tok, pairs, tmp_path):
    first = PrecomputedReference(Host(build_tiny_model("gpt2", vocab_size=len(tok), seed=0)), str(tmp_path))
    assert first.state_dict() == {}  # nothing computed: nothing to store
    first.precompute(pairs, None, pad_token_id=tok.pad_token_id)
    entry = first.state_dict()
    assert entry["reference_logps"]["row_ids"].tolist() == sorted(p.row_id for p in pairs)

    # another initial policy: a resumed run takes the checkpoint's numbers, never its own
    resumed = PrecomputedReference(Host(build_tiny_model("gpt2", vocab_size=len(tok), seed=1)), str(tmp_path / "b"))
    data = SimpleNamespace(datamodule=SimpleNamespace(train_pairs=pairs[:4], val_pairs=pairs[4:]))
    resumed.load_state_dict(entry, data)
    assert resumed.table == first.table and len(resumed.table) == len(pairs)
    resumed.on_fit_start()
    resumed.before_first_batch(data)  # the checkpoint brought the table: nothing computed, no cache written
    assert not (tmp_path / "b").exists()
    batch = collate_pairs(pairs, tok.pad_token_id)
    torch.testing.assert_close(resumed.logps(batch), first.logps(batch))
    with pytest.raises(TypeError):
        resumed.table[0] = (0.0, 0.0)  # read-only view

    short = {"reference_logps": {k: v[:3] for k, v in entry["reference_logps"].items()}}
    with pytest.raises(ValueError, match=r"lack 3 row id\(s\) of this data"):
        PrecomputedReference(Host(build_tiny_model("gpt2", vocab_size=len(tok))), None).load_state_dict(short, data)
    with pytest.raises(ValueError, match="holds no precomputed reference log-probs"):
        resumed.load_state_dict({}, data)


def test_the_modules_checkpoint_hooks_carry_the_table_and_no_reference_weights(tok, pairs, tmp_path):
    first = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok), seed=0), reference="precomputed",
                      reference_cache_dir=str(tmp_path))
    first.precompute_reference(pairs, pad_token_id=tok.pad_token_id)
    checkpoint = {"state_dict": first.state_dict()}
    first.on_save_checkpoint(checkpoint)
    assert checkpoint["lightning_anatomy"]["reference"] == "precomputed"
    resumed = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok), seed=1), reference="precomputed",
                        reference_cache_dir=str(tmp_path))
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.reference_table == first.reference_table and len(resumed.reference_table) == len(pairs)

    live = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok), seed=0))
    checkpoint = {"state_dict": live.state_dict()}
    live.on_save_checkpoint(checkpoint)
    assert not [k for k in checkpoint["state_dict"] if k.startswith("reference.")]
    assert set(checkpoint["lightning_anatomy"]) == {"reference", "reference_digest", "num_tokens"}  # TRL's counter
    same = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok), seed=0))
    same.on_load_checkpoint(checkpoint)  # strict loads expect the reference: the module fills it in
    assert {k for k in checkpoint["state_dict"] if k.startswith("reference.")} == {
        f"reference.{k}" for k in same.reference.state_dict()}
    with pytest.raises(ValueError, match="not the one the checkpoint was trained against"):
        DPOModule(build_tiny_model("gpt2", vocab_size=len(tok), seed=1)).on_load_checkpoint(checkpoint)


def test_batch_reference_logps_replace_the_forward_and_missing_rows_are_named(tok, pairs, tmp_path):
    module = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok)), reference="precomputed",
                       reference_cache_dir=str(tmp_path))
    batch = collate_pairs(pairs, tok.pad_token_id)
    with pytest.raises(RuntimeError, match=r"no precomputed reference log-probs for row ids \[0, 1"):
        module.reference_logps(batch)
    given = torch.arange(len(pairs), dtype=torch.float32)
    c, r = module.reference_logps({**batch, "ref_chosen_logps": given, "ref_rejected_logps": -given})
    assert torch.equal(c, given) and torch.equal(r, -given)


def test_precompute_reference_is_refused_without_a_precomputed_reference(tok, pairs):
    module = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok)), reference="copy")
    with pytest.raises(ValueError, match="precompute_reference needs reference='precomputed'.*'copy'"):
        module.precompute_reference(pairs, pad_token_id=tok.pad_token_id)


def test_compute_loss_adds_auxiliary_losses_only_when_training(tok, pairs):
    module = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok)))
    batch = collate_pairs(pairs, tok.pad_token_id)
    module.register_auxiliary_loss("plus", lambda: torch.tensor(2.5))
    module.register_auxiliary_loss("none", lambda: None)
    assert module.auxiliary_loss_names == ("plus", "none")
    with pytest.raises(ValueError, match="'plus' is already registered"):
        module.register_auxiliary_loss("plus", lambda: None)
    with torch.no_grad():
        plain, stats = module.compute_loss(batch)
        trained, _ = module.compute_loss(batch, training=True)
    torch.testing.assert_close(plain, torch.tensor(2.0).log(), atol=1e-6, rtol=0)  # policy == reference: log 2
    torch.testing.assert_close(trained, plain + 2.5)
    assert stats["rewards/margins"] == 0
    module.remove_auxiliary_loss("plus")
    module.remove_auxiliary_loss("absent")
    assert module.auxiliary_loss_names == ("none",)
