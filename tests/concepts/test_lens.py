"""ConceptLens: exact features from one (early-stopped) forward, fidelity checks, span statistics."""

from __future__ import annotations

import warnings
from functools import cache

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

from lightning_anatomy.concepts.lens import ConceptLens, capture_activations, span_stats
from lightning_anatomy.models.tiny import build_tiny_model
from tests.helpers.concept_callback_helpers import perfect_sae

WIDTH = 32


@cache
def tiny(family: str):
    return build_tiny_model(family, num_layers=4, hidden_size=WIDTH, num_heads=4, seed=1)


def random_sae(d_in: int = WIDTH, d_sae: int = 64, seed: int = 0, topk: int | None = None):
    torch.manual_seed(seed)
    if topk is not None:
        return TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=topk))
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    return sae



def ids(b=2, s=6, seed=0):
    return torch.randint(4, 260, (b, s), generator=torch.Generator().manual_seed(seed))


def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_features_are_sae_encode_of_the_hidden_states(family):
    model = tiny(family)
    saes = {
        "blocks.0.hook_resid_post": random_sae(seed=1),
        "blocks.2.hook_resid_pre": random_sae(seed=2, topk=8),
        "blocks.1.hook_mlp_out": random_sae(seed=3),
    }
    lens = ConceptLens(model, saes)
    x = ids()
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states
    feats = lens.encode(x)
    assert list(feats) == list(saes)
    torch.testing.assert_close(feats["blocks.0.hook_resid_post"], saes["blocks.0.hook_resid_post"].encode(hidden[1]), rtol=0, atol=0)
    torch.testing.assert_close(feats["blocks.2.hook_resid_pre"], saes["blocks.2.hook_resid_pre"].encode(hidden[2]), rtol=0, atol=0)
    acts = lens.activations(x)
    assert acts["blocks.1.hook_mlp_out"].shape == (2, 6, WIDTH)
    torch.testing.assert_close(feats["blocks.1.hook_mlp_out"], saes["blocks.1.hook_mlp_out"].encode(acts["blocks.1.hook_mlp_out"]), rtol=0, atol=0)
    assert feats["blocks.1.hook_mlp_out"].shape == (2, 6, 64) and not feats["blocks.0.hook_resid_post"].requires_grad
    only = lens.encode(x, hooks="blocks.0.hook_resid_post")
    assert list(only) == ["blocks.0.hook_resid_post"]


def test_early_stop_skips_later_layers_and_matches_full_forward():
    model = tiny("llama")
    sae = {"blocks.1.hook_resid_post": random_sae(seed=4), "blocks.0.hook_attn_out": random_sae(seed=5)}
    early = ConceptLens(model, sae, stop_at_deepest=True)
    full = ConceptLens(model, sae, stop_at_deepest=False)
    x = ids(seed=1)
    last_calls, h1 = count_calls(model.model.layers[3])
    block2_calls, h2 = count_calls(model.model.layers[2])
    head_calls, h3 = count_calls(model.lm_head)
    try:
        got = early.encode(x)
        assert (len(last_calls), len(block2_calls), len(head_calls)) == (0, 0, 0)
        want = full.encode(x)
        assert (len(last_calls), len(block2_calls), len(head_calls)) == (1, 1, 1)
    finally:
        for h in (h1, h2, h3):
            h.remove()
    for name in sae:
        assert torch.equal(got[name], want[name])
    # A resid_pre hook stops before its block runs at all.
    pre_only = ConceptLens(model, {"blocks.2.hook_resid_pre": random_sae()})
    calls, handle = count_calls(model.model.layers[2])
    try:
        pre_only.encode(x)
    finally:
        handle.remove()
    assert calls == []


def test_padding_does_not_change_real_token_features():
    model = tiny("gpt2")
    lens = ConceptLens(model, {"blocks.1.hook_resid_post": random_sae(seed=6)})
    a, b = ids(1, 7, seed=2), ids(1, 4, seed=3)
    batch = torch.full((2, 7), 3)
    batch[0], batch[1, :4] = a[0], b[0]
    mask = torch.zeros(2, 7, dtype=torch.long)
    mask[0], mask[1, :4] = 1, 1
    feats = lens.encode(batch, mask)["blocks.1.hook_resid_post"]
    alone = lens.encode(b)["blocks.1.hook_resid_post"]
    torch.testing.assert_close(feats[1, :4], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats[0:1], lens.encode(a)["blocks.1.hook_resid_post"], rtol=1e-5, atol=1e-5)


def test_hooks_are_removed_even_when_the_forward_fails():
    model = tiny("gpt2")
    lens = ConceptLens(model, {"blocks.1.hook_resid_pre": random_sae(), "blocks.0.hook_attn_out": random_sae()})

    def registered():  # transformers 5 keeps its own output-capturing hooks: compare, don't expect none
        return [(set(m._forward_hooks), set(m._forward_pre_hooks)) for m in model.modules()]

    before = registered()
    lens.encode(ids())
    assert registered() == before

    def boom(*_):
        raise RuntimeError("boom")

    handle = model.transformer.h[0].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            lens.encode(ids())
    finally:
        handle.remove()
    assert registered() == before


