"""DPOModule on 2 DDP processes (gloo, CPU) equals one process."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.helpers.subprocess_helpers import run_python
from tests.training.test_module import _read_csv_metrics

REPO = Path(__file__).resolve().parents[2]


DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from lightning_anatomy import DPOModule, PreferenceDataModule
    from lightning_anatomy.data.toy import make_toy_preferences
    from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer

    devices, batch_size, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    L.seed_everything(0)
    tok = build_tiny_tokenizer()
    policy = build_tiny_model("gpt2", vocab_size=len(tok), seed=0)
    # Adam's first steps are ~lr*sign(g): a large eps keeps float-order noise in near-zero
    # gradient entries from being amplified, so trajectories can be compared tightly.
    module = DPOModule(policy, lr=1e-3, adam_eps=1e-4)
    dm = PreferenceDataModule(make_toy_preferences(32, seed=0), tok, batch_size=batch_size, val_fraction=0.0,
                              max_length=48, max_prompt_length=32, seed=0, shuffle=False)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto", logger=CSVLogger(out, name="run"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    if trainer.is_global_zero:
        flat = torch.cat([p.detach().flatten() for p in module.policy.parameters()])
        json.dump({"param_sum": float(flat.double().sum()), "param_norm": float(flat.norm())},
                  open(out + "/params.json", "w"))
""")


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    losses, params = {}, {}
    for devices, bs in ((1, 8), (2, 4)):
        out = tmp_path / f"d{devices}"
        out.mkdir()
        run_python(script, devices, bs, out, cwd=tmp_path, timeout=240)
        rows = _read_csv_metrics(out / "run" / "version_0")
        losses[devices] = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
        params[devices] = json.loads((out / "params.json").read_text())
    assert len(losses[1]) == len(losses[2]) == 4
    for a, b in zip(losses[1], losses[2]):
        assert abs(a - b) < 2e-6, (losses[1], losses[2])
    assert abs(params[1]["param_norm"] - params[2]["param_norm"]) < 1e-5
