"""ConceptDriftMonitor: drift of SAE feature means on a fixed probe set, from the original step 0."""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import LambdaCallback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from lightning_anatomy.callbacks.drift import TABLE_COLUMNS, ConceptDriftMonitor, parse_predicted, r_squared
from lightning_anatomy.data import collate_pairs
from lightning_anatomy.models.tiny import build_tiny_model
from lightning_anatomy.module import DPOModule
from tests.helpers.concept_callback_helpers import (
    PAD,
    batches,
    hook_count,
    loader,
    offline_wandb_env,
    random_pairs,
    random_sae,
    trainer,
)

HOOK = "blocks.0.hook_resid_post"
TESTS = Path(__file__).resolve().parent


# Random SAEs reconstruct poorly: the lens' fidelity warning is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:SAE at .* explains only")


class FrozenDPO(DPOModule):
    """SGD with lr 0: the weights change only where a test edits them by hand."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.policy.parameters(), lr=0.0)


def edit_block0(model: torch.nn.Module) -> None:
    """The manual weight edit: a fixed vector added to block 0's MLP output bias."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.bias.add_(torch.randn(64, generator=g) * 0.5)


def block0_features(model, sae, input_ids, attention_mask=None) -> torch.Tensor:
    """SAE features of block 0's output via transformers' own hidden_states (no lens, no hooks)."""
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return sae.encode(out.hidden_states[1]).double()


def hand_means(model, sae, pairs) -> torch.Tensor:
    """Mean feature activation over the chosen completion tokens of `pairs`, all pooled."""
    batch = collate_pairs(pairs, PAD)
    n = len(pairs)
    feats = block0_features(model, sae, batch["input_ids"][:n], batch["attention_mask"][:n])
    return feats[batch["completion_mask"][:n]].mean(0)


def hand_rollout_means(model, sae, prompts, max_new: int) -> torch.Tensor:
    """Greedy continuations (cut after eos 0) and the mean features over the generated tokens."""
    rows = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new, pad_token_id=0)
        new = out[0, len(prompt):].tolist()
        new = new[: new.index(0) + 1] if 0 in new else new
        seq = torch.tensor([prompt + new])
        rows.append(block0_features(model, sae, seq)[0, len(prompt):])
    return torch.cat(rows).mean(0)


def csv_rows(root: Path) -> list[dict[str, str]]:
    (path,) = list(root.rglob("metrics.csv"))
    with path.open() as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- R²


