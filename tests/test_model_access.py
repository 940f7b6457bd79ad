"""Hook-name resolution on every supported family, hook plumbing, and the reference-pass flag."""

from __future__ import annotations

import threading
from functools import cache

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from lightning_anatomy.model_access import (
    HookPoint,
    find_blocks,
    find_causal_lm,
    hidden_size_at,
    hook_input,
    hook_names,
    hook_output,
    is_reference_pass,
    reference_pass,
    resolve_hook,
)
from lightning_anatomy.models.tiny import FAMILIES, build_tiny_model

BLOCKS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}


@cache
def tiny(family: str) -> nn.Module:
    return build_tiny_model(family, num_layers=3, hidden_size=32, num_heads=4)


def capture(model: nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Activations at each hook via plain torch hooks (independent of the lens)."""
    got: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        point = resolve_hook(model, name)
        if point.kind == "input":
            def pre(_m, args, kwargs, name=name):
                got[name] = hook_input(args, kwargs)[0].clone()
            handles.append(point.module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(_m, _a, out, name=name):
                got[name] = hook_output(out)[0].clone()
            handles.append(point.module.register_forward_hook(post))
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    got["__hidden__"] = out.hidden_states
    return got


@pytest.mark.parametrize("family", FAMILIES)
def test_resolution_matches_hidden_states_and_residual_algebra(family):
    model = tiny(family)
    names = hook_names(model)
    assert len(names) == 3 * 4 and names[:4] == [
        "blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"
    ]
    ids = torch.randint(4, 260, (2, 7), generator=torch.Generator().manual_seed(1))
    acts = capture(model, names, ids)
    hidden = acts["__hidden__"]
    for layer in range(3):
        pre, post = acts[f"blocks.{layer}.hook_resid_pre"], acts[f"blocks.{layer}.hook_resid_post"]
        assert pre.shape == (2, 7, 32)
        torch.testing.assert_close(pre, hidden[layer], rtol=0, atol=0)
        if layer < 2:
            # resid_post of L is resid_pre of L+1 (HF's last hidden state has the final norm applied).
            torch.testing.assert_close(post, acts[f"blocks.{layer + 1}.hook_resid_pre"], rtol=0, atol=0)
            torch.testing.assert_close(post, hidden[layer + 1], rtol=0, atol=0)
        # attn_out and mlp_out are exactly what the sublayers add to the residual stream.
        summed = pre + acts[f"blocks.{layer}.hook_attn_out"] + acts[f"blocks.{layer}.hook_mlp_out"]
        torch.testing.assert_close(summed, post, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_points_carry_layer_kind_and_path(family):
    model = tiny(family)
    blocks_path, blocks = find_blocks(model)
    assert blocks_path == BLOCKS.get(family, "model.layers") and len(blocks) == 3
    pre = resolve_hook(model, "blocks.2.hook_resid_pre")
    post = resolve_hook(model, "blocks.2.hook_resid_post")
    assert isinstance(pre, HookPoint)
    assert (pre.kind, post.kind, pre.layer, post.layer) == ("input", "output", 2, 2)
    assert pre.module is post.module is blocks[2]
    assert post.module_path == f"{blocks_path}.2"
    by_path = resolve_hook(model, f"{blocks_path}.1")
    assert by_path.module is blocks[1] and by_path.layer == 1 and by_path.kind == "output"
    assert hidden_size_at(model, "blocks.0.hook_mlp_out") == 32


def test_gemma2_and_neox_sublayer_outputs_are_the_residual_contributions():
    gemma2 = tiny("gemma2")
    assert resolve_hook(gemma2, "blocks.0.hook_attn_out").module_path == "model.layers.0.post_attention_layernorm"
    assert resolve_hook(gemma2, "blocks.0.hook_mlp_out").module_path == "model.layers.0.post_feedforward_layernorm"
    neox = tiny("gpt_neox")
    assert resolve_hook(neox, "blocks.1.hook_attn_out").module_path == "gpt_neox.layers.1.post_attention_dropout"
    llama = tiny("llama")
    assert resolve_hook(llama, "blocks.1.hook_attn_out").module_path == "model.layers.1.self_attn"
    assert resolve_hook(llama, "blocks.1.hook_mlp_out").module_path == "model.layers.1.mlp"


def test_module_paths_layers_and_widths():
    model = tiny("llama")
    emb = resolve_hook(model, "model.embed_tokens")
    assert emb.layer == -1 and emb.kind == "output"
    assert resolve_hook(model, "lm_head").layer == 3
    assert resolve_hook(model, "model.norm").layer == 3
    down = resolve_hook(model, "model.layers.2.mlp.down_proj")
    assert down.layer == 2
    assert hidden_size_at(model, down) == 32
    assert hidden_size_at(model, "model.layers.2.mlp.up_proj") == 64  # intermediate width (Linear)
    flags = []
    handle = model.model.layers[0].register_forward_hook(lambda *_: flags.append(is_reference_pass()))
    try:
        assert hidden_size_at(model, "model.layers.2.mlp.act_fn") == 64  # no static width: probed
    finally:
        handle.remove()
    assert flags == [True]  # the probe forward runs as a reference pass, so statistics hooks skip it
    assert hidden_size_at(model, "lm_head") == 260
    assert hidden_size_at(model, "model.norm") == 32


def test_unknown_hooks_raise_with_valid_names():
    model = tiny("gpt2")
    with pytest.raises(ValueError) as err:
        resolve_hook(model, "blocks.3.hook_resid_post")
    msg = str(err.value)
    assert "layer 3 is out of range" in msg and "3 blocks" in msg
    assert "blocks.{0..2}.hook_resid_post" in msg and "blocks.{0..2}.hook_mlp_out" in msg
    with pytest.raises(ValueError, match=r"unknown hook 'blocks\.0\.hook_z'.*transformer\.h\.0"):
        resolve_hook(model, "blocks.0.hook_z")
    with pytest.raises(ValueError, match="'transformer.nope'"):
        resolve_hook(model, "transformer.nope")
    with pytest.raises(ValueError, match="non-empty string"):
        resolve_hook(model, "")


def test_block_list_without_known_path_is_found_by_config_length():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"num_hidden_layers": 2})()
            self.stack = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
            self.extra = nn.ModuleList([nn.Linear(4, 4)])

    path, blocks = find_blocks(Odd())
    assert path == "stack" and len(blocks) == 2

    class NoBlocks(nn.Module):
        config = type("Cfg", (), {"num_hidden_layers": 5})()

    with pytest.raises(ValueError, match="could not find the list of transformer blocks in NoBlocks"):
        find_blocks(NoBlocks())


def test_hook_output_and_input_keep_structure():
    x = torch.ones(2, 3)
    hidden, rebuild = hook_output(x)
    assert hidden is x and torch.equal(rebuild(x * 2), x * 2)
    extra = torch.zeros(1)
    hidden, rebuild = hook_output((x, extra, None))
    new = rebuild(x + 1)
    assert isinstance(new, tuple) and len(new) == 3 and torch.equal(new[0], x + 1) and new[1] is extra
    out = BaseModelOutput(last_hidden_state=x)
    hidden, rebuild = hook_output(out)
    assert hidden is x
    rebuilt = rebuild(x * 3)
    assert isinstance(rebuilt, BaseModelOutput) and torch.equal(rebuilt.last_hidden_state, x * 3)
    with pytest.raises(TypeError, match="cannot find hidden states.*str"):
        hook_output("nope")

    h, rebuild_in = hook_input((x, 5), {"mask": None})
    args, kwargs = rebuild_in(x - 1)
    assert h is x and torch.equal(args[0], x - 1) and args[1] == 5 and kwargs == {"mask": None}
    h, rebuild_in = hook_input((), {"hidden_states": x, "mask": 1})
    args, kwargs = rebuild_in(x - 1)
    assert args == () and torch.equal(kwargs["hidden_states"], x - 1) and kwargs["mask"] == 1
    with pytest.raises(TypeError, match="hidden_states="):
        hook_input((None,), {})


def test_editing_hooks_work_on_tuple_and_tensor_outputs():
    """The same editing hook changes the model whether the module returns a tuple or a tensor."""
    model = tiny("llama")
    ids = torch.randint(4, 260, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model(ids).logits

    def zero_hidden(_m, _a, out):
        hidden, rebuild = hook_output(out)
        return rebuild(torch.zeros_like(hidden))

    for name in ("blocks.1.hook_attn_out", "blocks.1.hook_resid_post"):  # attention returns a tuple
        point = resolve_hook(model, name)
        handle = point.module.register_forward_hook(zero_hidden)
        try:
            with torch.no_grad():
                edited = model(ids).logits
        finally:
            handle.remove()
        assert not torch.allclose(edited, base)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # hooks were removed


@pytest.mark.slow
def test_peft_wrapped_model_resolves_to_the_same_modules():
    peft = pytest.importorskip("peft")
    model = build_tiny_model("llama", num_layers=2, hidden_size=32, num_heads=4)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    inner_block = model.model.layers[1]
    assert resolve_hook(wrapped, "blocks.1.hook_resid_post").module is inner_block
    assert resolve_hook(wrapped, "model.layers.1").module is inner_block
    full = resolve_hook(wrapped, "base_model.model.model.layers.1")
    assert full.module is inner_block and full.layer == 1
    assert "blocks.1.hook_mlp_out" in hook_names(wrapped)
    assert hidden_size_at(wrapped, "blocks.0.hook_resid_pre") == 32

    class Module(nn.Module):
        def __init__(self):
            super().__init__()
            self.policy = wrapped

    assert find_causal_lm(Module()) is wrapped


def test_find_causal_lm_order_and_error():
    policy, other = tiny("gpt2"), tiny("llama")

    class WithPolicy(nn.Module):
        def __init__(self):
            super().__init__()
            self.reference = other
            self.policy = policy

    class WithModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = policy

    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Identity(), other)  # `model` is not an LM: search submodules

    class Empty(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(2, 2)

    assert find_causal_lm(WithPolicy()) is policy
    assert find_causal_lm(WithModel()) is policy
    assert find_causal_lm(Nested()) is other
    assert find_causal_lm(policy) is policy
    with pytest.raises(ValueError, match="Empty holds no Hugging Face model.*`policy`"):
        find_causal_lm(Empty())


def test_reference_pass_flag_is_nestable_and_per_thread():
    assert not is_reference_pass()
    seen_in_thread = []
    with reference_pass():
        assert is_reference_pass()
        with reference_pass():
            assert is_reference_pass()
        assert is_reference_pass()
        t = threading.Thread(target=lambda: seen_in_thread.append(is_reference_pass()))
        t.start()
        t.join()
    assert not is_reference_pass()
    assert seen_in_thread == [False]
    with pytest.raises(RuntimeError):
        with reference_pass():
            raise RuntimeError("boom")
    assert not is_reference_pass()
