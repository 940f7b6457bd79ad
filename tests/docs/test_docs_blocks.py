"""Every code block of README.md and of the docs site (docs/*.md) runs as written, offline, in a fresh folder.

Python blocks run with `exec`, bash blocks with `bash -euo pipefail` (`.venv` and `configs/` are
links into this checkout, `../shared` to the shared data when it exists), YAML blocks must be part
of a shipped config, `text` blocks are shown output or pictures and are not run. A block that cannot
run here says why in a `<!-- not run: reason -->` line right above it; its Python still has to
compile. A page whose blocks are signatures rather than examples is listed in `NOT_EXAMPLES` with
the reason. The README's Python blocks must also be quiet: no Lightning tips, no model summary, no
random-SAE fidelity warning, no table of NaN.
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
SHARED = REPO.parent / "shared"
FENCE = re.compile(r"(?:<!-- (?P<note>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NOT_EXAMPLES = {  # page -> why its blocks are not run
    "docs/ARCHITECTURE.md": "internal contracts written as signatures and diagrams, not runnable examples",
}
KINDS = {"python", "bash", "yaml", "text"}
NOISE = re.compile(r"Tip:|GPU available:|\| Name +\| Type|explains only .*% of the activation variance|"
                   r"\bNaN\b.*\bNaN\b|module\(s\) in eval mode")


def _page_name(path: Path) -> str:
    return str(path.relative_to(REPO))


def blocks() -> list[dict[str, str]]:
    found = []
    for page in PAGES:
        name = _page_name(page)
        if name in NOT_EXAMPLES:
            continue
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start("body")) + 1
            found.append({"page": name, "lang": m["lang"], "body": m["body"], "note": m["note"] or "",
                          "id": f"{name}:{m['lang'] or 'plain'}@{line}"})
    return found


BLOCKS = blocks()


def by_lang(*langs: str) -> list:
    return [pytest.param(b, id=b["id"]) for b in BLOCKS if b["lang"] in langs]


def skipped(block: dict[str, str]) -> str | None:
    note = block["note"]
    if note.startswith("not run:"):
        reason = note.removeprefix("not run:").strip()
        assert reason, f"{block['id']}: 'not run:' needs a reason"
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
    yield work
    if "wandb" in sys.modules:  # a block that opened a W&B run leaves it to the next block otherwise
        sys.modules["wandb"].finish()
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


def test_blocks_are_known_kinds_and_almost_all_run():
    unknown = [b["id"] for b in BLOCKS if b["lang"] not in KINDS]
    assert not unknown, f"code blocks need a language of {sorted(KINDS)}: {unknown}"
    readme = [b for b in BLOCKS if b["page"] == "README.md"]
    assert sum(b["lang"] == "python" for b in readme) >= 2 and sum(b["lang"] == "bash" for b in readme) >= 2
    assert len(by_lang("python")) >= 8
    assert sum(1 for b in BLOCKS if skipped(b)) <= 5  # almost everything runs


def test_every_page_is_in_the_site_nav():
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    listed = {next(iter(item.values())) for item in nav}
    assert listed == {p.name for p in (REPO / "docs").glob("*.md")}


@pytest.mark.parametrize("block", by_lang("python"))
def test_python_block_runs(block, workdir, capfd):
    code = compile(block["body"], f"{block['id']}", "exec")
    reason = skipped(block)
    if reason:
        pytest.skip(reason)
    exec(code, {"__name__": "__docs__"})
    if block["page"] == "README.md":
        out, err = capfd.readouterr()
        noisy = [line for line in (out + err).splitlines() if NOISE.search(line)]
        assert not noisy, f"{block['id']} is noisy: {noisy}"


@pytest.mark.slow
@pytest.mark.parametrize("block", by_lang("bash"))
def test_bash_block_runs(block, workdir):
    reason = skipped(block)
    if reason:
        pytest.skip(reason)
    if "../shared" in block["body"] and not SHARED.is_dir():
        pytest.skip("the shared data (../shared) is absent")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block["body"]], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{block['id']} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if "anatomy fit" in block["body"]:
        assert "saved model: " in proc.stdout  # a fit says where its model went


@pytest.mark.parametrize("block", by_lang("yaml"))
def test_yaml_block_is_part_of_a_shipped_config(block):
    shown = yaml.safe_load(block["body"])
    configs = [yaml.safe_load(p.read_text()) for p in (REPO / "configs").rglob("*.yaml")]
    assert any(_contains(cfg, shown) for cfg in configs), f"{block['id']} is in no file of configs/"


def _contains(config, part) -> bool:
    """True when `part` is `config` with some keys (or trailing list items) left out."""
    if isinstance(part, dict):
        return isinstance(config, dict) and all(k in config and _contains(config[k], v) for k, v in part.items())
    if isinstance(part, list):
        return isinstance(config, list) and len(part) <= len(config) and all(
            _contains(c, p) for c, p in zip(config, part))
    return config == part


def test_benchmarks_page_is_generated_from_the_results_files():
    """docs/benchmarks.md and the README hold what `python benchmarks/readme_tables.py` renders from
    benchmarks/results/, and every results table is shown on one of them."""
    from tests.helpers.bench_loader import load_benchmark

    tables = load_benchmark("readme_tables")
    pages = {path: path.read_text(encoding="utf-8") for path in tables.PAGES}
    shown = [name for name in tables.TABLES if any(f"<!-- {name}:begin -->" in page for page in pages.values())]
    assert shown == list(tables.TABLES)
    for path, page in pages.items():
        assert tables.render(page, REPO / "benchmarks" / "results") == page, (
            f"{path.relative_to(REPO)} is stale: run `python benchmarks/readme_tables.py`")


def test_contains_reads_partial_configs():
    config = {"a": {"b": 1, "c": [1, 2, 3]}, "d": 2}
    assert _contains(config, {"a": {"c": [1, 2]}}) and not _contains(config, {"a": {"b": 2}})
    assert not _contains(config, {"e": 1}) and not _contains(config, {"a": {"c": [2]}})