def test_r_squared_is_the_squared_pearson_correlation():
    assert r_squared([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(16 / 25, abs=1e-15)  # cov 4, var 5 and 5
    assert r_squared([1, 2, 3], [5, 3, 1]) == pytest.approx(1.0, abs=1e-15)  # a perfect negative fit counts
    assert r_squared([1, 2, 3], [2.0, 2.5, 3.0]) == pytest.approx(1.0, abs=1e-15)  # blind to scale and offset
    assert r_squared([1, 2, 3], [0, 0, 0]) is None  # undefined while nothing drifted
    assert r_squared([1], [2]) is None
    with pytest.raises(ValueError, match="equal length"):
        r_squared([1, 2], [1, 2, 3])


def test_predicted_from_dict_or_audit_dataframe_and_its_errors():
    widths = {HOOK: 128}
    assert parse_predicted({(HOOK, 3): 0.5, f"{HOOK}:4": -1}, widths) == ({(HOOK, 3): 0.5, (HOOK, 4): -1.0}, {})
    frame = pd.DataFrame({"hook": [HOOK, HOOK], "feature": [7, 9], "predicted_shift": [0.25, -0.5],
                          "label": ["refusal", ""]})
    assert parse_predicted(frame, widths) == ({(HOOK, 7): 0.25, (HOOK, 9): -0.5}, {(HOOK, 7): "refusal"})
    assert parse_predicted(frame.drop(columns="hook"), widths)[0] == {(HOOK, 7): 0.25, (HOOK, 9): -0.5}
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['predicted_shift'\]"):
        parse_predicted(frame.drop(columns="predicted_shift"), widths)
    with pytest.raises(ValueError, match="predicted row 1: concept .* appears twice"):
        parse_predicted(pd.DataFrame({"feature": [7, 7], "predicted_shift": [1, 2]}), widths)
    with pytest.raises(ValueError, match="predicted row 0: predicted shift is nan"):
        parse_predicted(pd.DataFrame({"feature": [7], "predicted_shift": [np.nan]}), widths)
    with pytest.raises(ValueError, match="feature 200 is out of range"):
        parse_predicted({200: 1.0}, widths)
    with pytest.raises(ValueError, match="a dict .* or a pandas DataFrame"):
        parse_predicted([1, 2], widths)


# --------------------------------------------------------------------------- drift numbers


def test_drift_is_zero_at_step0_and_the_hand_computed_change_after_a_weight_edit(tmp_path):
    sae = random_sae(seed=3)
    probe = random_pairs(3, seed=2, start_id=100)
    module = FrozenDPO(build_tiny_model("gpt2", seed=0), lr=1e-3)
    module.policy.train()
    module.policy.transformer.h[1].attn.attn_dropout.eval()  # a module the user left in eval mode
    modes_before = [m.training for m in module.policy.modules()]

    original = copy.deepcopy(module.policy).eval()
    edited = copy.deepcopy(original)
    edit_block0(edited)
    expected = hand_means(edited, sae, probe) - hand_means(original, sae, probe)
    prompts = [p.prompt_ids for p in probe[:2]]
    expected_rollout = (hand_rollout_means(edited, sae, prompts, 5) - hand_rollout_means(original, sae, prompts, 5))
    watched = expected.abs().topk(6).indices.tolist()
    predicted = {(HOOK, f): v for f, v in zip(watched, [3.0, -1.0, 2.0, 0.5, 0.0, 1.5])}
    feat = watched[0]

    cb = ConceptDriftMonitor({HOOK: sae}, probe, every_n_steps=1, track={"t": (HOOK, feat)}, predicted=predicted,
                             rollouts=2, rollout_max_new_tokens=5)
    editor = LambdaCallback(on_train_batch_end=lambda tr, pl, *a: edit_block0(pl.policy))
    modes_after: list[list[bool]] = []
    recorder = LambdaCallback(
        on_train_batch_end=lambda tr, pl, *a: modes_after.append([m.training for m in pl.policy.modules()]))
    trainer([editor, cb, recorder], logger=CSVLogger(tmp_path, name="drift"), log_every_n_steps=50).fit(
        module, loader(random_pairs(4, seed=1), 4))

    torch.testing.assert_close(cb.baseline[HOOK], hand_means(original, sae, probe), rtol=1e-6, atol=1e-7)
    assert cb.last_evaluated_step == 1
    torch.testing.assert_close(cb.last_drift[HOOK], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cb.last_rollout_drift[HOOK], expected_rollout, rtol=1e-5, atol=1e-6)
    assert expected.abs().max() > 1e-2 and expected_rollout.abs().max() > 1e-2
    observed = expected[watched].numpy()
    r2 = np.corrcoef([predicted[(HOOK, f)] for f in watched], observed)[0, 1] ** 2
    assert cb.last_r2 == pytest.approx(r2, rel=1e-5)
    assert modes_after == [modes_before]  # eval for the probe, then every module's own mode back
    assert hook_count(module.policy) == 0

    rows = {int(r["step"]): r for r in csv_rows(tmp_path) if r.get("concepts/drift/t")}
    assert sorted(rows) == [0, 1]
    assert float(rows[0]["concepts/drift/t"]) == 0.0 and float(rows[0]["concepts/drift_rollout/t"]) == 0.0
    assert not rows[0].get("concepts/drift_r2")  # undefined while every drift is zero
    assert float(rows[1]["concepts/drift/t"]) == pytest.approx(float(expected[feat]), rel=1e-5)
    assert float(rows[1]["concepts/drift_rollout/t"]) == pytest.approx(float(expected_rollout[feat]), rel=1e-5,
                                                                         abs=1e-7)
    r2_rows = [r for r in csv_rows(tmp_path) if r.get("concepts/drift_r2")]
    assert [int(r["step"]) for r in r2_rows] == [1]
    assert float(r2_rows[0]["concepts/drift_r2"]) == pytest.approx(r2, rel=1e-5)


def test_resume_keeps_the_original_step0_baseline(tmp_path):
    sae = random_sae(seed=3)
    probe = random_pairs(3, seed=2, start_id=100)
    pairs = random_pairs(8, seed=4)
    first = ConceptDriftMonitor({HOOK: sae}, probe, every_n_steps=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer([first, ckpt], max_steps=2, enable_checkpointing=True).fit(
        DPOModule(build_tiny_model("gpt2", seed=0), lr=2e-2), loader(pairs, 2))
    (path,) = list((tmp_path / "ckpt").glob("*.ckpt"))
    moved = first.last_means[HOOK] - first.baseline[HOOK]
    assert first.last_evaluated_step == 2 and moved.abs().max() > 1e-4

    resumed = ConceptDriftMonitor({HOOK: sae}, probe, every_n_steps=2)
    evaluated: list[int] = []
    original = resumed._evaluate
    resumed._evaluate = lambda tr, step, first=False: (evaluated.append(step), original(tr, step, first))
    trainer([resumed], max_steps=4).fit(
        DPOModule(build_tiny_model("gpt2", seed=0), lr=2e-2), loader(pairs, 2), ckpt_path=str(path))
    assert evaluated == [4]  # no new baseline at the resume point, no re-evaluation of step 2
    assert torch.equal(resumed.baseline[HOOK], first.baseline[HOOK])
    torch.testing.assert_close(resumed.last_drift[HOOK], resumed.last_means[HOOK] - first.baseline[HOOK])
    from_resume_point = resumed.last_means[HOOK] - first.last_means[HOOK]
    assert not torch.allclose(resumed.last_drift[HOOK], from_resume_point, atol=1e-6)
    assert resumed.state_key == first.state_key != ConceptDriftMonitor({HOOK: sae}, probe, every_n_steps=3).state_key


# --------------------------------------------------------------------------- W&B


@pytest.mark.slow
def test_wandb_gets_series_histogram_top_table_and_scatter(tmp_path, monkeypatch):
    import wandb

    from lightning_anatomy.concepts.lens import ConceptLens
    from lightning_anatomy.data import PreferenceDataModule
    from lightning_anatomy.data.toy import make_toy_preferences
    from lightning_anatomy.models.tiny import build_tiny_tokenizer
    from lightning_anatomy.wandb_offline import find_offline_runs, read_run

    offline_wandb_env(monkeypatch, tmp_path)
    sae = random_sae(seed=3)
    module = DPOModule(build_tiny_model("gpt2", seed=0), lr=2e-2)
    dm = PreferenceDataModule(make_toy_preferences(16), build_tiny_tokenizer(), batch_size=4, val_fraction=0.25,
                              shuffle=False)
    predicted = pd.DataFrame({"hook": HOOK, "feature": [1, 2, 3, 4], "predicted_shift": [0.5, -1.0, 2.0, 0.0],
                              "label": ["one", "two", "", ""]})
    lens = ConceptLens(module.policy, {HOOK: sae}, fidelity_check=False)
    cb = ConceptDriftMonitor(lens, "val", every_n_steps=2, track=[(HOOK, 5)], top_k=4, predicted=predicted)
    seen: dict[int, torch.Tensor] = {}
    original = cb._log
    cb._log = lambda tr, step: (seen.__setitem__(step, cb.last_drift[HOOK].clone()), original(tr, step))
    try:
        trainer([cb], max_steps=4, limit_val_batches=0,
                logger=WandbLogger(project="drift", save_dir=str(tmp_path), offline=True)).fit(module, datamodule=dm)
    finally:
        wandb.finish()
    assert sorted(seen) == [0, 2, 4] and cb._lens is lens
    run = read_run(find_offline_runs(tmp_path / "wandb")[0], wait=30)

    series = run.series(f"concepts/drift/{HOOK}:5", step_key="trainer/global_step")
    assert [s for s, _ in series] == [0, 2, 4]
    assert all(v == pytest.approx(float(seen[s][5]), rel=1e-6, abs=1e-12) for s, v in series)
    r2 = run.series("concepts/drift_r2", step_key="trainer/global_step")
    assert [s for s, _ in r2] == [2, 4]
    for s, v in r2:
        expected = np.corrcoef([0.5, -1.0, 2.0, 0.0], seen[s][[1, 2, 3, 4]].numpy())[0, 1] ** 2
        assert v == pytest.approx(expected, rel=1e-6)
    hists = run.series("concepts/drift_hist", step_key="trainer/global_step")
    assert [s for s, _ in hists] == [0, 2, 4] and all(h["_type"] == "histogram" for _, h in hists)
    assert sum(hists[-1][1]["values"]) == 128

    tables = run.series("concepts/drift_top", step_key="trainer/global_step")
    assert [s for s, _ in tables] == [2, 4]
    table = run.table(tables[-1][1])
    assert table["columns"] == list(TABLE_COLUMNS)
    drift = seen[4]
    top = drift.abs().topk(4).indices.tolist()
    assert [r[2] for r in table["data"]] == top
    for _rank, hook, feat, label, base, cur, d, pred in table["data"]:
        assert hook == HOOK and d == pytest.approx(float(drift[feat]), rel=1e-6)
        assert cur - base == pytest.approx(d, rel=1e-5, abs=1e-9)
        assert label == {1: "one", 2: "two"}.get(feat, "")
        assert pred == {1: 0.5, 2: -1.0, 3: 2.0, 4: 0.0}.get(feat)
    scatter_keys = [k for k in run.keys() if k.startswith("concepts/drift_scatter")]
    assert scatter_keys, run.keys()
    scatter = [v for row in run.history for k, v in row.items() if k in scatter_keys]
    assert len(scatter) == 2 and sorted(run.table(scatter[-1])["data"]) == sorted(
        [HOOK, f, {1: "one", 2: "two"}.get(f, ""), p, pytest.approx(float(drift[f]), rel=1e-6)]
        for f, p in zip([1, 2, 3, 4], [0.5, -1.0, 2.0, 0.0]))


# --------------------------------------------------------------------------- options and guards


def test_bad_options_name_the_problem():
    sae = random_sae()
    probe = random_pairs(2)
    with pytest.raises(ValueError, match="probe must be a list of TokenizedPair"):
        ConceptDriftMonitor({HOOK: sae}, probe=42)
    with pytest.raises(ValueError, match="probe is empty"):
        ConceptDriftMonitor({HOOK: sae}, probe=[])
    with pytest.raises(ValueError, match="responses='prompt' is not one of"):
        ConceptDriftMonitor({HOOK: sae}, probe, responses="prompt")
    with pytest.raises(ValueError, match="rollouts must be an integer >= 0"):
        ConceptDriftMonitor({HOOK: sae}, probe, rollouts=-1)
    with pytest.raises(ValueError, match="every_n_steps must be an integer >= 1"):
        ConceptDriftMonitor({HOOK: sae}, probe, every_n_steps=0)
    with pytest.raises(ValueError, match=r"track\[0\]: feature 999 is out of range"):
        ConceptDriftMonitor({HOOK: sae}, probe, track=[999])
    cb = ConceptDriftMonitor({HOOK: sae}, probe)
    cb.setup(SimpleNamespace(strategy=FSDPStrategy()), DPOModule(build_tiny_model("gpt2")), "fit")  # tested FSDP
    with pytest.raises(ValueError, match="not DeepSpeedStrategy .* allow_untested_strategy=True"):
        cb.setup(SimpleNamespace(strategy=object.__new__(DeepSpeedStrategy)), DPOModule(build_tiny_model("gpt2")),
                 "fit")
    val = ConceptDriftMonitor({HOOK: sae}, "val")
    with pytest.raises(ValueError, match="probe='val' needs a datamodule with val_pairs"):
        trainer([val]).fit(DPOModule(build_tiny_model("gpt2")), loader(random_pairs(2), 2))


def test_batch_dict_probe_and_both_responses_pool_chosen_and_rejected():
    sae = random_sae(seed=3)
    pairs = random_pairs(3, seed=2)
    batch = batches(pairs, 3)[0]
    module = FrozenDPO(build_tiny_model("gpt2", seed=0), lr=1e-3)
    cb = ConceptDriftMonitor({HOOK: sae}, batch, responses="both", batch_size=2)
    trainer([cb]).fit(module, loader(random_pairs(2, seed=5), 2))
    feats = block0_features(module.policy.eval(), sae, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(cb.baseline[HOOK], feats[batch["completion_mask"]].mean(0), rtol=1e-6, atol=1e-7)
    assert torch.equal(cb.last_drift[HOOK], torch.zeros(128, dtype=torch.float64))  # lr 0: nothing moved






# --------------------------------------------------------------------------- measurement passes


@pytest.mark.parametrize("edit", ["ablate", "both", "gradient", "steering"])
def test_probes_see_the_model_without_training_time_edits(edit):
    """The step-0 baseline (and every later probe) is measured in a `measurement_pass()`: an edit
    callback attached to the same run must not change it."""
    from lightning_anatomy import ConceptSet
    from lightning_anatomy.callbacks import ConceptProjection, ConceptSteering

    sae = random_sae(seed=3)
    probe = random_pairs(3, seed=2, start_id=100)
    concepts = ConceptSet.from_sae_features(sae, HOOK, [1, 5], action="suppress")
    edit_cb = (ConceptSteering(concepts, strength=4.0) if edit == "steering"
               else ConceptProjection(concepts, mode=edit, layers="all_later"))

    def baseline(callbacks: list) -> torch.Tensor:
        monitor = ConceptDriftMonitor({HOOK: sae}, probe, every_n_steps=1, rollouts=2, rollout_max_new_tokens=3)
        trainer([*callbacks, monitor], max_steps=1).fit(FrozenDPO(build_tiny_model("gpt2", seed=0)),
                                                        loader(random_pairs(4, seed=1), 4))
        return monitor.baseline[HOOK], monitor.baseline_rollout[HOOK], monitor.last_drift[HOOK]

    plain, plain_rollout, _ = baseline([])
    edited, edited_rollout, drift = baseline([edit_cb])
    assert torch.equal(edited, plain) and torch.equal(edited_rollout, plain_rollout)
    assert torch.equal(drift, torch.zeros_like(drift))  # lr 0: the weights did not move


def test_edits_act_outside_measurement_passes_only():
    from lightning_anatomy.model_access import (
        edits_suspended,
        is_measurement_pass,
        is_reference_pass,
        measurement_pass,
        reference_pass,
    )

    assert not edits_suspended()
    with measurement_pass():
        assert edits_suspended() and is_measurement_pass() and not is_reference_pass()
        with reference_pass():
            assert is_reference_pass()
        assert not is_reference_pass() and edits_suspended()
    with reference_pass():
        assert edits_suspended() and not is_measurement_pass()
    assert not edits_suspended()
