"""SAE loading for every sae-lens architecture, width checks, fidelity numbers, offline failure."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from sae_lens import (
    AbsTopKSAE,
    AbsTopKSAEConfig,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)

from lightning_anatomy.concepts.sae import SAELoadError, check_width, load_sae, measure_fidelity
from lightning_anatomy.models.tiny import build_tiny_model
from tests.helpers.concept_callback_helpers import perfect_sae

D_IN, D_SAE = 16, 48


def _randomise(sae):
    """Non-zero biases/thresholds so loading has something to get wrong."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=gen) * 0.1)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return sae


ARCHITECTURES = {
    "standard": lambda: StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)),
    "topk": lambda: TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5)),
    "abstopk": lambda: AbsTopKSAE(AbsTopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5)),
    "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE)),
    "gated": lambda: GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE)),
}



@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_loads_from_object_and_directory(arch, tmp_path):
    torch.manual_seed(0)
    sae = _randomise(ARCHITECTURES[arch]())
    x = torch.randn(3, 5, D_IN)
    expected = sae.encode(x)
    assert load_sae(sae) is sae
    sae.save_model(tmp_path / arch)
    for spec in (tmp_path / arch, str(tmp_path / arch)):
        loaded = load_sae(spec)
        assert type(loaded) is type(sae) and loaded.cfg.architecture() == arch
        torch.testing.assert_close(loaded.encode(x), expected, rtol=0, atol=0)
        assert loaded.encode(x).shape == (3, 5, D_SAE)
    if arch in ("standard", "gated", "jumprelu"):
        assert (expected > 0).any() and (expected == 0).any()
    if arch in ("topk", "abstopk"):
        assert torch.equal((expected != 0).sum(-1), torch.full((3, 5), 5))


def test_batchtopk_training_sae_becomes_a_per_token_jumprelu(tmp_path):
    torch.manual_seed(0)
    training = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    with torch.no_grad():
        training.topk_threshold.fill_(0.3)
    x = torch.randn(6, D_IN)
    sae = load_sae(training)
    assert isinstance(sae, JumpReLUSAE)
    feats = sae.encode(x)
    # Per token: a row's features do not depend on the rest of the batch.
    torch.testing.assert_close(sae.encode(x[:1]), feats[:1], rtol=0, atol=0)
    pre = torch.relu((x - training.b_dec) @ training.W_enc + training.b_enc)
    torch.testing.assert_close(feats, torch.where(pre > 0.3, pre, torch.zeros_like(pre)), rtol=1e-6, atol=1e-6)
    training.save_inference_model(tmp_path / "btk")
    torch.testing.assert_close(load_sae(tmp_path / "btk").encode(x), feats, rtol=0, atol=0)


def test_device_argument_moves_the_sae():
    sae = load_sae(StandardSAE(StandardSAEConfig(d_in=4, d_sae=8)), device="cpu")
    assert next(sae.parameters()).device.type == "cpu"


def test_registry_specs_fail_fast_and_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("gpt2-small-res-jb/blocks.8.hook_resid_pre", {"release": "gpt2-small-res-jb", "sae_id": "blocks.8.hook_resid_pre"}):
        start = time.perf_counter()
        with pytest.raises(SAELoadError) as err:
            load_sae(spec)
        assert time.perf_counter() - start < 1.0
        msg = str(err.value)
        assert "HF_HUB_OFFLINE" in msg and "save_model" in msg and "directory" in msg
        assert "'gpt2-small-res-jb', 'blocks.8.hook_resid_pre'" in msg


def test_bad_specs_name_the_problem(tmp_path):
    with pytest.raises(SAELoadError, match="exactly the keys 'release' and 'sae_id'"):
        load_sae({"release": "x"})
    with pytest.raises(SAELoadError, match=r"'\./missing-sae' does not exist"):
        load_sae("./missing-sae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAELoadError, match="has no cfg.json"):
        load_sae(tmp_path / "empty")
    with pytest.raises(SAELoadError, match="cannot load an SAE from 3"):
        load_sae(3)

    class LooksLikeAnSAE:  # passes the spec check by shape (W_dec), but is no sae_lens.SAE
        W_dec = None

    with pytest.raises(SAELoadError, match="cannot load an SAE from a LooksLikeAnSAE"):
        load_sae(LooksLikeAnSAE())


def test_check_width_names_both_numbers():
    model = build_tiny_model("gpt2", hidden_size=32, num_layers=2)
    sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    sae.cfg.metadata.model_name = "gpt2-small"
    sae.cfg.metadata.hook_name = "blocks.8.hook_resid_pre"
    with pytest.raises(ValueError) as err:
        check_width(sae, model, "blocks.1.hook_resid_post")
    msg = str(err.value)
    assert msg.startswith("SAE d_in=16 but model width at 'blocks.1.hook_resid_post' is 32")
    assert "'gpt2-small'" in msg and "'blocks.8.hook_resid_pre'" in msg
    assert check_width(StandardSAE(StandardSAEConfig(d_in=32, d_sae=8)), model, "blocks.1.hook_mlp_out") == 32


def test_fidelity_numbers_are_exact_on_hand_built_saes():
    x = torch.tensor([[1.0, 0, 0, 0], [3.0, 0, 0, 0]])
    sae = perfect_sae(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid = measure_fidelity(sae, x, hook="h")
    assert fid == {"fve": 1.0, "l0": 1.0, "rel_error": 0.0, "dead_fraction": 7 / 8}

    with torch.no_grad():
        sae.W_dec.mul_(0.5)  # x_hat = x / 2: SSE = 0.25 * 10, SST around the mean [2,0,0,0] = 2
    with pytest.warns(UserWarning, match=r"SAE at 'blocks\.3\.hook_resid_post' explains only -25\.0%.*threshold 50%"):
        fid = measure_fidelity(sae, x, hook="blocks.3.hook_resid_post")
    assert fid["fve"] == pytest.approx(-0.25, abs=1e-7)
    assert fid["rel_error"] == pytest.approx(0.5, abs=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert measure_fidelity(sae, x, min_fve=None)["l0"] == 1.0

    dense = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    fid = measure_fidelity(perfect_sae(4), dense)  # [b, s, d] is flattened to tokens
    assert fid["fve"] == pytest.approx(1.0, abs=1e-6) and fid["l0"] == 4.0 and fid["dead_fraction"] == 0.0


def test_fidelity_rejects_bad_inputs():
    with pytest.raises(ValueError, match="at least 2 activation vectors, got 1"):
        measure_fidelity(perfect_sae(4), torch.ones(1, 4))
    with pytest.raises(ValueError, match="width 5 but SAE d_in=4"):
        measure_fidelity(perfect_sae(4), torch.ones(3, 5))
