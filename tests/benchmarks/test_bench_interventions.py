"""Smoke test of `benchmarks/interventions.py` at a tiny size, and exact checks of its parts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.helpers.bench_loader import floats_in, load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("interventions")


TINY = ["--pretrain-steps", "30", "--pretrain-examples", "400", "--sae-tokens", "6000", "--n-pairs", "16",
        "--dpo-steps", "2", "--n-heldout", "6", "--n-concept-texts", "8"]


def test_quick_run_writes_the_contract_and_numbers_that_follow_from_the_records(bench, tmp_path, capsys):
    doc = bench.main(["--quick", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--seeds", "2",
                      "--scenarios", "marker", *TINY])
    written = json.loads((tmp_path / "out" / "interventions.json").read_text())
    assert written == json.loads(json.dumps(doc)) and written["format"] == "lightning-anatomy/bench-interventions"
    assert (tmp_path / "out" / "interventions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scenario = written["scenarios"]["marker_corr0.9"]
    conditions, skipped = scenario["conditions"], scenario["not_applicable"]
    assert sorted([*conditions, *skipped]) == sorted(bench.CONDITIONS)  # every intervention and control ran or says why
    assert {"oracle_token_filtering", "oracle_inoculation", "inoculation"} <= set(conditions)  # shaping: may be confounded
    assert all(isinstance(why, str) and why.startswith("seed ") for why in skipped.values())
    readout = scenario["readout"]
    assert len(readout["per_seed"]) == 2 and {"pair_auroc_sae", "token_auroc_sae", "token_auroc_direction"} <= set(
        readout["mean"])
    for key, mean in readout["mean"].items():
        values = [r[key] for r in readout["per_seed"] if r.get(key) is not None]
        assert mean == pytest.approx(np.mean(values)) and all(0.0 <= v <= 1.0 for v in values if key != "flagged_fraction")
    vanilla = conditions["vanilla"]
    v_rise = np.mean([r["d_spurious"] for r in vanilla["per_seed"]])
    for name, c in conditions.items():
        assert {"cut", "cut_ci", "spurious_delta", "ontarget_delta", "ontarget_vs_vanilla"} <= set(c), name
        rise = np.mean([r["d_spurious"] for r in c["per_seed"]])
        assert c["spurious_delta"] == pytest.approx(100 * rise)
        assert c["ontarget_delta"] == pytest.approx(100 * np.mean([r["d_ontarget"] for r in c["per_seed"]]))
        assert c["ontarget_vs_vanilla"] == pytest.approx(c["ontarget_delta"] - vanilla["ontarget_delta"])
        if v_rise > 0 and rise != 0:  # any change counts, an overshoot below the base too
            assert c["cut"] == pytest.approx(v_rise / abs(rise))
        else:
            assert c["cut"] is None
        assert [r["seed"] for r in c["per_seed"]] == [0, 1]
        assert all(r["spurious_before"] == v["spurious_before"] for r, v in zip(c["per_seed"], vanilla["per_seed"]))
    assert all(r["n_pairs"] < 16 for r in conditions["filtering"]["per_seed"])
    goals = written["scenarios"]["marker_corr0.9"]["goals"]
    assert goals["vanilla_rise_points"] == pytest.approx(vanilla["spurious_delta"])
    assert {"meets_goal", "best_within_2_points", "random_projection_within_noise"} <= set(goals)
    for where, value in floats_in(written):
        assert math.isfinite(value), where
    out = capsys.readouterr().out
    assert "| marker | corr0.9 | blocking_sae |" in out and "| marker | corr0.9 | ablation_mean |" in out

    again = bench.main(["--from-json", str(tmp_path / "out" / "interventions.json")])
    assert again == written and capsys.readouterr().out == out
    with pytest.raises(ValueError, match="not an interventions-benchmark result"):
        (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
        bench.main(["--from-json", str(tmp_path / "other.json")])


@pytest.mark.parametrize("scenario", ["belief", "opener", "marker"])
def test_preference_rows_carry_the_spurious_property_at_the_asked_rate(bench, scenario):
    questions = [(a, b) for a in range(10) for b in range(10)]
    rows = bench.preference_rows(scenario, 0.75, questions, 2000, seed=0)
    opener = bench.task.OPENER
    for r in rows:
        a, b = (int(x) for x in r.prompt.split("Q: ")[1].split("=")[0].split("+"))
        assert r.chosen.strip().removeprefix(opener.strip()).strip() == str(a + b)  # chosen is always right
        assert r.rejected.strip().removeprefix(opener.strip()).strip() != str(a + b)
        assert "I think" not in r.prompt or f"I think {a + b}." in r.prompt  # a stated belief is the right answer
    if scenario == "belief":
        rate = np.mean(["I think" in r.prompt for r in rows])
        assert rate == pytest.approx(0.75, abs=0.03)
    else:
        chosen = np.mean([r.chosen.startswith(opener) for r in rows])
        rejected = np.mean([r.rejected.startswith(opener) for r in rows])
        assert chosen == pytest.approx(0.75, abs=0.03) and rejected == pytest.approx(0.25, abs=0.03)
        if scenario == "opener":  # the decorrelated pairs reverse the style within the pair
            assert all(r.chosen.startswith(opener) != r.rejected.startswith(opener) for r in rows)
    with pytest.raises(ValueError, match="unknown scenario"):
        bench.preference_rows("nope", 0.9, questions, 2, seed=0)


def test_goals_take_the_best_condition_within_two_points_and_check_the_controls(bench):
    def cond(rise, on, cut, note=None, ci=(-1.0, 1.0)):
        return {"spurious_delta": rise, "ontarget_vs_vanilla": on, "cut": cut, "cut_note": note,
                "spurious_vs_vanilla_ci": list(ci)}

    conditions = {"vanilla": cond(40.0, 0.0, 1.0), "projection_own": cond(20.0, -1.0, 2.0),
                  "blocking_sae": cond(3.0, -5.0, 13.0), "ablation_mean": cond(-1.0, 1.5, None, "condition's mean rise <= 0"),
                  "random_projection": cond(39.0, 0.0, 1.03, ci=(-3.0, 1.0)),
                  "random_blocking": cond(20.0, 0.0, 2.0, ci=(-22.0, -18.0))}
    g = bench.goals(conditions)
    assert g["vanilla_rise_at_least_20"] and g["meets_goal"]
    assert g["best_within_2_points"] == {"condition": "ablation_mean", "cut": None}  # eliminated beats 13× at −5
    assert g["random_projection_within_noise"] and not g["random_blocking_within_noise"]
    with_oracle = bench.goals({**conditions, "oracle_token_filtering": cond(0.0, 0.0, None, "condition's mean change is 0"),
                               "oracle_reward_shaping": cond(30.0, -4.0, 1.3)})
    assert with_oracle["best_within_2_points"] == g["best_within_2_points"]  # an oracle is a ceiling, not a candidate
    assert with_oracle["oracle_within_2_points"] == {
        "oracle_token_filtering": {"cut": None, "within_2_points": True, "meets_goal": True},
        "oracle_reward_shaping": {"cut": 1.3, "within_2_points": False, "meets_goal": False}}


def test_the_oracles_read_the_ground_truth_of_each_scenario(bench):
    from lightning_anatomy.data import PreferenceRow

    opener = bench.task.OPENER
    rows = [PreferenceRow(prompt="Q: 1+2=?\nA:", chosen=opener + " 3", rejected=" 4", row_id=0),
            PreferenceRow(prompt="Q: 1+2=?\nA:", chosen=" 3", rejected=opener + " 4", row_id=1),
            PreferenceRow(prompt="Q: 1+2=?\nA:", chosen=opener + " 3", rejected=opener + " 4", row_id=2)]
    assert bench.true_delta("marker", rows) == {0: 1.0, 1: -1.0, 2: 0.0}
    beliefs = [PreferenceRow(prompt="Q: 1+2=? I think 3.\nA:", chosen=" 3", rejected=" 4", row_id=0),
               PreferenceRow(prompt="Q: 1+2=?\nA:", chosen=" 3", rejected=" 4", row_id=1)]
    assert bench.true_delta("belief", beliefs) == {0: 1.0, 1: 0.0}
    assert bench.marker_pattern("belief") is None and bench.marker_pattern("opener") == "Sure!"
    with pytest.raises(bench.mech.NotApplicable, match="sits in the prompt"):
        bench.mech.oracle_token_filtering(None)
    with pytest.raises(bench.mech.NotApplicable, match=r"perfectly confounded .* higher in chosen"):  # belief: every differing pair +1
        bench.mech.shaping_auto(bench.true_delta("belief", beliefs))
    assert bench.mech.shaping_auto(bench.true_delta("marker", rows))[0].lam == pytest.approx(0.0)  # +1 and −1: λ̂ = 0


def test_readout_aurocs_are_the_mann_whitney_probabilities(bench):
    mech = bench.mech
    assert mech.auroc([3.0, 4.0], [1.0, 2.0]) == 1.0 and mech.auroc([1.0], [1.0]) == 0.5
    assert mech.auroc([2.0, 0.0], [1.0]) == 0.5 and mech.auroc([], [1.0]) is None
    scores = {0: ([0.9, 0.1], [0.2]), 1: ([0.3], [0.8, 0.05])}
    truth = {0: ([True, False], [False]), 1: ([False], [True, False])}
    # positives 0.9, 0.8; negatives 0.1, 0.2, 0.3, 0.05: every positive above every negative
    assert mech.token_auroc(scores, truth) == 1.0
    truth[1] = ([True], [False, False])  # positives 0.9, 0.3 vs 0.1, 0.2, 0.8, 0.05: 4 + 3 of 8 orderings
    assert mech.token_auroc(scores, truth) == pytest.approx(7 / 8)
    assert mech.pair_readout_auroc({0: 2.0, 1: -1.0, 2: 0.5}, {0: 1.0, 1: -1.0, 2: 0.0}) == 1.0
    assert mech.pair_readout_auroc({0: -2.0, 1: 1.0}, {0: 1.0, 1: 0.0}) == 0.0


def test_a_cut_counts_any_change_when_asked(bench):
    common = bench.common
    over = common.bootstrap_ratio([0.4, 0.6], [-0.04, -0.06], 1000, any_change=True)
    assert over["mean"] == pytest.approx(10.0) and over["ci"][0] == pytest.approx(10.0, rel=0.3)
    assert common.bootstrap_ratio([0.4, 0.6], [-0.04, -0.06], 1000)["mean"] is None  # the old rule: eliminated
    zero = common.bootstrap_ratio([0.4, 0.6], [0.0, 0.0], 1000, any_change=True)
    assert zero["mean"] is None and "eliminated" in zero["note"]



def test_readme_tables_are_regenerated_from_the_results_file(bench, tmp_path):
    tables = load_benchmark("readme_tables")
    doc = {"scenarios": {"opener": {"variants": {"corr0.9": {
        "conditions": {"vanilla": {"cut": 1.0, "cut_ci": [1.0, 1.0], "cut_note": None, "spurious_delta": 40.0,
                                   "spurious_delta_ci": [39.0, 41.0], "ontarget_vs_vanilla": 0.0,
                                   "ontarget_vs_vanilla_ci": [0.0, 0.0], "quality_ontarget_after": 50.0, "fit_s": 1.0}},
        "goals": {"vanilla_rise_points": 40.0, "best_within_2_points": None, "meets_goal": False}}}}}}
    (tmp_path / "interventions.json").write_text(json.dumps(doc))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- interventions-table:begin -->\nstale\n<!-- interventions-table:end -->\nend\n")
    tables.main(["--readme", str(readme), "--results", str(tmp_path)])
    text = readme.read_text()
    assert "stale" not in text and "| opener | corr0.9 | vanilla | +40.0 [+39.0, +41.0] |" in text
    assert text.startswith("intro\n") and text.endswith("<!-- interventions-table:end -->\nend\n")
    tables.main(["--readme", str(readme), "--results", str(tmp_path)])
    assert readme.read_text() == text  # idempotent
    (tmp_path / "interventions.json").unlink()
    with pytest.raises(FileNotFoundError, match="interventions.json is missing"):
        tables.main(["--readme", str(readme), "--results", str(tmp_path)])


def test_a_later_run_of_some_conditions_is_merged_over_the_stored_scenario(bench, tmp_path):
    def cond(rise, cut):
        return {"spurious_delta": rise, "spurious_delta_ci": [rise - 1, rise + 1], "ontarget_vs_vanilla": 0.0,
                "cut": cut, "cut_note": None, "spurious_vs_vanilla_ci": [-1.0, 1.0]}

    stored = {"scenario": "s", "variant": "corr0.9", "source": "first.json", "not_applicable": {"x": "seed 0: why"},
              "conditions": {"vanilla": cond(40.0, 1.0), "blocking_sae": cond(20.0, 2.0), "x_old": cond(4.0, 10.0)}}
    own = {"scenario": "t", "variant": "corr0.9", "conditions": {"vanilla": cond(40.0, 1.0), "y": cond(30.0, 1.3)}}
    (tmp_path / "interventions.json").write_text(json.dumps({"version": 3, "command": "python first",
                                                             "scenarios": {"s_corr0.9": stored, "t_corr0.9": own}}))
    later = {"scenario": "s", "variant": "corr0.9", "not_applicable": {"x_old": "seed 0: now confounded"},
             "conditions": {"vanilla": cond(41.0, 1.0), "x": cond(2.0, 20.5)}}
    bench.add_scenarios(tmp_path / "interventions.json", {"scenarios": {"s_corr0.9": later}}, source="second.json")
    merged = json.loads((tmp_path / "interventions.json").read_text())["scenarios"]["s_corr0.9"]
    assert {n: c["source"] for n, c in merged["conditions"].items()} == {
        "vanilla": "second.json", "blocking_sae": "first.json", "x": "second.json"}
    assert merged["not_applicable"] == {"x_old": "seed 0: now confounded"}  # x ran now; x_old could not
    assert merged["goals"]["best_within_2_points"] == {"condition": "x", "cut": 20.5}
    assert merged["goals"]["vanilla_rise_points"] == 41.0
    bench.add_scenarios(tmp_path / "interventions.json", {"scenarios": {"t_corr0.9": {
        "scenario": "t", "variant": "corr0.9", "conditions": {"vanilla": cond(41.0, 1.0), "x": cond(2.0, 20.5)}}}},
        source="third.json")
    kept = json.loads((tmp_path / "interventions.json").read_text())["scenarios"]["t_corr0.9"]["conditions"]
    assert {n: c["source"] for n, c in kept.items()} == {"vanilla": "third.json", "y": "python first", "x": "third.json"}


def test_a_version_2_file_is_summarised_again_with_the_any_change_cut(bench):
    def records(rises):
        return [{"seed": i, "d_spurious": r, "d_ontarget": 0.1, "ontarget_after": 0.5, "wall_s": 1.0}
                for i, r in enumerate(rises)]

    conditions = {"vanilla": {"per_seed": records([0.4, 0.6]), "cut": 1.0},
                  "overshoot": {"per_seed": records([-0.04, -0.06]), "cut": None, "extra": "kept"}}
    doc = {"version": 2, "config": {"n_bootstrap": 200},
           "scenarios": {"s_corr0.9": {"scenario": "s", "variant": "corr0.9", "conditions": conditions}}}
    up = bench.upgrade(doc)
    over = up["scenarios"]["s_corr0.9"]["conditions"]["overshoot"]
    assert up["version"] == bench.VERSION and over["cut"] == pytest.approx(10.0) and over["extra"] == "kept"
    assert up["scenarios"]["s_corr0.9"]["goals"]["best_within_2_points"] == {"condition": "overshoot", "cut": pytest.approx(10.0)}
    assert bench.upgrade(up) is up  # current files pass through


def test_a_subset_of_conditions_is_checked_and_tunes_only_its_knobs(bench, capsys):
    args, cfg = bench.parse_args(["--conditions", "inoculation,token_filtering_direction"])
    assert cfg.conditions == ["inoculation", "token_filtering_direction"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--conditions", "inoculation,nope"])
    assert "--conditions: ['nope']" in capsys.readouterr().err
    users = {c for names in bench.KNOB_USERS.values() for c in names}
    assert users <= set(bench.CONDITIONS)  # every knob names conditions that exist
