"""ConceptAttribution and ConceptDriftMonitor on 2 DDP processes (gloo, CPU): the ranks' attribution is averaged, the probe runs on rank zero."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from lightning_anatomy.data import collate_pairs
from lightning_anatomy.models.tiny import build_tiny_model
from lightning_anatomy.module import DPOModule
from tests.helpers.concept_callback_helpers import (
    PAD,
    random_pairs,
    random_sae,
    reference_push,
)
from tests.helpers.subprocess_helpers import run_python

HOOK = "blocks.0.hook_resid_post"
TESTS = Path(__file__).resolve().parent


# Random SAEs reconstruct poorly: the lens' fidelity warning is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:SAE at .* explains only")


DDP_SCRIPT = """
import sys, torch, lightning as L
sys.path.insert(0, {tests!r})
from tests.helpers.concept_callback_helpers import loader, random_pairs, random_sae
from lightning_anatomy.callbacks.attribution import ConceptAttribution
from lightning_anatomy.callbacks.drift import ConceptDriftMonitor
from lightning_anatomy.models.tiny import build_tiny_model
from lightning_anatomy.module import DPOModule

torch.manual_seed(0)
hook = "blocks.0.hook_resid_post"
module = DPOModule(build_tiny_model("gpt2", seed=0), lr=1e-3)
attr = ConceptAttribution({{hook: random_sae(seed=1)}})
drift = ConceptDriftMonitor({{hook: random_sae(seed=1)}}, random_pairs(3, seed=2, start_id=100), every_n_steps=1)
rows = []
keep_rows = L.pytorch.callbacks.LambdaCallback(on_train_batch_start=lambda tr, pl, b, i: rows.append(b["row_ids"]))
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False,
                    callbacks=[attr, drift, keep_rows], enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
trainer.fit(module, loader(random_pairs(8, seed=4), 2))
torch.save({{"push": attr.last_push, "drift": drift.last_drift, "evaluated": drift.last_evaluated_step,
            "rows": rows[0]}}, f"result-{{trainer.global_rank}}.pt")
"""


@pytest.mark.slow
def test_ddp_two_processes_average_attribution_and_measure_drift_on_rank_zero(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(TESTS))))
    run_python(script, cwd=tmp_path, timeout=180)
    rank0 = torch.load(tmp_path / "result-0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "result-1.pt", weights_only=True)

    # Each rank attributes its own batch; DDP averages the ranks' gradients, so does the callback.
    saes = {HOOK: random_sae(seed=1)}
    module = DPOModule(build_tiny_model("gpt2", seed=0), lr=1e-3)
    pairs = random_pairs(8, seed=4)
    assert set(rank0["rows"].tolist()).isdisjoint(rank1["rows"].tolist())
    per_rank = [reference_push(module, collate_pairs([pairs[i] for i in r["rows"].tolist()], PAD), saes)[HOOK]
                for r in (rank0, rank1)]
    expected = (per_rank[0] + per_rank[1]) / 2
    assert not torch.allclose(per_rank[0], per_rank[1], atol=1e-4)
    for result in (rank0, rank1):
        torch.testing.assert_close(result["push"][HOOK], expected, rtol=1e-4, atol=1e-6)
    assert rank0["evaluated"] == rank1["evaluated"] == 1
    assert rank0["drift"][HOOK].abs().max() > 0 and rank1["drift"] == {}  # rank 1 never ran the probe
