"""Run a test's script in a fresh Python process (the 2-process DDP/FSDP tests, whose launcher
must not inherit a parent's rank variables): one environment rule for all of them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
_RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")


def run_python(script: Path | str, *args: Any, cwd: Path | str, timeout: float) -> subprocess.CompletedProcess:
    """`python script *args` with the repo (and so `tests.helpers`) importable, one intra-op thread per process
    (the ranks share 2 cores), no hub access; fails the test with the output's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for key in _RANK_VARIABLES:
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
