"""Shared test setup: offline everything, deterministic, small thread count."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads starve a shared CPU

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: the tiny test models are overhead-bound, and oversubscribed cores slow them ~10x.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_RLHF = SHARED_DATA / "hh-rlhf-harmless-test-a.jsonl"


@pytest.fixture
def hh_rlhf_path() -> Path:
    if not HH_RLHF.exists():
        pytest.skip("../shared/data is absent (only present beside the project checkout)")
    return HH_RLHF


@pytest.fixture(autouse=True)
def _seed_and_cwd(tmp_path, monkeypatch):
    """Each test starts seeded and in its own directory (wandb/, runs/, caches land in tmp)."""
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)
    yield