def test_hook_off_the_forward_path_is_reported():
    model = tiny("gpt2")
    model.transformer.add_module("unused", torch.nn.Linear(WIDTH, WIDTH))
    try:
        with pytest.raises(RuntimeError, match=r"\['transformer.unused'\] did not fire"):
            capture_activations(model, ["transformer.unused"], ids())
    finally:
        del model.transformer.unused


def test_construction_errors_name_hook_and_widths(tmp_path):
    model = tiny("gpt2")
    with pytest.raises(ValueError, match=r"SAE d_in=16 but model width at 'blocks.1.hook_resid_post' is 32"):
        ConceptLens(model, {"blocks.1.hook_resid_post": random_sae(d_in=16)})
    with pytest.raises(ValueError, match=r"unknown hook 'blocks.7.hook_resid_post'.*blocks.\{0..3\}"):
        ConceptLens(model, {"blocks.7.hook_resid_post": random_sae()})
    with pytest.raises(ValueError, match="at least one hook"):
        ConceptLens(model, {})


def test_accessors_and_directory_specs(tmp_path):
    model = tiny("qwen2")
    sae = random_sae(d_sae=96)
    sae.save_model(tmp_path / "sae")
    lens = ConceptLens(model, {"model.layers.1": str(tmp_path / "sae"), "blocks.2.hook_resid_post": sae})
    assert lens.model is model and list(lens.hooks) == ["model.layers.1", "blocks.2.hook_resid_post"]
    assert lens.hooks["model.layers.1"].layer == 1
    assert lens.d_sae("model.layers.1") == 96
    assert lens.saes["blocks.2.hook_resid_post"] is sae
    torch.testing.assert_close(lens.decoder("model.layers.1"), sae.W_dec.detach(), rtol=0, atol=0)
    assert lens.decoder("model.layers.1").shape == (96, WIDTH) and "d_sae=96" in repr(lens)
    feats = lens.encode(ids())
    expected = sae.encode(lens.activations(ids())["model.layers.1"])
    torch.testing.assert_close(feats["model.layers.1"], expected, rtol=0, atol=0)
    with pytest.raises(KeyError, match="no SAE at hook 'blocks.0.hook_resid_post'.*model.layers.1"):
        lens.decoder("blocks.0.hook_resid_post")


def test_fidelity_check_per_hook():
    model = tiny("gpt2")
    x, mask = ids(2, 6, seed=4), torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    good = ConceptLens(model, {"blocks.1.hook_resid_post": perfect_sae(WIDTH)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid = good.attach_check(x, mask)["blocks.1.hook_resid_post"]
    assert fid["fve"] == pytest.approx(1.0, abs=1e-5) and fid["rel_error"] < 1e-5
    # l0 counts the 9 real tokens only: each has WIDTH non-zero coordinates.
    assert fid["l0"] == WIDTH and fid["dead_fraction"] == 0.0

    bad = ConceptLens(model, {"blocks.1.hook_resid_post": random_sae(seed=7)})
    with pytest.warns(UserWarning, match=r"SAE at 'blocks.1.hook_resid_post' explains only"):
        fid = bad.measure_fidelity(x, mask)["blocks.1.hook_resid_post"]
    assert fid["fve"] < 0.5
    off = ConceptLens(model, {"blocks.1.hook_resid_post": random_sae(seed=7)}, fidelity_check=False)
    assert off.attach_check(x, mask) == {}
    strict = ConceptLens(model, {"blocks.1.hook_resid_post": perfect_sae(WIDTH)}, fidelity_check=1.01)
    with pytest.warns(UserWarning, match="threshold 101%"):
        strict.attach_check(x)


def test_span_stats_exact_on_hand_made_masks():
    feats = torch.tensor(
        [
            [[1.0, 0.0, -2.0], [3.0, 0.5, -1.0], [0.0, 0.0, 4.0], [9.0, 9.0, 9.0]],
            [[2.0, 2.0, 2.0], [5.0, 5.0, 5.0], [1.0, 1.0, 1.0], [7.0, 7.0, 7.0]],
            [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
        ]
    )
    mask = torch.tensor([[True, True, False, False], [False, False, True, False], [False] * 4])
    st = span_stats(feats, mask)
    assert torch.equal(st["max"], torch.tensor([[3.0, 0.5, -1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(st["mean"], torch.tensor([[2.0, 0.25, -1.5], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(st["freq"], torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    st = span_stats(feats.to(torch.bfloat16), mask.long(), threshold=1.0)
    assert st["freq"].dtype == torch.float32
    assert torch.equal(st["freq"], torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert not any(torch.isnan(v).any() for v in st.values())
    with pytest.raises(ValueError, match=r"mask shape \(3, 3\) does not match features \(3, 4\)"):
        span_stats(feats, mask[:, :3])
    with pytest.raises(ValueError, match=r"\[batch, seq, d_sae\]"):
        span_stats(feats[0], mask[0])
