"""ConceptProjection on 2 DDP processes (gloo, CPU): every rank projects with rank zero's basis."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.helpers.subprocess_helpers import run_python

PAD = 3
HOOK = "blocks.0.hook_resid_post"


DDP_SCRIPT = """
import hashlib, json, os, sys
import torch, lightning as L
sys.path.insert(0, {tests!r})
from tests.helpers.intervention_helpers import TinyLM, token_loader, watch, in_span_fraction
from lightning_anatomy.callbacks import ConceptProjection
from lightning_anatomy.concepts import ConceptSet

rank = int(os.environ.get("LOCAL_RANK", 0))
hook = "blocks.1.hook_resid_post"
# each rank builds a slightly different concept set, as nondeterministic audits might
g = torch.Generator().manual_seed(0)
vectors = torch.randn(2, 64, generator=g) + 0.05 * rank * torch.randn(2, 64, generator=torch.Generator().manual_seed(9))
concepts = ConceptSet.from_vectors(vectors, hook)
rank0_basis = ConceptSet.from_vectors(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)), hook).basis(hook)
callback = ConceptProjection(concepts)
module = TinyLM()
grads = []
probe = watch(module.model, hook, grads=grads)
used = {{}}

class Record(L.Callback):
    def on_train_start(self, trainer, pl_module):
        used["basis"] = callback._targets[hook].suppress.clone()

trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[callback, Record()])
trainer.fit(module, token_loader(n=16, batch_size=4))
probe.remove()
params = torch.cat([p.detach().flatten() for p in module.parameters()])
result = dict(
    rank=trainer.global_rank,
    basis_sha=hashlib.sha256(used["basis"].numpy().tobytes()).hexdigest(),
    basis_vs_rank0=float((used["basis"] - rank0_basis).abs().max()),
    in_span=max(in_span_fraction(g, rank0_basis) for g in grads),
    n_grads=len(grads),
    params_sha=hashlib.sha256(params.numpy().tobytes()).hexdigest(),
    hooks_left=sum(len(m._forward_hooks) for m in module.model.modules()),
)
with open(os.path.join({out!r}, f"rank{{trainer.global_rank}}.json"), "w") as fh:
    json.dump(result, fh)
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_ranks_project_with_rank_zeros_basis(tmp_path):
    tests_dir = str(Path(__file__).resolve().parent)
    script = tmp_path / "ddp_projection.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=tests_dir, out=str(tmp_path))))
    run_python(script, cwd=tmp_path, timeout=170)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["basis_sha"] == results[1]["basis_sha"]  # rank 1 uses rank 0's basis, bit for bit
    assert results[1]["basis_vs_rank0"] < 1e-7
    for r in results:
        assert r["n_grads"] == 2 and r["in_span"] < 1e-6 and r["hooks_left"] == 0
    assert results[0]["params_sha"] == results[1]["params_sha"]  # DDP kept the replicas in sync
