"""`benchmarks/real_model.py`: the --quick path end to end (a random tiny Llama), and its statistics
recomputed by hand from the per-seed records it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.bench_loader import load_benchmark

HH_RLHF = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf-harmless-test-a.jsonl"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("real_model")


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_run_writes_results_that_follow_from_its_records(bench, tmp_path, capsys):
    """The demo part always; the HH-RLHF part where ../shared/data is present (else it is skipped)."""
    results = bench.main(["--quick", "--out", str(tmp_path), "--threads", "1", "--hh", str(HH_RLHF)])
    on_disk = json.loads((tmp_path / "real_model.quick.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert (tmp_path / "real_model.quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*")), "no half-written files are left behind"
    setting = bench.QUICK

    demo = on_disk["parts"]["demo"]
    assert demo["seeds"] == list(setting.demo_seeds)
    s = demo["summary"]
    assert s["base"]["conflict"]["n"] == len(setting.demo_seeds) * setting.demo_n_heldout
    drop = np.concatenate([np.asarray(r["base"]["conflict"]) - np.asarray(r["runs"]["projected"]["eval"]["conflict"])
                           for r in demo["per_seed"]])
    assert s["projected"]["offtarget_margin_drop_nats"]["mean"] == pytest.approx(drop.mean(), abs=1e-12)
    lo, hi = s["projected"]["offtarget_margin_drop_nats"]["ci"]
    assert lo <= drop.mean() <= hi
    assert s["vanilla"]["step_time_ratio_vs_vanilla"] == 1.0
    assert demo["tuning"]["picked"] in setting.demo_blocking_lams and demo["tuning"]["seed"] not in setting.demo_seeds
    for cond in bench.DEMO_CONDITIONS:
        margins = np.concatenate([r["runs"][cond]["eval"]["control"] for r in demo["per_seed"]])
        assert s[cond]["eval"]["control"]["pref_correct"] == pytest.approx((margins > 0).mean())

    out = capsys.readouterr().out
    assert "| projected |" in out
    hh = on_disk["parts"]["hh"]
    if not HH_RLHF.is_file():
        assert "is absent" in hh["skipped"]
        return
    assert "HH-RLHF harmless" in out
    (record,) = hh["per_seed"]
    assert 1 <= len(record["suppressed"]) <= setting.hh_top_k
    assert not set(record["suppressed"]) & set(record["spill"]) and len(record["spill"]) == setting.hh_spill_k
    base, vanilla = np.asarray(record["base"]["logps"]), np.asarray(record["runs"]["vanilla"]["eval"]["logps"])
    assert base.shape == (setting.hh_n_heldout, 2)
    margin = setting.beta * ((vanilla[:, 0] - base[:, 0]) - (vanilla[:, 1] - base[:, 1]))
    hs = hh["summary"]
    assert hs["vanilla"]["ontarget_reward_margin"]["mean"] == pytest.approx(margin.mean(), abs=1e-12)
    assert hs["vanilla"]["ontarget_reward_accuracy"]["mean"] == pytest.approx((margin > 0).mean())
    assert hs["vanilla"]["ratio_vanilla_over_condition"]["mean"] in (None, pytest.approx(1.0))


def test_hh_part_is_skipped_with_a_reason_when_the_file_is_absent(bench, tmp_path, capsys):
    results = bench.main(["--quick", "--parts", "hh", "--out", str(tmp_path), "--threads", "1",
                          "--hh", str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl is absent" in results["parts"]["hh"]["skipped"]
    assert "demo" not in results["parts"]
    assert "HH-RLHF: " in capsys.readouterr().out


def test_summarize_hh_signs_and_ratio_exactly(bench):
    """Suppressed features predicted to fall (sign -1) that fall by 2 under vanilla and by 0.5 when
    projected: shifts +2 and +0.5 'as predicted', a 4x cut; the spill-over feature rose by 1 against
    its prediction (-1)."""
    n = 5
    base = {"logps": np.zeros((n, 2)), "features": np.ones((n, 2, 3))}

    def run(drop: float, chosen_gain: float) -> dict:
        feats = np.ones((n, 2, 3))
        feats[..., :2] -= drop
        feats[..., 2] += 1.0
        logps = np.zeros((n, 2))
        logps[:, 0] = chosen_gain
        return {"eval": {"logps": logps, "features": feats}, "step_s": 1.0}

    record = {"seed": 0, "suppressed": [7, 9], "spill": [11], "sign": [-1.0, -1.0, -1.0], "n_pass": 2, "base": base,
              "runs": {"vanilla": run(2.0, 1.0), "projected": run(0.5, 1.0), "random_control": run(2.0, -1.0)}}
    s = bench.summarize_hh([record], beta=0.1)
    assert s["vanilla"]["offtarget_suppressed_shift"]["mean"] == pytest.approx(2.0)
    assert s["projected"]["offtarget_suppressed_shift"]["mean"] == pytest.approx(0.5)
    assert s["projected"]["ratio_vanilla_over_condition"]["mean"] == pytest.approx(4.0)
    assert s["projected"]["spillover_shift"]["mean"] == pytest.approx(-1.0)
    assert s["vanilla"]["ontarget_reward_margin"]["mean"] == pytest.approx(0.1)
    assert s["random_control"]["ontarget_reward_accuracy"]["mean"] == 0.0
    assert s["vanilla"]["ontarget_reward_accuracy"]["mean"] == 1.0


def test_cut_ratio_needs_a_vanilla_change_distinguishable_from_zero(bench):
    noise = np.array([0.3, -0.2, 0.1, -0.25, 0.05])
    assert bench.cut_ratio(noise, noise / 2)["mean"] is None
    assert "not distinguishable from 0" in bench.cut_ratio(noise, noise / 2)["note"]
    moved = np.array([2.0, 2.2, 1.8, 2.1, 1.9])
    ratio = bench.cut_ratio(moved, moved / 4)
    assert ratio["mean"] == pytest.approx(4.0) and ratio["ci"] == [pytest.approx(4.0), pytest.approx(4.0)]
    assert bench._ratio(bench.cut_ratio(noise, noise)) == "n/a: vanilla's change ≈ 0"


def test_split_rows_is_seeded_disjoint_and_checks_sizes(bench):
    rows = list(range(50))
    train, held = bench.split_rows(rows, 20, 10, seed=3)
    assert (train, held) == bench.split_rows(rows, 20, 10, seed=3)
    assert train != bench.split_rows(rows, 20, 10, seed=4)[0]
    assert not set(train) & set(held) and len(train) == 20 and len(held) == 10
    with pytest.raises(SystemExit, match="fewer than n_audit"):
        bench.split_rows(rows, 45, 10, seed=0)
