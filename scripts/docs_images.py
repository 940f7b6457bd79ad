"""Regenerate docs/audit_report.png from a real audit run (`make docs-images`).

    .venv/bin/python scripts/docs_images.py [--config configs/audit/embedded.yaml]
                                            [--output-dir outputs/docs_images] [--out docs/audit_report.png]

Runs `anatomy audit` on configs/audit/embedded.yaml (the embedded SmolLM2-135M-Instruct and the
project's SAE on the demo data; about a minute on 2 CPU cores) into `--output-dir`, then takes a
screenshot of the top of the report it wrote (`<output-dir>/audit/report.html`) with Debian's
headless chromium (`apt-get install chromium`): what a user sees on opening it, 1280 px wide —
the summary of what DPO will learn, the "What to do next" box with the command the audit printed,
and the first rows of the ranked concepts. The audit is seeded, so a rerun shows the same report.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
WINDOW = (1280, 1150)  # the screenshot's size in CSS pixels: the page's top, as a browser first shows it


def run(config: Path, output_dir: Path):
    """The audit of `config` written to `output_dir`, parsed and checked as `anatomy audit` does; its AuditResult."""
    from lightning_anatomy.audit.job import run_audit
    from lightning_anatomy.cli import job_config

    return run_audit(job_config("audit", ["--config", str(config), f"--output_dir={output_dir}"]))


def screenshot(page: Path, out: Path, size: tuple[int, int] = WINDOW) -> None:
    """`page` as headless chromium renders it at `size`, written to `out` (atomically)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("docs-images needs Debian's chromium (apt-get install chromium); none is on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: nothing of a user's browser leaks in
        done = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               "--force-device-scale-factor=1", f"--user-data-dir={profile}",
                               f"--window-size={size[0]},{size[1]}", f"--screenshot={tmp}",
                               page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not tmp.is_file():
        raise SystemExit(f"chromium could not take the screenshot (exit {done.returncode}): {done.stderr[-2000:]}")
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "audit" / "embedded.yaml")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs") / "docs_images")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "audit_report.png")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    run(args.config, args.output_dir)
    audited = time.perf_counter()
    report = args.output_dir / "audit" / "report.html"
    screenshot(report, args.out)
    print(f"wrote {args.out} (audit {audited - start:.0f} s, screenshot {time.perf_counter() - audited:.1f} s); "
          f"the report itself: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
