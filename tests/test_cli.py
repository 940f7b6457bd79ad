"""The `anatomy` CLI end to end on tiny configs: audit -> edited ConceptSet -> projected fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_anatomy.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_audit_then_fit_with_the_exported_concept_set(tmp_path, capsys):
    out = tmp_path / "audit"
    assert main(["audit", "--config", str(REPO / "configs/audit/tiny.yaml"), f"output_dir={out}",
                 "audit.n_bootstrap=50", "data.toy_size=32"]) == 0
    printed = capsys.readouterr().out
    assert "strongest concepts" in printed and "report.html" in printed
    concept_dir = out / "audit" / "concept_set"
    assert (out / "audit" / "report.html").exists()
    spec = yaml.safe_load((concept_dir / "concepts.yaml").read_text())
    assert spec["concepts"] and all(c["action"] == "allow" for c in spec["concepts"])

    # nothing is suppressed until the user says so: the projection refuses an all-allow set
    fit = ["fit", "--config", str(REPO / "configs/fit_projected_tiny.yaml"), f"callbacks.0.concepts={concept_dir}",
           "trainer.max_steps=2", f"logger.save_dir={tmp_path}", "trainer.enable_progress_bar=false"]
    with pytest.raises(ValueError, match="suppress"):
        main(fit)
    spec["concepts"][0]["action"] = "suppress"
    (concept_dir / "concepts.yaml").write_text(yaml.safe_dump(spec))
    assert main(fit) == 0
    metrics = (tmp_path / "projected" / "version_0" / "metrics.csv").read_text()
    assert "grad_fraction" in metrics and "train/loss" in metrics


def test_audit_config_without_saes_is_refused(tmp_path):
    cfg = tmp_path / "no_saes.yaml"
    cfg.write_text("model: {policy: 'tiny:gpt2'}\ndata: {source: toy}\n")
    with pytest.raises(ValueError, match="saes"):
        main(["audit", "--config", str(cfg), f"output_dir={tmp_path / 'out'}"])


def test_bad_override_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="saes"):
        main(["audit", "--config", str(REPO / "configs/audit/tiny.yaml"), "saes=notamapping"])


def test_unknown_callback_class_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"callbacks\[0\]\.class"):
        main(["fit", "--config", str(REPO / "configs/tiny.yaml"), "trainer.max_steps=1",
              f"logger.save_dir={tmp_path}", "callbacks=[{class: Nope}]"])
