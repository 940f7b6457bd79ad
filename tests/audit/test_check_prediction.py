"""check_prediction and the live cluster R² of ConceptDriftMonitor: a planted policy that raises
exactly the flagged clusters gives R² ≈ 1, an unrelated change R² ≈ 0; agreement numbers by
hand; bad inputs named; `anatomy check-prediction` end to end."""

from __future__ import annotations

import copy
import csv
import json
import math

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import LambdaCallback
from lightning.pytorch.loggers import CSVLogger

from lightning_anatomy import check_prediction
from lightning_anatomy.audit.agreement import (
    bootstrap_r_squared_ci,
    r_squared,
    r_squared_through_origin,
    sign_agreement,
)
from lightning_anatomy.audit.report import SCRIPT_TAG
from lightning_anatomy.callbacks.drift import ConceptDriftMonitor
from lightning_anatomy.module import DPOModule
from tests.helpers.concept_callback_helpers import loader, random_pairs, trainer
from tests.helpers.paper_synthetic import HOOK, add_block0_bias, coordinate_case

pytestmark = pytest.mark.filterwarnings("ignore:SAE at .* explains only")
ROLLOUTS = dict(samples_per_prompt=4, max_new_tokens=32, n_bootstrap=200)


@pytest.fixture(scope="module")
def case():
    model, sae, result, bias = coordinate_case()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, 260, (8,), generator=g).tolist() for _ in range(16)]
    return model, sae, result, bias, prompts


@pytest.mark.slow
def test_a_policy_raising_exactly_the_flagged_clusters_gives_r2_near_1(case, tmp_path):
    model, sae, result, bias, prompts = case
    after = copy.deepcopy(model)
    add_block0_bias(after, bias(1.0))
    check = check_prediction(result, model, after, prompts, **ROLLOUTS)
    assert check.n_clusters == 12 and list(check.table.columns)[:6] == ["hook", "cluster", "n_features", "label",
                                                                        "predicted", "observed"]
    assert check.r2 > 0.9 and check.r2_ols > 0.9 and check.sign_agreement == 1.0
    assert 0.8 < check.r2_ci[0] <= check.r2 <= check.r2_ci[1] <= 1.0
    np.testing.assert_allclose(check.table["observed"], check.table["after"] - check.table["before"])
    assert set(check.features["cluster"]) == set(check.table["cluster"]) and len(check.features) == 60
    # the same seeds give the same rollouts: a second run is identical
    again = check_prediction(result, model, after, prompts, **ROLLOUTS)
    assert again.r2 == check.r2 and again.table.equals(check.table)

    out = check.save(tmp_path / "check", audit_result=result)
    meta = json.loads((out / "prediction.json").read_text())
    assert meta["r2"] == pytest.approx(check.r2) and meta["n_clusters"] == 12 and len(meta["r2_ci"]) == 2
    assert meta["settings"]["samples_per_prompt"] == 4
    assert (out / "scatter.png").read_bytes()[:4] == b"\x89PNG"
    for page in ("prediction.html", "report.html"):
        html = (out / page).read_text()
        assert "Prediction check" in html and "data:image/png;base64," in html and html.count("<script") == 1 and SCRIPT_TAG in html
    assert json.loads((out / "clusters.json").read_text())[0].keys() >= {"cluster", "predicted", "observed"}


@pytest.mark.slow
def test_an_unrelated_change_gives_r2_near_0(case):
    model, sae, result, bias, prompts = case
    after = copy.deepcopy(model)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # noise after the hook: other rollouts, nothing aimed at the clusters
        for p in after.transformer.h[1].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    check = check_prediction(result, model, after, prompts, **ROLLOUTS)
    assert np.abs(check.table["observed"]).max() > 0  # the rollouts did change
    assert check.r2 < 0.2 and check.r2_ci[0] < 0.05


