"""Every code block of the README runs as written, offline, in a fresh folder (tiny or embedded models).

Python blocks run with `exec`, bash blocks with `bash -euo pipefail` (`.venv` and `configs/` are
links into this checkout, `../shared` to the shared data when it exists), YAML blocks must be part
of a shipped config. A block that cannot run here says why in a `<!-- not run: reason -->` line
right above it; its Python still has to compile.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SHARED = REPO.parent / "shared"
FENCE = re.compile(r"(?:<!-- (?P<note>[^>]*?) -->\n)?```(?P<lang>\w+)\n(?P<body>.*?)```", re.S)


def blocks() -> list[dict[str, str]]:
    text = README.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start("body")) + 1
        found.append({"lang": m["lang"], "body": m["body"], "note": m["note"] or "", "id": f"{m['lang']}@{line}"})
    return found


BLOCKS = blocks()


def by_lang(*langs: str) -> list[dict[str, str]]:
    return [pytest.param(b, id=b["id"]) for b in BLOCKS if b["lang"] in langs]


def skipped(block: dict[str, str]) -> str | None:
    note = block["note"]
    if note.startswith("not run:"):
        reason = note.removeprefix("not run:").strip()
        assert reason, f"README block {block['id']}: 'not run:' needs a reason"
        return reason
    return None


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh folder laid out like a checkout: configs/, .venv and ../shared are links."""
    work = tmp_path / "repo"
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    (work / ".venv").symlink_to(Path(sys.prefix))
    if SHARED.is_dir():
        (tmp_path / "shared").symlink_to(SHARED)
    monkeypatch.chdir(work)
    return work


def test_readme_blocks_are_known_kinds():
    assert {b["lang"] for b in BLOCKS} <= {"python", "bash", "yaml"}
    assert len(by_lang("python")) >= 4 and len(by_lang("bash")) >= 3
    assert sum(1 for b in BLOCKS if skipped(b)) <= 2  # almost everything runs


@pytest.mark.parametrize("block", by_lang("python"))
def test_readme_python_block_runs(block, workdir):
    code = compile(block["body"], f"README.md[{block['id']}]", "exec")
    reason = skipped(block)
    if reason:
        pytest.skip(reason)
    exec(code, {"__name__": "__readme__"})


@pytest.mark.slow
@pytest.mark.parametrize("block", by_lang("bash"))
def test_readme_bash_block_runs(block, workdir):
    reason = skipped(block)
    if reason:
        pytest.skip(reason)
    if "../shared" in block["body"] and not SHARED.is_dir():
        pytest.skip("the shared data (../shared) is absent")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block["body"]], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"README {block['id']} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if "anatomy fit" in block["body"]:
        assert "saved model: " in proc.stdout  # a fit says where its model went


@pytest.mark.parametrize("block", by_lang("yaml"))
def test_readme_yaml_block_is_part_of_a_shipped_config(block):
    shown = yaml.safe_load(block["body"])
    configs = [yaml.safe_load(p.read_text()) for p in (REPO / "configs").rglob("*.yaml")]
    assert any(_contains(cfg, shown) for cfg in configs), f"README {block['id']} is in no file of configs/"


def _contains(config, part) -> bool:
    """True when `part` is `config` with some keys (or trailing list items) left out."""
    if isinstance(part, dict):
        return isinstance(config, dict) and all(k in config and _contains(config[k], v) for k, v in part.items())
    if isinstance(part, list):
        return isinstance(config, list) and len(part) <= len(config) and all(
            _contains(c, p) for c, p in zip(config, part))
    return config == part
