"""A 2-process DDP run resumed mid-epoch logs what the uninterrupted run logs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.helpers.subprocess_helpers import run_python

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.filterwarnings("ignore:SAE at .* explains only")

# 9 batches per epoch: step 9 closes epoch 0, step 5 is mid-epoch. 12 steps cross into epoch 1.
TOTAL = 12


DDP_SCRIPT = """
import sys, json
sys.path.insert(0, {tests!r})
from pathlib import Path
import torch
from tests.helpers.resume_helpers import run, after
root = Path({root!r})
full = run("precomputed", {total}, root / "full", devices=2)
first = run("precomputed", {total}, root / "part", stop_at={stop}, devices=2)
ckpt = sorted((root / "part" / "ckpt").glob("*.ckpt"))[0]
resumed = run("precomputed", {total}, root / "part", ckpt_path=str(ckpt), devices=2)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
out = {{"full": full["batches"], "first": first["batches"], "resumed": resumed["batches"],
       "expected": sorted([list(k) + [v] for k, v in after(full["records"], {stop}).items()]),
       "got": sorted([list(k) + [v] for k, v in after(resumed["records"], {stop}).items()])}}
(root / f"result-{{rank}}.json").write_text(json.dumps(out))
"""


@pytest.mark.slow
def test_ddp_two_processes_resume_mid_epoch_like_the_uninterrupted_run(tmp_path):
    script = tmp_path / "ddp_resume.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(TESTS), root=str(tmp_path), total=7, stop=3)))
    run_python(script, cwd=tmp_path, timeout=280)
    import json

    results = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in (0, 1)]
    for res in results:
        assert res["first"] + res["resumed"] == res["full"]
    epoch0 = [sum(r["full"][:5], []) for r in results]  # 18 pairs per rank, batch 4: 5 batches per epoch
    assert set(epoch0[0]).isdisjoint(epoch0[1]) and len(epoch0[0]) == 18
    rank0 = results[0]
    assert rank0["expected"] and rank0["got"] == rank0["expected"]
