"""Dataset-scale extraction killed on one process and resumed on 2 DDP processes (gloo, CPU)
equals the uninterrupted single-process extraction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_anatomy.concepts.extraction import extract_span_features, load_span_features
from tests.concepts.test_extraction import (
    BATCH,
    HOOK,
    SHARD,
    _kill_after,
    assert_same_features,
    build_lens,
    make_pairs,
)
from tests.helpers.subprocess_helpers import run_python

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lens():
    return build_lens()


@pytest.fixture(scope="module")
def pairs():
    return make_pairs()


@pytest.fixture(scope="module")
def reference(lens, pairs):
    """An uninterrupted in-memory extraction, the yardstick."""
    return extract_span_features(pairs, lens, batch_size=BATCH, shard_size=SHARD, progress=False)


DDP_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from tests.concepts.test_extraction import BATCH, SHARD, build_lens, make_pairs
from lightning_anatomy.concepts.extraction import extract_span_features

feats = extract_span_features(make_pairs(), build_lens(), batch_size=BATCH, shard_size=SHARD, out_dir=sys.argv[1],
                              progress=False, trainer_kwargs={{"devices": 2, "strategy": "ddp"}},
                              token_firing=sys.argv[2] == "True")
import torch.distributed as dist
print(f"rank={{dist.get_rank()}} pairs={{feats.n_pairs}}", flush=True)
"""


def _run_ddp(tmp_path: Path, out: Path, token_firing: bool = False) -> str:
    script = tmp_path / "ddp_extract.py"
    script.write_text(DDP_SCRIPT.format(tests=str(TESTS_DIR)))
    return run_python(script, out, token_firing, cwd=tmp_path, timeout=150).stdout


@pytest.mark.slow
@pytest.mark.parametrize("token_firing", [False, True], ids=["span_stats", "with_token_firing"])
def test_ddp_two_processes_resume_a_single_process_run(lens, pairs, reference, tmp_path, monkeypatch, token_firing):
    """Killed after shard 0 on one process, resumed on two: rank 0 takes shard 1, rank 1 shard 2
    (its journal merged by rank 0); the result equals the uninterrupted single-process one."""
    out = tmp_path / "feats"
    whole = extract_span_features(pairs, lens, batch_size=BATCH, shard_size=SHARD, progress=False,
                                  token_firing=token_firing)
    _kill_after(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="simulated kill"):
        extract_span_features(pairs, lens, batch_size=BATCH, shard_size=SHARD, out_dir=out, progress=False,
                              token_firing=token_firing)
    monkeypatch.undo()

    stdout = _run_ddp(tmp_path, out, token_firing)
    assert "rank=0 pairs=22" in stdout and "rank=1 pairs=22" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert [e["file"] for e in manifest["shards"]] == [
        "shard-0-00000.safetensors", "shard-0-00001.safetensors", "shard-1-00002.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [e["file"] for e in manifest["shards"]]
    resumed = load_span_features(out)
    assert_same_features(resumed, reference)  # same batches, same bits
    if token_firing:
        assert (resumed.token_firing[HOOK] != whole.token_firing[HOOK]).nnz == 0
    else:
        assert resumed.token_firing is None and whole.token_firing is None
