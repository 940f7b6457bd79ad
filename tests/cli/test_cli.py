"""The `anatomy` CLI: LightningCLI fit on tiny configs, audit -> edited ConceptSet -> projected
fit, and validation that names the bad key before any model loads."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import yaml

from lightning_anatomy.cli import main, normalize_args

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/tiny.yaml")


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if anything loads a model or tokenizer: validation must come first."""
    import importlib

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    # the modules that bind the loaders at import are imported first (so they keep the real ones
    # after this test) and patched too: wherever DPOModule and the data module load
    for name in ("lightning_anatomy.models.loading", "lightning_anatomy.module", "lightning_anatomy.policy",
                 "lightning_anatomy.data.datamodule"):
        module = importlib.import_module(name)
        for loader in ("load_model", "load_tokenizer"):
            if hasattr(module, loader):
                monkeypatch.setattr(module, loader, refuse)


def _metrics(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_audit_then_fit_with_the_exported_concept_set(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "audit"
    assert main(["audit", "--config", str(REPO / "configs/audit/tiny.yaml"), f"--output_dir={out}",
                 "--audit.n_bootstrap=50", "--data.source=toy:32"]) == 0
    printed = capsys.readouterr().out
    assert "strongest concepts" in printed and "report.html" in printed
    concept_dir = out / "audit" / "concept_set"
    assert (out / "audit" / "report.html").exists()
    spec = yaml.safe_load((concept_dir / "concepts.yaml").read_text())
    # the concepts DPO is predicted to push up most come marked suppress (the printed command acts on them)
    marked = [c for c in spec["concepts"] if c["action"] == "suppress"]
    assert marked and all(c["source"]["audit"]["predicted_direction"] == "amplify" for c in marked)
    assert all(c["action"] in ("allow", "suppress") for c in spec["concepts"])
    for c in spec["concepts"]:
        c["action"] = "allow"
    (concept_dir / "concepts.yaml").write_text(yaml.safe_dump(spec))

    # the shipped config, pointed at this audit's ConceptSet (its path is relative to the working folder)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "audit_tiny").symlink_to(out)
    fit = ["fit", "--config", str(REPO / "configs/fit_projected_tiny.yaml"), "--trainer.max_steps=2",
           f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.enable_progress_bar=false"]
    # an all-allow set gives the projection nothing to act on: one line naming the key, exit 2
    assert main(fit) == 2
    assert "suppress" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "projected" / "version_0").exists()  # a failed start leaves no empty run
    spec["concepts"][0]["action"] = "suppress"
    (concept_dir / "concepts.yaml").write_text(yaml.safe_dump(spec))
    assert main(fit) == 0
    rows = _metrics(tmp_path / "runs" / "projected" / "version_0")
    keys = set(rows[0])
    assert {"train/loss", "concepts/attribution/feature_17",
            "concepts/projection/blocks.1.hook_resid_post/grad_fraction"} <= keys
    assert len([r for r in rows if r["train/loss"]]) == 2


@pytest.mark.slow
def test_fit_prints_where_everything_went_and_stores_the_resolved_config(tmp_path, capsys):
    save = tmp_path / "runs"
    assert main(["fit", "--config", TINY, "--trainer.max_steps=2", f"--trainer.logger.init_args.save_dir={save}",
                 "--model.lr=1e-3", "--trainer.enable_progress_bar=false"]) == 0
    run = save / "tiny" / "version_0"
    lines = capsys.readouterr().out.strip().splitlines()
    assert f"logs: {run}" in lines and f"checkpoints: {run / 'checkpoints'}" in lines
    assert lines[-1] == f"saved model: {run / 'final'}"
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["model"]["init_args"]["lr"] == 1e-3 and stored["trainer"]["max_steps"] == 2
    assert stored["data"]["init_args"]["tokenizer"] == "tiny:gpt2"  # filled from the policy
    assert len([r for r in _metrics(run) if r["train/loss"]]) == 2
    # `validate` scores the trained checkpoint with the same config
    assert main(["validate", "--config", TINY, f"--trainer.logger.init_args.save_dir={save}",
                 f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "--trainer.enable_progress_bar=false"]) == 0
    assert "val/rewards/accuracies" in capsys.readouterr().out


def test_old_dotlist_overrides_read_as_flags():
    assert normalize_args(["fit", "trainer.max_steps=3", "--ckpt-path", "x.ckpt"]) == [
        "fit", "--trainer.max_steps=3", "--ckpt_path", "x.ckpt"]
    # a hook name holds dots: --saes.<hook>=<spec> becomes one mapping
    args = normalize_args(["audit", "saes.blocks.9.hook_resid_post=random:256", "--saes.blocks.2.hook_mlp_out=x/y"])
    assert args[0] == "audit" and yaml.safe_load(args[1].split("=", 1)[1]) == {
        "blocks.9.hook_resid_post": "random:256", "blocks.2.hook_mlp_out": "x/y"}


@pytest.mark.parametrize(("override", "message"), [
    ("--trainer.max_steps=abc", 'trainer.max_steps".*Expected a .*int.* abc'),
    ("--model.lr=fast", 'model.lr".*float.* fast'),
    ("--model.learning_rate=1", "model.*learning_rate"),
    ("--trainer.max_stepz=3", "max_stepz"),
    ("--data.batch_size=eight", 'data.batch_size".*int.* eight'),
    ("--data.source=missing.jsonl", "data.source='missing.jsonl'.*toy"),
    ("--model.policy=tiny:gtp2", "model.policy='tiny:gtp2'.*gpt2"),
    ("--model.policy=./no/such/dir", "model.policy='./no/such/dir'"),
    ("--checkpoint.every_n_train_steps=often", "checkpoint.every_n_train_steps"),
    ("--save.merge_adapters=maybe", "save.merge_adapters"),
    ("--trainer.callbacks+=lightning_anatomy.ConceptProjection", "concepts"),
])
def test_bad_fit_inputs_name_the_key_before_any_model_loads(override, message, no_model_loads, capsys, tmp_path):
    rc = main(["fit", "--config", TINY, f"--trainer.logger.init_args.save_dir={tmp_path}", override])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("anatomy fit: error:")
    assert re.search(message, err, flags=re.S), err
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_bad_callback_specs_name_the_callback_and_key(no_model_loads, capsys, tmp_path):
    bad_concepts = ["--trainer.callbacks+=lightning_anatomy.ConceptProjection",
                    f"--trainer.callbacks.concepts={tmp_path / 'nope'}"]
    assert main(["fit", "--config", TINY, *bad_concepts]) == 2
    assert "trainer.callbacks[0] (ConceptProjection).concepts" in capsys.readouterr().err
    bad_sae = ["--trainer.callbacks+=lightning_anatomy.ConceptAttribution",
               "--trainer.callbacks.saes={blocks.1.hook_resid_post: 'random:lots'}"]
    assert main(["fit", "--config", TINY, *bad_sae]) == 2
    err = capsys.readouterr().err
    assert "trainer.callbacks[0] (ConceptAttribution).saes['blocks.1.hook_resid_post']" in err and "random" in err


@pytest.mark.slow
def test_help_lists_every_key_with_type_and_default(capsys):
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("--trainer.max_steps", "--model.lr LR", "--model.loss_type", "--data.source", "--data.batch_size",
                "--checkpoint.every_n_train_steps", "--save.final", "ConceptBlocking"):
        assert key in out, key
    assert "(type: float, default: 1e-05)" in out
    assert main(["audit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--saes SAES" in out and "--audit.method" in out and "--data.source" in out
    # every audit option says what it does (AuditOptions' Args), not only its type
    flat = " ".join(out.split())
    assert "--audit.tau TAU (paper) a feature is active in a span" in flat
    assert "--audit.confidence CONFIDENCE level of the bootstrap CI" in flat


def test_print_config_shows_the_resolved_config(capsys):
    assert main(["fit", "--config", TINY, "--model.beta=0.3", "--print_config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["init_args"]["beta"] == 0.3 and cfg["trainer"]["max_steps"] == 30
    assert cfg["checkpoint"]["every_n_train_steps"] == 100
    assert main(["audit", "--config", str(REPO / "configs/audit/tiny.yaml"), "--print_config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["saes"] == {"blocks.1.hook_resid_post": "random:256"} and cfg["audit"]["n_bootstrap"] == 200


@pytest.mark.parametrize(("args", "message"), [
    (["--saes={}"], "saes"),
    (["--saes=notamapping"], "saes"),
    (["--saes={blocks.1.hook_resid_post: ./no/such/sae}"], r"saes\['blocks.1.hook_resid_post'\]"),
    (["--audit.method=papr"], "method"),
    (["--audit.n_bootstrap=many"], "audit.n_bootstrap"),
    (["--data.on_bad_rows=ignore"], "on_bad_rows"),
    (["--data.source=nope.parquet"], "data.source"),
    (["--model.policy=tiny:nope"], "model.policy"),
    (["--output_dirr=x"], "output_dirr"),
])
def test_bad_audit_inputs_name_the_key_before_any_model_loads(args, message, no_model_loads, capsys):
    assert main(["audit", "--config", str(REPO / "configs/audit/tiny.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("anatomy audit: error:") and re.search(message, err), err


def test_demo_and_check_prediction_validate_first(no_model_loads, capsys):
    assert main(["demo", "--config", str(REPO / "configs/demo.yaml"), "--sycophancy.intervention.kind=prayer"]) == 2
    assert "sycophancy.intervention.kind" in capsys.readouterr().err
    assert main(["demo", "--config", str(REPO / "configs/demo.yaml"), "--style.train.max_steps=0"]) == 2
    assert "style.train.max_steps" in capsys.readouterr().err
    assert main(["demo", "--config", str(REPO / "configs/demo.yaml"), "--style.data.n_train=90"]) == 2
    assert "exceeds the 96 shipped replies" in capsys.readouterr().err
    assert main(["demo", "--config", str(REPO / "configs/demo.yaml"), "--stories=[]"]) == 2
    assert "stories is empty" in capsys.readouterr().err
    assert main(["demo", "--config", str(REPO / "configs/demo.yaml"), "--sycophancy.train.micro_batch_size=3"]) == 2
    assert "sycophancy.train.micro_batch_size=3 does not divide sycophancy.train.batch_size=8" in capsys.readouterr().err
    assert main(["check-prediction", "--config", str(REPO / "configs/check_prediction/tiny.yaml"),
                 "--audit=/nonexistent"]) == 2
    assert "not a saved audit directory" in capsys.readouterr().err
    for bad, key in (("--prediction.tilt_sample=pooled", "prediction.tilt_sample"),
                     ("--prediction.predictors=[tilt,tilt]", "prediction.predictors"),
                     ("--prediction.predictors=[oracle]", "prediction.predictors")):
        assert main(["check-prediction", "--config", str(REPO / "configs/check_prediction/tiny.yaml"), bad]) == 2
        assert key in capsys.readouterr().err


def test_unknown_command_and_bare_call(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert main([]) == 2
    assert main(["--help"]) == 0 and "check-prediction" in capsys.readouterr().out


@pytest.mark.slow
def test_console_is_quiet_and_the_bar_counts_optimizer_steps(tmp_path, capfd):
    assert main(["fit", "--config", TINY, "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
                 f"--trainer.logger.init_args.save_dir={tmp_path}"]) == 0
    out, err = capfd.readouterr()
    console = out + err
    assert "train steps" in console and "3/3" in console
    assert not re.search(r"Epoch \d+/-", console)
    for noise in ("Tip:", "in eval mode", "GPU available", "litlogger", "Writing model shards"):
        assert noise not in console, noise
