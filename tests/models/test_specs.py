"""The one resolver per kind of spec (model, data source, SAE): what each accepts, what it refuses
and that the refusal names the key and what is accepted, without loading anything."""

from __future__ import annotations

import pytest
import torch

from lightning_anatomy.concepts.sae import (
    RandomSAESpec,
    SAEDirectorySpec,
    SAELoadError,
    check_sae_spec,
    load_sae,
    parse_sae_spec,
)
from lightning_anatomy.data.sources import check_source, resolve_source
from lightning_anatomy.data.toy import make_toy_preferences
from lightning_anatomy.models.loading import check_model_spec, load_model
from lightning_anatomy.models.specs import (
    HubModelSpec,
    LocalModelSpec,
    SpecError,
    TinyModelSpec,
    parse_model_spec,
)
from lightning_anatomy.models.tiny import build_tiny_model


@pytest.mark.parametrize("spec", ["tiny:gpt2", "tiny:gemma2", "embedded"])
def test_model_specs_accepted(spec):
    check_model_spec(spec, "model.policy")


def test_hub_ids_need_the_cache_or_a_reachable_hub(monkeypatch):
    import lightning_anatomy.models.specs as specs

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SpecError, match=r"^model\.policy='org/name' \(a hub id\).*HF_HUB_OFFLINE=1") as err:
        check_model_spec("org/name", "model.policy")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(specs, "in_hub_cache", lambda repo_id, filename="config.json": repo_id == "org/cached")
    assert parse_model_spec("org/cached") == HubModelSpec("org/cached")  # served from the cache offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(specs, "hub_offline", lambda: False)
    monkeypatch.setattr(specs, "hub_reachable", lambda: False)
    with pytest.raises(SpecError, match="cannot be reached.*HF_HUB_OFFLINE=1"):
        check_model_spec("org/name", "model.policy")
    monkeypatch.setattr(specs, "hub_reachable", lambda: True)
    assert parse_model_spec("org/name") == HubModelSpec("org/name")


@pytest.mark.parametrize(("spec", "message"), [
    ("tiny:gtp2", "unknown tiny family"), ("./missing", "no such directory"),
    ("a/b/c", "no such directory"), ("~/nope/model", "no such directory"), ("", "not a model spec"), (3, "not a model spec"),
])
def test_model_specs_refused_with_the_key(spec, message):
    with pytest.raises(ValueError, match=rf"model\.policy.*{message}|{message}.*model\.policy"):
        check_model_spec(spec, "model.policy")


def test_model_directory_needs_config_json(tmp_path):
    with pytest.raises(ValueError, match="without config.json"):
        check_model_spec(str(tmp_path), "model.policy")
    build_tiny_model("gpt2").save_pretrained(tmp_path)
    check_model_spec(str(tmp_path), "model.policy")


def test_data_sources_resolve_in_one_place(tmp_path):
    assert resolve_source("toy") == make_toy_preferences(64)
    assert resolve_source("toy:7", seed=3) == make_toy_preferences(7, seed=3)
    assert len(resolve_source("demo")) > 0
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    assert resolve_source(rows) is rows  # in-memory data passes through
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    assert resolve_source(str(path)) == str(path)
    with pytest.raises(FileNotFoundError, match=r"data\.source='nope\.jsonl'.*'toy'"):
        check_source("nope.jsonl", "data.source")
    with pytest.raises(ValueError, match=r"data\.source='toy:x'.*positive integer"):
        check_source("toy:x", "data.source")


def test_toy_set_has_no_duplicates_up_to_128_pairs():
    rows = make_toy_preferences(128)
    assert len({(r["prompt"], r["chosen"], r["rejected"]) for r in rows}) == 128
    assert make_toy_preferences(32, seed=1) == make_toy_preferences(32, seed=1) != make_toy_preferences(32, seed=2)


def test_random_sae_spec_waits_for_the_width_and_is_seeded():
    pending = load_sae("random:32")
    assert isinstance(pending, RandomSAESpec) and pending.d_sae == 32
    a, b = load_sae("random:32", d_in=16, seed=5), load_sae("random:32", d_in=16, seed=5)
    assert a.cfg.d_in == 16 and a.cfg.d_sae == 32
    torch.testing.assert_close(a.W_enc, b.W_enc)
    assert not torch.allclose(a.W_enc, load_sae("random:32", d_in=16, seed=6).W_enc)
    state = torch.random.get_rng_state()
    pending.build(16)
    assert torch.equal(state, torch.random.get_rng_state())  # building does not move the global RNG


@pytest.mark.parametrize(("spec", "message"), [
    ("random:lots", "positive integer"), ("./no/sae", "SAE directory '\\./no/sae' does not exist \\(no such directory"),
    ("justaword", "not an existing SAE directory"), ({"release": "x"}, "exactly the keys"), (3, "cannot load"),
])
def test_sae_specs_refused_with_the_key(spec, message):
    with pytest.raises(SAELoadError, match=rf"saes\['h'\].*{message}"):
        check_sae_spec(spec, "saes['h']")


def test_sae_specs_accepted_without_loading(tmp_path, monkeypatch):
    import lightning_anatomy.concepts.sae as sae_module
    import lightning_anatomy.models.specs as specs

    monkeypatch.setattr(specs, "hub_offline", lambda: False)  # registry specs need a reachable hub
    monkeypatch.setattr(specs, "hub_reachable", lambda: True)
    monkeypatch.setattr(sae_module, "_split_release", lambda text: tuple(text.split("/", 1)))
    for spec in ("embedded", "random:8", "gpt2-small-res-jb/blocks.8.hook_resid_pre",
                 {"release": "r", "sae_id": "i"}):
        check_sae_spec(spec, "saes['h']")
    with pytest.raises(SAELoadError, match="no cfg.json"):
        check_sae_spec(str(tmp_path), "saes['h']")


def test_a_missing_local_folder_is_no_such_directory_not_a_hub_id(tmp_path):
    (tmp_path / "models").mkdir()
    for spec in ("./models/my-sft", "models/my-sft", str(tmp_path / "nope")):
        with pytest.raises(SpecError, match="no such directory") as err:
            load_model(spec)
        assert "Repo id" not in str(err.value)


def test_each_kind_parses_once_into_a_typed_spec(tmp_path):
    assert parse_model_spec("tiny:llama") == TinyModelSpec("llama") and parse_model_spec("tiny") == TinyModelSpec("gpt2")
    build_tiny_model("gpt2").save_pretrained(tmp_path / "m")
    assert parse_model_spec(str(tmp_path / "m")) == LocalModelSpec(tmp_path / "m")
    assert parse_sae_spec("random:16") == RandomSAESpec(16)
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "cfg.json").write_text("{}")
    assert parse_sae_spec(str(tmp_path / "sae")) == SAEDirectorySpec(tmp_path / "sae")