def test_agreement_numbers_by_hand():
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0])
    assert r_squared(x, y) == pytest.approx(0.64)
    b = (x @ y) / (x @ x)
    assert r_squared_through_origin(x, y) == pytest.approx(1 - ((y - b * x) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    assert r_squared_through_origin(x, y + 10) < r_squared(x, y + 10)  # an offset is a miss without intercept
    assert r_squared([1, 2], [3, 3]) is None and r_squared_through_origin([0, 0], [1, 2]) is None
    lo, hi = bootstrap_r_squared_ci(x, y, n_bootstrap=500, seed=1)
    assert 0 <= lo <= hi <= 1 and (lo, hi) == bootstrap_r_squared_ci(x, y, n_bootstrap=500, seed=1)
    assert sign_agreement([1, -1, 0, 2], [0.5, 0.2, 9, 0]) == pytest.approx(1 / 3)  # 0 predicted: not counted
    assert math.isnan(sign_agreement([0, 0], [1, 2]))


def test_bad_inputs_are_named(case):
    model, sae, result, bias, prompts = case
    other = copy.deepcopy(model)
    with pytest.raises(ValueError, match="the same object"):
        check_prediction(result, model, model, prompts)
    with pytest.raises(TypeError, match="policy_after must be a Hugging Face causal LM"):
        check_prediction(result, model, object(), prompts)
    with pytest.raises(TypeError, match="no .feature_clusters"):
        check_prediction(object(), model, other, prompts)
    with pytest.raises(ValueError, match="non-empty list"):
        check_prediction(result, model, other, [])
    with pytest.raises(ValueError, match=r"prompts\[0\] is text; pass tokenizer"):
        check_prediction(result, model, other, ["hello"])
    with pytest.raises(ValueError, match="repeats one rollout"):
        check_prediction(result, model, other, prompts, temperature=0, samples_per_prompt=2)
    with pytest.raises(ValueError, match="measure='median'"):
        check_prediction(result, model, other, prompts, measure="median")
    with pytest.raises(ValueError, match="more than policy_before's 512 positions"):
        check_prediction(result, model, other, prompts, max_new_tokens=600)
    loaded = copy.copy(result)
    loaded.saes = None
    with pytest.raises(ValueError, match="needs the audit's SAEs"):
        check_prediction(loaded, model, other, prompts)
    from sae_lens import StandardSAE, StandardSAEConfig

    with pytest.raises(ValueError, match="d_sae=32 but the audit used d_sae=64"):
        check_prediction(result, model, other, prompts, saes={HOOK: StandardSAE(StandardSAEConfig(d_in=64, d_sae=32))})
    with pytest.raises(ValueError, match="pass rollouts=N"):
        ConceptDriftMonitor({HOOK: sae}, random_pairs(2), clusters=result)
    with pytest.raises(ValueError, match="cluster_tau only applies"):
        ConceptDriftMonitor({HOOK: sae}, random_pairs(2), cluster_tau=0.1)


class FrozenDPO(DPOModule):
    """SGD with lr 0: the weights change only where the test edits them."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.policy.parameters(), lr=0.0)


@pytest.mark.slow
def test_drift_monitor_logs_the_cluster_r2_of_its_rollouts(case, tmp_path):
    model, sae, result, bias, _ = case
    probe = random_pairs(12, seed=2, start_id=100)
    module = FrozenDPO(copy.deepcopy(model), lr=1e-3)
    edited = []

    def edit(tr, pl, *args):
        if not edited:
            add_block0_bias(pl.policy, bias(1.0))
            edited.append(True)

    cb = ConceptDriftMonitor({HOOK: sae}, probe, every_n_steps=1, rollouts=12, rollout_max_new_tokens=32,
                             clusters=result)
    trainer([LambdaCallback(on_train_batch_end=edit), cb], logger=CSVLogger(tmp_path, name="drift"),
            log_every_n_steps=50).fit(module, loader(random_pairs(4, seed=1), 4))
    assert cb.baseline_cluster is not None and cb.last_cluster_r2 is not None and cb.last_cluster_r2 > 0.8
    # the live measure is check_prediction's on greedy rollouts of the same prompts
    after = copy.deepcopy(model)
    add_block0_bias(after, bias(1.0))
    check = check_prediction(result, model, after, [p.prompt_ids for p in probe], temperature=0.0,
                             max_new_tokens=32, n_bootstrap=0)
    assert cb.last_cluster_r2 == pytest.approx(check.r2, rel=1e-6)
    np.testing.assert_allclose(cb.last_cluster_drift, check.table["observed"], atol=1e-9)
    (path,) = list(tmp_path.rglob("metrics.csv"))
    rows = [r for r in csv.DictReader(path.open()) if r.get("concepts/drift_cluster_r2")]
    assert [int(r["step"]) for r in rows] == [1]  # undefined (not logged) at step 0, where nothing changed
    assert float(rows[0]["concepts/drift_cluster_r2"]) == pytest.approx(cb.last_cluster_r2, rel=1e-6)
    # the step-0 cluster baseline survives a resume
    state = cb.state_dict()
    fresh = ConceptDriftMonitor({HOOK: sae}, probe, every_n_steps=1, rollouts=12, rollout_max_new_tokens=32,
                                clusters=result)
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(fresh.baseline_cluster, cb.baseline_cluster)
    plain = ConceptDriftMonitor({HOOK: sae}, probe, every_n_steps=1, rollouts=12, rollout_max_new_tokens=32)
    assert fresh.state_key == cb.state_key != plain.state_key


@pytest.mark.slow
def test_cli_check_prediction_end_to_end(tmp_path, capsys):
    from pathlib import Path

    from lightning_anatomy.cli import main
    from lightning_anatomy.models.tiny import build_tiny_model

    repo = Path(__file__).resolve().parents[2]
    audit_out = tmp_path / "audit"
    assert main(["audit", "--config", str(repo / "configs/audit/tiny.yaml"), f"--output_dir={audit_out}",
                 "--audit.method=paper", "--audit.n_bootstrap=0", "--data.source=toy:32",
                 "--audit.label_concepts=false"]) == 0
    after = build_tiny_model("gpt2")
    add_block0_bias(after, torch.randn(64, generator=torch.Generator().manual_seed(0)))
    after.save_pretrained(tmp_path / "after")
    capsys.readouterr()
    out = tmp_path / "check"
    cfg = repo / "configs/check_prediction/tiny.yaml"
    args = ["check-prediction", "--config", str(cfg), f"--audit={audit_out / 'audit'}",
            f"--model.after={tmp_path / 'after'}", f"--output_dir={out}", "--data.source=toy:40", "--data.offset=32",
            "--rollouts.max_new_tokens=8", "--rollouts.n_bootstrap=50"]
    assert main([*args, "--prediction.predictors=[paper,tilt]", "--prediction.tilt_sample=both"]) == 0
    printed = capsys.readouterr().out
    assert "paper: " in printed and "tilt: " in printed, printed  # one line per predictor
    saved = json.loads((out / "prediction.json").read_text())
    assert saved["settings"]["tilt_sample"] == "both" and saved["settings"]["predictors"] == ["paper", "tilt"]
    assert main(args) == 0
    assert "R²" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"prediction.json", "scatter.png", "report.html", "clusters.parquet"}
    assert main(args[:4] + [f"--output_dir={out}"]) == 2
    assert "model.after is not set" in capsys.readouterr().err
    assert main(["check-prediction", "--config", str(cfg), f"--audit={tmp_path}", "--model.after=x"]) == 2
    assert "not a saved audit directory" in capsys.readouterr().err


@pytest.mark.slow
def test_prediction_benchmark_quick_writes_the_contract(tmp_path):
    from tests.helpers.bench_loader import run_quick

    bench, results = run_quick("prediction", tmp_path)
    on_disk = json.loads((tmp_path / "prediction.quick.json").read_text())
    assert on_disk == json.loads(json.dumps(results)) and on_disk["quick"] is True
    assert set(on_disk["settings"]) == {"graded_controlled", "graded_smollm2", "hh_smollm2"}
    for name, part in on_disk["settings"].items():
        if "skipped" in part:  # the shared HH sample is absent
            assert name != "graded_controlled"
            continue
        assert set(part["methods"]) == {"paper", "paired", "tilt"}
        for entry in part["methods"].values():
            assert entry.keys() >= {"r2", "r2_ci", "r2_ols", "sign_agreement", "n_clusters", "prompts"}
            assert len(entry["r2_ci"]) == 2 and isinstance(entry["n_clusters"], int)
            assert entry["r2"] is None or 0 <= entry["r2"] <= 1
    controlled = on_disk["settings"]["graded_controlled"]
    assert sorted(controlled["disparities"].values()) == [-0.8, -0.5, -0.2, 0.2, 0.5, 0.8]

    # parts run one at a time merge into one results file; a quick run is refused
    parts = []
    for i, name in enumerate(("graded_controlled", "hh_smollm2")):
        part = {**on_disk, "quick": False, "wall_s": 10.0 * (i + 1), "settings": {name: on_disk["settings"][name]}}
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(json.dumps(part))
    merged = bench.main(["--merge", *map(str, parts), "--out", str(tmp_path), "--name", "merged"])
    kept = {n for n, s in on_disk["settings"].items() if n in ("graded_controlled", "hh_smollm2") and "skipped" not in s}
    assert set(merged["settings"]) == kept and merged["wall_s"] == sum(merged["parts"][n]["wall_s"] for n in kept)
    assert merged["settings"]["graded_controlled"] == on_disk["settings"]["graded_controlled"]
    assert merged["parts"]["graded_controlled"]["file"] == "part0.json"
    assert json.loads((tmp_path / "merged.json").read_text())["settings"].keys() == kept
    with pytest.raises(ValueError, match="--quick run"):
        bench.merge_results([tmp_path / "prediction.quick.json"])
