"""ConceptBlocking on 2 DDP processes (gloo, CPU): the one-process penalty and gradient, logged on rank zero."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from lightning_anatomy.data import collate_pairs
from tests.callbacks.test_blocking import (
    assert_grads_close,
    blocking,
    hand_grads,
    hand_penalty,
    make_module,
    penalty_value,
    perturb,
)
from tests.helpers.concept_callback_helpers import (
    PAD,
    random_pairs,
)
from tests.helpers.subprocess_helpers import run_python

HOOK = "blocks.0.hook_resid_post"  # block 0's output: hidden_states[1] of the tiny 2-layer GPT-2
TESTS = Path(__file__).resolve().parent
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True}

# Random SAEs reconstruct poorly; the fidelity warning is expected wherever one is checked.
pytestmark = pytest.mark.filterwarnings("ignore:SAE at .* explains only")


# --------------------------------------------------------------------------- helpers


DDP_SCRIPT = """
import sys, torch, lightning as L
sys.path.insert(0, {tests!r})
from tests.helpers.concept_callback_helpers import loader, random_pairs, random_sae
from tests.helpers.intervention_helpers import MemoryLogger
from tests.callbacks.test_blocking import GradRecorder, perturb
from lightning_anatomy import ConceptBlocking
from lightning_anatomy.models.tiny import build_tiny_model
from lightning_anatomy.module import DPOModule

torch.manual_seed(0)
hook = "blocks.0.hook_resid_post"
module = DPOModule(build_tiny_model("gpt2", seed=0), lr=1e-3)
perturb(module.policy)
cb = ConceptBlocking({{"up": (hook, 3), "down": (hook, 7, "amplify")}}, saes={{hook: random_sae(seed=1)}}, lam=50.0)
terms, rows = [], []
original = cb.penalty
cb.penalty = lambda: terms.append(original()) or terms[-1]
keep_rows = L.pytorch.callbacks.LambdaCallback(on_train_batch_start=lambda tr, pl, b, i: rows.append(b["row_ids"]))
grads, logger = GradRecorder(), MemoryLogger()
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=logger, log_every_n_steps=1,
                    callbacks=[cb, keep_rows, grads], enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
trainer.fit(module, loader(random_pairs(8, seed=5), 2))
torch.save({{"terms": [float(t) for t in terms], "rows": rows[0], "grads": grads.steps[0], "logged": logger.rows,
            "blocked_steps": cb.blocked_steps}}, f"result-{{trainer.global_rank}}.pt")
"""


@pytest.mark.slow
def test_ddp_two_processes_give_the_one_process_penalty_and_gradient_and_log_on_rank_zero(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(TESTS))))
    run_python(script, cwd=tmp_path, timeout=180)
    ranks = [torch.load(tmp_path / f"result-{r}.pt", weights_only=True) for r in (0, 1)]
    assert set(ranks[0]["rows"].tolist()).isdisjoint(ranks[1]["rows"].tolist())
    assert all(r["blocked_steps"] == 1 and len(r["terms"]) == 1 for r in ranks)

    # Each rank's term is its share of the mean over both ranks' tokens (2·n_rank/n_all times its own
    # batch's mean), so the DDP-averaged gradient and the logged penalty are one process's on all 8 pairs.
    module = make_module()
    perturb(module.policy)
    pairs = random_pairs(8, seed=5)
    _, score, signs = blocking("sae")
    score2, signs2 = (lambda h: score(h)[:, :2]), signs[:2]
    own = [collate_pairs([pairs[i] for i in r["rows"].tolist()], PAD) for r in ranks]
    tokens = [int(b["completion_mask"].sum()) for b in own]
    assert tokens[0] != tokens[1], [r["rows"].tolist() for r in ranks]  # else a per-rank mean passes too
    for r, batch, n in zip(ranks, own, tokens):
        share = 2 * n / sum(tokens)
        assert r["terms"][0] == pytest.approx(share * penalty_value(module, batch, score2, signs2, 50.0), rel=1e-5)
    whole = collate_pairs([pairs[i] for r in ranks for i in r["rows"].tolist()], PAD)
    expected = hand_grads(module, [whole], lambda m, b: hand_penalty(m, b, score2, signs2, 50.0))
    for r in ranks:
        assert_grads_close(r["grads"], expected, rtol=1e-4, atol=1e-6)
    penalties = [row["concepts/blocking/penalty"] for _, row in ranks[0]["logged"] if "concepts/blocking/penalty" in row]
    assert penalties == [pytest.approx(penalty_value(module, whole, score2, signs2, 50.0), rel=1e-5)]
    assert not any("concepts/blocking/penalty" in row for _, row in ranks[1]["logged"])  # rank 0 logs
