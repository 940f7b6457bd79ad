"""What a user sees when they get something wrong through `anatomy`: one line on stderr that names
the flag to change, exit status 2, no traceback (ANATOMY_DEBUG=1 shows it); a misspelt key gets the
key meant; abbreviations are refused. And the audit's printed next step runs as printed. And every
spec kind is parsed once: its check and its load give the same message for the same mistake."""

from __future__ import annotations

import contextlib
import io
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import lightning_anatomy
from lightning_anatomy.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/tiny.yaml")
TINY_AUDIT = str(REPO / "configs/audit/tiny.yaml")


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"anatomy {command}: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """One tiny audit (module-wide): its folder, its concept set and the printed next-step command."""
    root = tmp_path_factory.mktemp("audit")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["audit", "--config", TINY_AUDIT, f"--output_dir={root / 'out'}", "--audit.n_bootstrap=50",
                     "--data.source=toy:48", "--data.limit=40"]) == 0
    printed = out.getvalue()
    command = next(ln for ln in printed.splitlines() if ln.startswith("then train with it: "))
    return root / "out", command[len("then train with it: "):], printed


# ---------------------------------------------------------------------------------------- user errors


@pytest.mark.slow
def test_bad_data_rows_name_the_on_bad_rows_flag(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\nnot json\n')
    assert main(["fit", "--config", TINY, f"--data.source={bad}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                 "--trainer.enable_progress_bar=false"]) == 2
    line = _one_error_line(capsys, "fit")
    assert "--data.on_bad_rows=skip" in line and "row 1 (line 2)" in line and "(+1 more)" in line
    assert 'on_bad_rows="skip"' not in line


@pytest.mark.slow
def test_a_used_output_folder_names_output_dir(audited, capsys):
    out, _, _ = audited
    assert main(["audit", "--config", TINY_AUDIT, f"--output_dir={out}", "--audit.n_bootstrap=50",
                 "--data.source=toy:20"]) == 2
    line = _one_error_line(capsys, "audit")
    assert "different fingerprint" in line and "--output_dir" in line and "out_dir" not in line.replace(
        "--output_dir", "")


def test_a_concept_set_with_nothing_to_act_on_names_the_callback_key(audited, tmp_path, capsys):
    out, _, _ = audited
    allow = tmp_path / "allow"
    shutil.copytree(out / "audit" / "concept_set", allow)
    doc = yaml.safe_load((allow / "concepts.yaml").read_text())
    for c in doc["concepts"]:
        c["action"] = "allow"
    (allow / "concepts.yaml").write_text(yaml.safe_dump(doc))
    assert main(["fit", "--config", TINY, "--trainer.callbacks+=lightning_anatomy.ConceptProjection",
                 f"--trainer.callbacks.concepts={allow}", "--trainer.max_steps=1",
                 f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.enable_progress_bar=false"]) == 2
    line = _one_error_line(capsys, "fit")
    assert "'suppress' or 'amplify'" in line and "--trainer.callbacks.concepts" in line


@pytest.mark.parametrize(("spec", "message"), [
    ("./models/my-sft", "no such directory"),
    ("org/name", "HF_HUB_OFFLINE=1"),  # tests run offline: refused at once, not after minutes of retries
])
def test_a_missing_or_unreachable_model_is_one_line(spec, message, tmp_path, capsys):
    start = time.perf_counter()
    assert main(["fit", "--config", TINY, f"--model.policy={spec}",
                 f"--trainer.logger.init_args.save_dir={tmp_path}"]) == 2
    assert time.perf_counter() - start < 30
    line = _one_error_line(capsys, "fit")
    assert f"model.policy={spec!r}" in line and message in line and "Repo id" not in line


def test_a_wrong_sae_width_names_saes(tmp_path, capsys):
    from sae_lens import StandardSAE, StandardSAEConfig

    StandardSAE(StandardSAEConfig(d_in=32, d_sae=64)).save_model(str(tmp_path / "sae"))  # tiny:gpt2 is 64 wide
    assert main(["audit", "--config", TINY_AUDIT, f"--output_dir={tmp_path / 'out'}",
                 f"--saes={{blocks.1.hook_resid_post: {tmp_path / 'sae'}}}"]) == 2
    line = _one_error_line(capsys, "audit")
    assert "SAE d_in=32" in line and "--saes" in line


def test_a_bad_checkpoint_path_names_ckpt_path(tmp_path, capsys):
    assert main(["fit", "--config", TINY, "--ckpt_path=nope.ckpt", f"--trainer.logger.init_args.save_dir={tmp_path}"]) == 2
    assert "ckpt_path='nope.ckpt' is not a file" in _one_error_line(capsys, "fit")


@pytest.mark.slow
@pytest.mark.parametrize(("args", "expected"), [
    (["--model.beta=-1"], "beta must be a finite number > 0, got beta=-1.0; TRL's default is beta=0.1 "
                          "(change --model.beta)"),
    (["--data.val_fraction=2"], "(change --data.val_fraction)"),
])
def test_a_value_a_constructor_refuses_names_its_flag(args, expected, tmp_path, capsys):
    assert main(["fit", "--config", TINY, *args, f"--trainer.logger.init_args.save_dir={tmp_path}"]) == 2
    assert _one_error_line(capsys, "fit").endswith(expected)


def test_anatomy_debug_shows_the_traceback(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ANATOMY_DEBUG", "1")
    assert main(["fit", "--config", TINY, "--model.policy=./nope", f"--trainer.logger.init_args.save_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("anatomy fit: error: model.policy=")


# ---------------------------------------------------------------------------------------- keys


@pytest.mark.parametrize(("command", "args", "expected"), [
    ("fit", ["--model.lrr=1"], "unknown key --model.lrr; did you mean --model.lr?"),
    ("fit", ["--data.batchsize=3"], "unknown key --data.batchsize; did you mean --data.batch_size?"),
    ("fit", ["--modl.lr=3"], "unknown key --modl.lr; did you mean --model.lr?"),
    ("fit", ["--trainer.max_step=10"], "unknown key --trainer.max_step; did you mean --trainer.max_steps?"),
    ("audit", ["--audit.n_bootstrp=3"], "unknown key --audit.n_bootstrp; did you mean --audit.n_bootstrap?"),
    ("audit", ["--output_dirr=x"], "unknown key --output_dirr; did you mean --output_dir?"),
])
def test_misspelt_and_abbreviated_keys_suggest_the_key_meant(command, args, expected, tmp_path, capsys):
    config = TINY if command == "fit" else TINY_AUDIT
    assert main([command, "--config", config, *args]) == 2
    assert _one_error_line(capsys, command) == f"anatomy {command}: error: {expected}"
    assert not (tmp_path / "runs").exists()  # `--trainer.max_step` is not read as `--trainer.max_steps`


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"anatomy {lightning_anatomy.__version__}"


@pytest.mark.slow
def test_help_shows_the_projects_keys_first_and_survives_a_closed_pipe(tmp_path):
    script = "import sys; from lightning_anatomy.cli import main; sys.exit(main())"
    done = subprocess.run(f"{shlex.quote(sys.executable)} -c {shlex.quote(script)} fit --help | head -5",
                          shell=True, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert "--model.policy" in done.stdout  # the project's keys come before Lightning's trainer options


# ---------------------------------------------------------------------------------------- the next step


@pytest.mark.slow
def test_the_audits_next_step_runs_as_printed(audited, tmp_path, monkeypatch):
    out, command, printed = audited
    assert "marked suppress" in printed
    marked = [c for c in yaml.safe_load((out / "audit" / "concept_set" / "concepts.yaml").read_text())["concepts"]
              if c["action"] == "suppress"]
    assert marked and all(c["source"]["audit"]["predicted_direction"] == "amplify" for c in marked)
    args = shlex.split(command)
    assert args[:2] == ["anatomy", "fit"]
    for flag in ("--model.policy=tiny:gpt2", "--model.lr=0.003", "--data.source=toy:48", "--data.limit=40",
                 "--data.on_bad_rows=error", "--data.max_length=64", "--data.max_prompt_length=32"):
        assert flag in args, (flag, args)
    monkeypatch.chdir(tmp_path)
    assert main([*args[1:], "--trainer.max_steps=1", "--trainer.enable_progress_bar=false"]) == 0
    assert (tmp_path / "runs" / "fit" / "version_0" / "final").is_dir()


def test_real_models_get_a_dpo_learning_rate():
    from lightning_anatomy.audit.next_step import train_command

    command = train_command("cs", policy="embedded", data={"source": "x.jsonl", "on_bad_rows": "skip", "limit": 10,
                                                          "max_length": 256})
    assert "--model.lr=5e-06" in command and "--data.on_bad_rows=skip" in command and "--data.limit=10" in command


# ---------------------------------------------------------------------------------------- spec kinds


@pytest.mark.parametrize("spec", ["./missing/model", "tiny:gtp2", "org/name", "a/b/c", ""])
def test_model_spec_check_and_load_share_one_parse(spec):
    from lightning_anatomy.models.loading import check_model_spec, load_model
    from lightning_anatomy.models.specs import SpecError

    with pytest.raises(SpecError) as checked:
        check_model_spec(spec, "model")
    with pytest.raises(SpecError) as loaded:
        load_model(spec)
    assert str(checked.value) == str(loaded.value) and "\n" not in str(checked.value)


@pytest.mark.parametrize("spec", ["random:lots", "./no/sae", "justaword", {"release": "x"}, 3,
                                  "gpt2-small-res-jb/blocks.8.hook_resid_pre"])
def test_sae_spec_check_and_load_share_one_parse(spec):
    from lightning_anatomy.concepts.sae import SAELoadError, check_sae_spec, load_sae

    with pytest.raises(SAELoadError) as checked:
        check_sae_spec(spec, "saes['h']")
    with pytest.raises(SAELoadError) as loaded:
        load_sae(spec, where="saes['h']")
    assert str(checked.value) == str(loaded.value) and "\n" not in str(checked.value)


def test_the_data_module_takes_the_audits_limit():
    from lightning_anatomy import PreferenceDataModule

    dm = PreferenceDataModule("toy:20", "tiny:gpt2", limit=7, val_fraction=0.0, max_length=64, max_prompt_length=32)
    dm.setup("fit")
    assert [p.row_id for p in dm.pairs] == list(range(7))
    with pytest.raises(ValueError, match="limit"):
        PreferenceDataModule("toy:20", "tiny:gpt2", limit=0)
