"""FSDP: 2 CPU processes (gloo) under FSDP2 train, measure concepts (ablation means and blocking
included), resume and extract span features like 1 process; FSDP1 steps like the unsharded module;
the strategy guards of the concept callbacks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from lightning_anatomy.callbacks import (
    ConceptAttribution,
    ConceptBlocking,
    ConceptDriftMonitor,
    ConceptProjection,
    ConceptSteering,
)
from lightning_anatomy.concepts import ConceptSet
from lightning_anatomy.models.tiny import build_tiny_model
from lightning_anatomy.module import DPOModule
from tests.helpers.concept_callback_helpers import random_pairs, random_sae
from tests.helpers.subprocess_helpers import run_python

TESTS = Path(__file__).resolve().parent
HOOK = "blocks.0.hook_resid_post"
# Per-process numbers, not a property of sharding (the same under DDP): ConceptProjection logs
# rank 0's own gradient share, and logits/* are per-process token means averaged by pair count.
PER_PROCESS = ("concepts/projection/", "train/logits/")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict]:
    """tests/fsdp_run.py on 1 process (no sharding) and on 2 (FSDP2): ~30 s together."""
    out = {}
    for devices in (1, 2):
        root = tmp_path_factory.mktemp(f"fsdp{devices}")
        run_python(TESTS / "fsdp_run.py", devices, root, cwd=root, timeout=280)
        out[devices] = json.loads((root / "result.json").read_text())
    return out


def _values(run: dict, after: int = -1) -> dict[tuple[int, str], float]:
    return {(s, k): v for s, metrics in run["records"] for k, v in metrics.items() if s > after}


def _close(a: float, b: float, rel: float = 1e-5, floor: float = 0.0) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b)) + floor


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["copy", "precomputed", "peft"])
def test_fsdp2_two_processes_train_and_measure_concepts_like_one(runs, reference):
    one, two = _values(runs[1][reference]), _values(runs[2][reference])
    assert one.keys() == two.keys()
    losses = sorted(k for k in one if k[1] == "train/loss")
    assert len(losses) == 4
    bad = [k for k in losses if not _close(one[k], two[k])]
    assert bad == [], [(k, one[k], two[k]) for k in bad]
    concepts = [k for k in one if k[1].startswith("concepts/") and not k[1].startswith(PER_PROCESS)]
    names = {k[1].split("/")[1] for k in concepts}
    assert names == {"copy": {"attribution", "drift", "blocking"}, "peft": {"blocking"}}.get(reference, set())
    if names:
        assert sum(abs(one[k]) > 1e-6 for k in concepts) > len(concepts) // 2
    # Attribution sums grad·activation over tokens of both signs: a step where a metric nears zero
    # keeps the absolute fp32 error of its series (seen: 4e-5 relative, 3e-9 absolute on values of
    # 6e-5 in a series reaching 8e-4), so the floor scales with the series' largest value.
    scale = {name: max(abs(v) for (_, n), v in one.items() if n == name) for _, name in concepts}
    bad = [k for k in concepts if not _close(one[k], two[k], floor=max(1e-9, 1e-5 * scale[k[1]]))]
    assert bad == [], [(k, one[k], two[k]) for k in bad]
    # the other TRL metrics; rewards start at 0, so small absolute differences are allowed there
    rest = [k for k in one if k[1].startswith("train/") and not k[1].startswith(PER_PROCESS)]
    assert [k for k in rest if not _close(one[k], two[k], floor=1e-6)] == []
    assert _close(runs[1][reference]["param_norm"], runs[2][reference]["param_norm"], rel=1e-6)
    assert runs[2][reference]["sharded"] and not runs[1][reference]["sharded"]
    assert runs[2][reference]["reference_sharded"] == (reference == "copy")
    assert not runs[2][reference]["reference_in_state_dict"]  # so checkpoints neither hold nor expect it


@pytest.mark.slow
def test_fsdp2_mean_ablation_measures_the_one_process_means(runs):
    # 3 batches of means pairs: rank 0 measures 2, rank 1 one and joins a dummy forward
    one, two = runs[1]["copy"]["means"], runs[2]["copy"]["means"]
    assert one.keys() == two.keys() == {HOOK} and max(abs(v) for v in one[HOOK]) > 1e-3
    assert two[HOOK] == pytest.approx(one[HOOK], rel=1e-5, abs=1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_fsdp2_checkpoint_resumes_like_the_uninterrupted_run(runs, kind):
    resumed = runs[2][f"resumed_{kind}"]
    assert resumed["ckpt_is_dir"] == (kind == "sharded")  # a DCP folder, or one file gathered on rank 0
    expected, got = _values(runs[2]["copy"], after=2), _values(resumed, after=2)
    assert expected and got.keys() == expected.keys()
    assert [k for k in expected if got[k] != expected[k]] == []  # exact: the same shards, the same order
    assert resumed["means"] == runs[2]["copy"]["means"]  # the ablation means come from the checkpoint


@pytest.mark.slow
def test_fsdp2_resume_with_a_precomputed_reference_takes_the_checkpoints_table(runs):
    resumed = runs[2]["resumed_precomputed"]
    assert runs[2]["precomputed"]["computed"] == [24]  # the uninterrupted run computed its table once
    assert resumed["computed"] == [] and resumed["refcache"] == []  # the resumed run computed none
    expected, got = _values(runs[2]["precomputed"], after=2), _values(resumed, after=2)
    assert expected and got.keys() == expected.keys()
    assert [k for k in expected if got[k] != expected[k]] == []


@pytest.mark.slow
def test_fsdp2_extraction_equals_the_one_process_extraction(runs):
    one, two = runs[1]["extraction"], runs[2]["extraction"]
    assert two["sharded"] and not one["sharded"]
    # the fingerprint hashes the weights gathered and the class unwrapped: the same job either way
    assert two["fingerprint"] == one["fingerprint"] and two["row_ids"] == one["row_ids"]
    assert two["lengths"] == one["lengths"] and one["values"].keys() == two["values"].keys()
    assert any(v != 0 for rows in one["values"].values() for row in rows for v in row)
    for key in one["values"]:
        assert two["values"][key] == [pytest.approx(row, rel=1e-5, abs=1e-6) for row in one["values"][key]], key


@pytest.mark.slow
def test_sharded_weights_are_gathered_for_digests_and_refused_elsewhere(runs):
    # the precomputed reference's cache key hashes the gathered weights: the 1-process file is found
    assert runs[1]["precomputed"]["refcache"] == runs[2]["precomputed"]["refcache"] != []
    refusals = runs[2]["refusals"]
    assert "save_pretrained needs the policy's full weights" in refusals["save_pretrained"]
    assert "logit_lens_tokens reads the LM head's weights, which are sharded" in refusals["logit_lens"]


@pytest.mark.slow
def test_fsdp1_step_equals_the_unsharded_step(runs):
    r = runs[2]["fsdp1"]
    assert r["sharded_loss"] == pytest.approx(r["loss"], rel=1e-6)
    assert r["sharded_grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5)
    assert r["digest_equal"] and r["full_sizes"]


def _setup(cb, strategy, callbacks=()):
    trainer = SimpleNamespace(strategy=strategy, training=False, callbacks=list(callbacks))
    cb.setup(trainer, DPOModule(build_tiny_model("gpt2")), "fit")


def test_concept_callbacks_accept_fsdp_and_refuse_deepspeed_and_tensor_parallelism():
    sae = random_sae()
    concepts = ConceptSet.from_sae_features(sae, HOOK, [1])
    make = [lambda: ConceptAttribution({HOOK: sae}), lambda: ConceptDriftMonitor({HOOK: sae}, random_pairs(2)),
            lambda: ConceptProjection(concepts), lambda: ConceptSteering(concepts, strength=1.0),
            lambda: ConceptBlocking(concepts)]
    for strategy in (FSDPStrategy(), ModelParallelStrategy(), DDPStrategy()):
        for build in make:
            _setup(build(), strategy)  # no allow_untested_strategy needed
    deepspeed = object.__new__(DeepSpeedStrategy)  # built without __init__ (deepspeed is not installed)
    for build in make:
        with pytest.raises(ValueError, match="not DeepSpeedStrategy .* allow_untested_strategy=True"):
            _setup(build(), deepspeed)
    for strategy in (FSDPStrategy(), ModelParallelStrategy(), DDPStrategy()):
        mean = ConceptProjection(concepts, mode="ablate", ablation="mean")  # means measured on every rank
        _setup(mean, strategy, callbacks=[mean])
    tp = ModelParallelStrategy()
    tp._device_mesh = _Mesh(tensor_parallel=2)
    with pytest.raises(ValueError, match="tensor parallelism shards the activations"):
        _setup(ConceptAttribution({HOOK: sae}), tp)


class _Mesh:
    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, **sizes: int) -> None:
        self.sizes = {"data_parallel": 1, **sizes}

    def __getitem__(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(size=lambda: self.sizes[name])

    def size(self) -> int:
        return self.sizes["data_parallel"] * self.sizes["tensor_parallel"]


def test_configure_model_refuses_tensor_parallelism_and_ignores_other_strategies():
    module = DPOModule(build_tiny_model("gpt2"))
    strategy = ModelParallelStrategy()
    strategy._device_mesh = _Mesh(tensor_parallel=2)
    module._trainer = SimpleNamespace(strategy=strategy)
    with pytest.raises(ValueError, match=r"no tensor parallelism.*data_parallel_size=2, tensor_parallel_size=1"):
        module.configure_model()
    module._trainer = SimpleNamespace(strategy=DDPStrategy())
    module.configure_model()
    assert "reference" in module._modules and not any(type(p).__name__ == "DTensor" for p in module.parameters())
