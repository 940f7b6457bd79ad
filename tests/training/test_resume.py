"""Resume = uninterrupted: every reference mode, concept callbacks attached, shuffle on, at an epoch
end and mid-epoch, on 1 and 2 (DDP) processes; and what a checkpoint holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.resume_helpers import N_ROWS, after, run

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.filterwarnings("ignore:SAE at .* explains only")

# 9 batches per epoch: step 9 closes epoch 0, step 5 is mid-epoch. 12 steps cross into epoch 1.
TOTAL = 12


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["copy", "precomputed", "peft"])
@pytest.mark.parametrize("stop", [5, 9], ids=["mid_epoch", "epoch_end"])
def test_resumed_run_logs_exactly_what_the_uninterrupted_run_logs(tmp_path, reference, stop):
    full = run(reference, TOTAL, tmp_path / "full")
    first = run(reference, TOTAL, tmp_path / "part", stop_at=stop)
    resumed = run(reference, TOTAL, tmp_path / "part", ckpt_path=first["ckpt"])

    assert first["batches"] + resumed["batches"] == full["batches"]  # the same batches, in the same order
    assert full["batches"][9] != full["batches"][0]  # epoch 1 has its own order
    expected, got = after(full["records"], stop), after(resumed["records"], stop)
    assert {k for k in expected if k[1].startswith("train/")} and {k for k in expected if k[1].startswith("val/")}
    assert any(v != 0 for k, v in expected.items() if k[1].startswith("concepts/drift/"))  # probes that moved
    assert any(v != 0 for k, v in expected.items() if k[1].startswith("concepts/attribution/"))
    assert got.keys() == expected.keys()
    assert [k for k in expected if got[k] != expected[k]] == []  # exact in fp32 on CPU


@pytest.mark.slow
def test_checkpoint_holds_no_reference_weights_and_the_precomputed_table(tmp_path):
    copy_run = run("copy", 4, tmp_path / "copy", stop_at=2)
    ckpt = torch.load(copy_run["ckpt"], weights_only=False, map_location="cpu")
    assert [k for k in ckpt["state_dict"] if k.startswith("reference.")] == []
    assert any(k.startswith("reference.") for k in copy_run["state_keys"])  # the module does have one
    assert ckpt["lightning_anatomy"]["reference_digest"]

    pre = run("precomputed", 4, tmp_path / "pre", stop_at=2)
    table = torch.load(pre["ckpt"], weights_only=False, map_location="cpu")["lightning_anatomy"]["reference_logps"]
    assert table["row_ids"].tolist() == list(range(N_ROWS)) and torch.isfinite(table["chosen"]).all()
    assert table["chosen"].shape == table["rejected"].shape == (N_ROWS,)


def test_resume_against_another_reference_is_refused(tmp_path):
    import lightning as L

    from lightning_anatomy import DPOModule
    from lightning_anatomy.models.tiny import build_tiny_model

    first = run("copy", 4, tmp_path, stop_at=2)
    other = DPOModule(build_tiny_model("gpt2", seed=1, vocab_size=260))
    ckpt = torch.load(first["ckpt"], weights_only=False, map_location="cpu")
    with pytest.raises(ValueError, match="not the one the checkpoint was trained against"):
        other.on_load_checkpoint(ckpt)
    pre = DPOModule(build_tiny_model("gpt2", seed=0, vocab_size=260), reference="precomputed")
    with pytest.raises(ValueError, match="holds no precomputed reference log-probs"):
        pre.on_load_checkpoint({"state_dict": {}})
    del L




