"""What a finished run leaves behind: the trained policy as a Hugging Face folder, checkpoints,
and setup checks that stop a bad run before its first step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_anatomy import DPOModule, PreferenceDataModule
from lightning_anatomy.data import collate_pairs, read_preferences, tokenize_rows
from lightning_anatomy.data.toy import make_toy_preferences
from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
PEFT = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "lora_dropout": 0.0}


def _fit(module: DPOModule, tok, steps: int = 3, **dm_kw) -> PreferenceDataModule:
    dm = PreferenceDataModule(make_toy_preferences(24, seed=0), tok, batch_size=4, val_fraction=0.0,
                              max_length=dm_kw.pop("max_length", 48), max_prompt_length=32, **dm_kw)
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, datamodule=dm)
    return dm


def _logps(model, tok) -> torch.Tensor:
    pairs = tokenize_rows(read_preferences(make_toy_preferences(6, seed=4)), tok, max_length=48, max_prompt_length=32)
    batch = collate_pairs(pairs, tok.pad_token_id)
    from lightning_anatomy.module import sequence_logps

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["input_ids"], batch["completion_mask"])[0]


@pytest.mark.parametrize("peft", [None, "merged", "adapter"])
def test_save_pretrained_loads_back_with_the_trained_log_probs(tmp_path, peft):
    tok = build_tiny_tokenizer()
    module = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok)), lr=5e-3,
                       reference="peft" if peft else "copy", peft_config=dict(PEFT) if peft else None)
    _fit(module, tok)
    module.policy.eval()
    trained = _logps(module.policy, tok)
    out = module.save_pretrained(tmp_path / "final", merge_adapters=peft != "adapter")
    assert out == tmp_path / "final" and (out / "tokenizer.json").exists()  # the datamodule's tokenizer
    if peft == "adapter":
        from peft import AutoPeftModelForCausalLM

        assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
        base = tmp_path / "base"
        build_tiny_model("gpt2", vocab_size=len(tok)).save_pretrained(base)  # the same seed-0 initial weights
        import json

        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(base)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
        loaded = AutoPeftModelForCausalLM.from_pretrained(out)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(out)
        assert not any("lora" in k for k in loaded.state_dict())
    torch.testing.assert_close(_logps(loaded.eval(), AutoTokenizer.from_pretrained(out)), trained, rtol=1e-6, atol=1e-5)
    assert not torch.allclose(trained, _logps(build_tiny_model("gpt2", vocab_size=len(tok)).eval(), tok), atol=1e-3)


@pytest.mark.slow
def test_cli_fit_writes_checkpoints_and_a_loadable_model_and_says_where(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lightning_anatomy.cli", "fit", "--config", str(REPO / "configs/tiny.yaml"),
           "--trainer.max_steps=4", "--checkpoint.every_n_train_steps=2",
           f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("saved model: ")
    final = Path(last.removeprefix("saved model: "))
    assert final == tmp_path / "tiny" / "version_0" / "final"
    AutoModelForCausalLM.from_pretrained(final)
    AutoTokenizer.from_pretrained(final)
    ckpts = sorted(p.name for p in (final.parent / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step2.ckpt", "step4.ckpt"]
    state = torch.load(final.parent / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state and not [k for k in state if k.startswith("reference.")]

    # resume from the step-2 checkpoint to step 6: a new run folder, same checkpoint layout
    resumed = subprocess.run(cmd[:-4] + ["--trainer.max_steps=6", f"--trainer.logger.init_args.save_dir={tmp_path}",
                                         "--trainer.enable_progress_bar=false", "--ckpt_path",
                                         str(final.parent / "checkpoints" / "step2.ckpt")],
                             capture_output=True, text=True, env=env, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.strip().splitlines()[-1] == f"saved model: {tmp_path / 'tiny' / 'version_1' / 'final'}"


@pytest.mark.slow
def test_cli_checks_checkpoint_and_save_options_before_loading(tmp_path, capsys):
    from lightning_anatomy.cli import main

    base = ["fit", "--config", str(REPO / "configs/tiny.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert main(base + ["--checkpoint.every_n_train_steps=-3"]) == 2
    assert "every_n_train_steps" in capsys.readouterr().err
    assert main(base + ["--save.merge_adapters=maybe"]) == 2
    assert "save.merge_adapters" in capsys.readouterr().err
    assert main(base + ["--ckpt_path", str(tmp_path / "nope.ckpt")]) == 2
    assert "ckpt_path" in capsys.readouterr().err


def test_max_length_beyond_the_model_positions_is_refused_at_setup():
    tok = build_tiny_tokenizer()
    module = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok), max_positions=64))
    with pytest.raises(ValueError, match=r"max_length=96 is longer than the model's 64 positions"):
        _fit(module, tok, steps=1, max_length=96)


def _pairs(tok, n=8):
    return tokenize_rows(read_preferences(make_toy_preferences(n, seed=2)), tok, max_length=48, max_prompt_length=32)


@pytest.mark.parametrize("damage", ["truncated", "missing_rows", "not_a_table"])
def test_a_damaged_reference_cache_is_recomputed(tmp_path, damage):
    from safetensors.torch import load_file, save_file

    tok = build_tiny_tokenizer()
    pairs = _pairs(tok)
    first = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok)), reference="precomputed",
                      reference_cache_dir=str(tmp_path))
    first.precompute_reference(pairs, pad_token_id=tok.pad_token_id)
    (path,) = list(tmp_path.glob("*.safetensors"))
    table = {k: v.clone() for k, v in load_file(str(path)).items()}  # load_file maps the file
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "missing_rows":
        save_file({k: v[:5] for k, v in table.items()}, str(path))
    else:
        save_file({"weights": torch.zeros(3)}, str(path))
    again = DPOModule(build_tiny_model("gpt2", vocab_size=len(tok)), reference="precomputed",
                      reference_cache_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=f"reference cache {path}.*recomputing"):
        again.precompute_reference(pairs, pad_token_id=tok.pad_token_id)
    assert again.reference_table == first.reference_table
    assert load_file(str(path))["row_ids"].tolist() == table["row_ids"].tolist()  # rewritten whole


def test_a_killed_cache_write_leaves_no_temp_behind_on_the_next_run(tmp_path):
    tok = build_tiny_tokenizer()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    from lightning_anatomy import files

    # what a SIGKILL mid-write leaves: a temp sibling named by the package's rule, of a dead process
    stale = tmp_path / f".abc.safetensors.tmp-{pid}-{files._MACHINE}deadbeef"
    stale.write_bytes(b"partial")
    DPOModule(build_tiny_model("gpt2", vocab_size=len(tok)), reference="precomputed",
              reference_cache_dir=str(tmp_path)).precompute_reference(_pairs(tok), pad_token_id=tok.pad_token_id)
    assert not stale.exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
