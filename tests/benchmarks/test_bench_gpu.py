"""benchmarks/gpu.py: skips cleanly without CUDA, runs every code path on a tiny CPU model
(`--smoke`, CUDA-only parts left out), and is configured for the issue's GPU settings."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.bench_loader import BENCH, load_benchmark


def test_gpu_benchmark_is_configured_for_qwen2_shapes_at_the_issue_settings():
    gpu = load_benchmark("gpu")
    cost = load_benchmark("cost")
    expected = {"qwen2-0.5b": (0.45e9, 0.55e9), "qwen2-1.5b": (1.45e9, 1.6e9)}
    assert [s.name for s in gpu.GPU] == list(expected)
    for setting in gpu.GPU:
        assert (setting.pairs_per_step, setting.seq_len, setting.precision, setting.d_sae) == (8, 512, "bf16-true",
                                                                                              16384)
        assert {"projection_own", "projection_all_later", "attribution", "drift_probing", "blocking"} <= set(
            setting.conditions)
        model = cost.build_random_model(setting.source.split(":", 1)[1], "meta", torch.bfloat16)  # no memory
        n = sum(p.numel() for p in model.parameters())
        low, high = expected[setting.name]
        assert low < n < high and model.config.hidden_size == setting.width
        assert model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gpu.py would measure")
def test_gpu_benchmark_skips_cleanly_without_cuda(tmp_path):
    gpu = load_benchmark("gpu")
    assert gpu.main(["--out", str(tmp_path)]) is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_its_code_path_on_a_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--smoke", "--out", str(tmp_path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.smoke.json").read_text())
    assert results["format"] == "lightning-anatomy/bench-gpu" and results["smoke"] is True
    (model,) = results["models"].values()
    assert set(model["callbacks"]["conditions"]) == {"vanilla", "attribution"}
    trl = model["trl"]
    for ratio in (trl["steps_per_s_ratio"], trl["full_logits"]["steps_per_s_ratio"],
                  trl["chunked_vs_full_logits"]["step_memory_ratio"]):
        assert math.isfinite(ratio) and ratio > 0
    smoke = model["fsdp_smoke"]
    assert set(smoke) == {"unsharded", "fsdp2"}  # FSDP1 needs a GPU under Lightning
    assert all(f["ok"] for f in smoke.values()), {k: f.get("error") for k, f in smoke.items()}
    assert "FSDP on one device (smoke):" in proc.stdout and "| tiny-qwen2 | fsdp2 | ok |" in proc.stdout
