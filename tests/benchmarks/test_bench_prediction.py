"""`benchmarks/prediction.py`: the --quick path end to end (training-prompt and held-out rollouts,
each sampled once per prompt set), the results layout, and its tables on old and new results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.bench_loader import load_benchmark

REPO = Path(__file__).resolve().parents[2]
HH_RLHF = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test-a.jsonl"
KEYS = {"r2", "r2_ci", "r2_ols", "sign_agreement", "n_clusters", "prompts"}


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("prediction")


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _counting_sampler(monkeypatch) -> list[int]:
    """Count the rollout samplings check_prediction makes (one per policy per sampled prompt set)."""
    import lightning_anatomy.audit.prediction as prediction

    calls: list[int] = []
    real = prediction.sample_rollouts

    def counted(policy, ids, **kwargs):
        calls.append(len(ids))
        return real(policy, ids, **kwargs)

    monkeypatch.setattr(prediction, "sample_rollouts", counted)
    return calls


def test_quick_run_measures_train_and_heldout_prompts_sampling_each_once(bench, tmp_path, monkeypatch):
    """graded_controlled always; hh_smollm2 where ../shared/data holds the HH sample (else skipped)."""
    calls = _counting_sampler(monkeypatch)
    results = bench.main(["--quick", "--out", str(tmp_path), "--threads", "1", "--hh", str(HH_RLHF),
                          "--parts", "graded_controlled", "hh_smollm2"])
    on_disk = json.loads((tmp_path / "prediction.quick.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    settings = {k: v for k, v in on_disk["settings"].items() if "skipped" not in v}
    assert "graded_controlled" in settings and ("hh_smollm2" in settings) == HH_RLHF.is_file()
    sampled_sets = 0
    for part in settings.values():
        n_heldout = part.get("n_heldout_prompts", part.get("n_heldout"))
        assert part["n_train_prompts"] == n_heldout  # the default: as many training prompts as held-out ones
        assert set(part["implicit_reward_accuracy"]) == {"train", "heldout"}
        assert all(0 <= v <= 1 for v in part["implicit_reward_accuracy"].values())
        assert set(part["methods"]) == set(part["methods_heldout"]) == {"paper", "paired", "tilt"}
        for key, prompts, n in (("methods", "train", part["n_train_prompts"]), ("methods_heldout", "heldout", n_heldout)):
            entries = part[key]
            for entry in entries.values():
                assert KEYS <= set(entry) and entry["prompts"] == prompts
            checked = {e["method"]: e for e in entries.values() if "n_rollouts" in e}
            if not checked:  # no method had clusters to check: nothing sampled
                continue
            sampled_sets += 1
            assert all(e["n_prompts"] == n and e["n_rollouts"] == n * bench.QUICK.samples_per_prompt
                       for e in checked.values())
            # one method sampled this prompt set, every later one reused its rollouts
            assert sorted(e["reused_rollouts"] for e in checked.values()) == [False] + [True] * (len(checked) - 1)
            if "paper" in checked:
                assert entries["tilt"]["check_s"] == entries["paper"]["check_s"]  # one check, two predictors
    assert len(calls) == 2 * sampled_sets  # before and after, once per prompt set
    table = bench.tables(on_disk)
    for name in settings:
        for key in ("paper", "tilt", "paired"):
            assert f"| {name} | {key} | train |" in table and f"| {name} | {key} | heldout |" in table
    assert "implicit-reward accuracy" in table


def test_run_flags_set_prompt_counts_and_sweep_clusters_on_the_same_rollouts(bench, tmp_path, monkeypatch):
    calls = _counting_sampler(monkeypatch)
    results = bench.main(["--quick", "--out", str(tmp_path), "--threads", "1", "--parts", "graded_controlled",
                          "--train-prompts", "3", "--hh-heldout", "5", "--cluster-sweep", "4, auto",
                          "--tilt-samples", "dataset,both"])
    assert results["sizes"]["hh_n_heldout"] == 5  # recorded with the run (hh_smollm2's held-out pairs)
    part = results["settings"]["graded_controlled"]
    assert part["n_train_prompts"] == 3 and part["n_heldout_prompts"] == bench.QUICK.n_heldout
    assert {e["n_prompts"] for e in part["methods"].values() if "n_prompts" in e} == {3}
    assert sorted(calls) == [3, 3, bench.QUICK.n_heldout, bench.QUICK.n_heldout]
    # the sweep: the run's own rule, then each swept rule, per prompt set, on the rollouts above (no more sampling)
    sweep = part["cluster_sweep"]
    assert [(r["cluster_target_size"], r["prompts"]) for r in sweep] == [
        (rule, prompts) for rule in (None, 4.0, "auto") for prompts in ("train", "heldout")]
    for r in sweep[:2]:
        own = part[bench.RESULT_KEYS[r["prompts"]]]
        assert r["paper"]["r2"] == own["paper"]["r2"] and r["tilt"]["r2"] == own["tilt"]["r2"]
    for r in sweep[2:]:
        assert r["leiden_resolution_used"] and set(r["paper"]) == set(r["tilt"]) == KEYS - {"prompts"}
    table = bench.sweep(results)
    assert table.count("| graded_controlled |") == 6 and "| 4 features → resolution " in table
    assert "cluster sweep" in bench.sweep({"settings": {"x": {}}})
    # the tilt samples: its own first, then each further one, per prompt set, on the same rollouts
    samples = part["tilt_samples"]
    assert [(r["tilt_sample"], r["prompts"]) for r in samples] == [
        (sample, prompts) for prompts in ("train", "heldout") for sample in ("rollouts", "dataset", "both")]
    for r in samples:
        own = part[bench.RESULT_KEYS[r["prompts"]]]["tilt"]
        assert (r["r2"] == own["r2"]) if r["tilt_sample"] == "rollouts" else r["sample_used"] == r["tilt_sample"]
        assert set(r["markers_predicted"]) == {m.name for m in bench.MARKERS}
    table = bench.samples(results)
    assert table.count("| graded_controlled |") == 6 and "| both | heldout |" in table
    assert "tilt samples" in bench.samples({"settings": {"x": {}}})
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--out", str(tmp_path), "--train-prompts", "1"])
    for bad in (["--hh-heldout", "1"], ["--cluster-sweep", "4,1"], ["--cluster-sweep", "big"],
                ["--cluster-target-size", "0.5"], ["--tilt-samples", "rollouts"], ["--tilt-samples", "both,all"]):
        with pytest.raises(SystemExit):
            bench.main(["--quick", "--out", str(tmp_path), *bad])


def test_prompt_sets_default_to_the_heldout_count_and_clip_to_the_data(bench):
    sizes = bench.QUICK
    sets = bench.prompt_sets([f"t{i}" for i in range(10)], ["h0", "h1", "h2"], sizes)
    assert sets == {"train": ["t0", "t1", "t2"], "heldout": ["h0", "h1", "h2"]}
    from dataclasses import replace

    assert bench.prompt_sets(["t0", "t1"], ["h0"], replace(sizes, n_train_prompts=5))["train"] == ["t0", "t1"]


def _entry(r2: float, prompts: str | None) -> dict:
    entry = {"r2": r2, "r2_ci": [0.1, 0.9], "r2_ols": 0.5, "sign_agreement": 0.75, "n_clusters": 12}
    return entry if prompts is None else entry | {"prompts": prompts}


def test_tables_show_both_prompt_sets_and_read_results_from_before_them(bench):
    new = {"settings": {"s": {"methods": {"paper": _entry(0.25, "train"), "tilt": _entry(0.5, "train")},
                              "methods_heldout": {"paper": _entry(0.125, "heldout"), "tilt": _entry(0.75, "heldout")},
                              "implicit_reward_accuracy": {"train": 0.875, "heldout": 0.5}}}}
    lines = bench.tables(new).splitlines()
    rows = [line for line in lines if line.startswith("| s |")]
    assert [row.split(" | ")[1:4] for row in rows[:4]] == [
        ["paper", "train", "0.250"], ["paper", "heldout", "0.125"], ["tilt", "train", "0.500"],
        ["tilt", "heldout", "0.750"]]
    assert rows[4] == "| s | 0.875 | 0.500 |"
    # the old layout: `methods` measured on held-out prompts (some entries without `prompts`), no train accuracy
    old = {"settings": {"s": {"methods": {"paper": _entry(0.25, None), "tilt": _entry(0.5, "heldout")},
                              "heldout_reward_accuracy": 0.5}, "t": {"methods": {"paper": _entry(0.3, None)}}}}
    text = bench.tables(old)
    assert "| s | paper | heldout | 0.250 |" in text and "| s | tilt | heldout | 0.500 |" in text
    assert "| s | – | 0.500 |" in text and "| t | – |" not in text and "train" not in text.split("\n\n")[0]


def test_stored_results_still_render_in_the_docs(bench):
    """The results files stored before the training-prompt measurement render without error."""
    readme_tables = load_benchmark("readme_tables")
    results = REPO / "benchmarks" / "results"
    stored = json.loads((results / "prediction.json").read_text())
    assert all(f"| {name} |" in bench.tables(stored) for name in stored["settings"])
    page = "x\n<!-- prediction-table:begin -->\nold\n<!-- prediction-table:end -->\ny\n"
    rendered = readme_tables.render(page, results)
    assert "old" not in rendered and "| graded_controlled | paper |" in rendered


def test_merge_keeps_both_measurements(bench, tmp_path):
    part = {"format": bench.FORMAT, "quick": False, "wall_s": 12.0, "seed": 0, "sizes": {}, "settings": {
        "s": {"methods": {"paper": _entry(0.25, "train")}, "methods_heldout": {"paper": _entry(0.125, "heldout")},
              "implicit_reward_accuracy": {"train": 0.875, "heldout": 0.5}}}}
    path = tmp_path / "part.json"
    path.write_text(json.dumps(part))
    merged = bench.main(["--merge", str(path), "--out", str(tmp_path), "--name", "merged"])
    assert merged["settings"] == part["settings"] and merged["parts"]["s"]["wall_s"] == 12.0
    assert json.loads((tmp_path / "merged.json").read_text())["settings"] == part["settings"]


def test_goals_table_checks_each_pre_registered_goal(bench):
    marker = {"cluster": 1, "cluster_predicted": 0.2, "disparity": 0.5}
    graded = {"methods": {"paper": _entry(0.95, "train"),
                          "tilt": _entry(0.9, "train") | {"n_clusters": 20, "r2_ols": 0.69, "all_marker_signs_predicted": False,
                                                          "markers": {"a": marker, "b": marker | {"disparity": -0.5}}}},
              "methods_heldout": {"paper": _entry(0.5, "heldout"), "tilt": _entry(0.5, "heldout")}}
    hh = {"methods": {"paper": _entry(None, "train"), "tilt": _entry(0.6, "train")}}
    text = bench.goals({"settings": {"graded_smollm2": graded, "hh_smollm2": hh, "other": graded,
                                     "graded_controlled": {"skipped": "no data"}}})
    rows = [line.split(" | ") for line in text.splitlines()[2:]]
    assert [(r[0][2:], r[1], r[2], r[3][:-2]) for r in rows] == [
        ("graded_smollm2", "tilt R² ≥ 0.9, training prompts", "0.900", "met"),
        ("graded_smollm2", "≥ 20 clusters", "20", "met"),
        ("graded_smollm2", "tilt OLS R² through the origin ≥ 0.7", "0.690", "missed"),
        ("graded_smollm2", "every planted marker's sign", "1 of 2 (in 1 cluster)", "missed"),
        ("graded_smollm2", "tilt R² ≥ paper R², training prompts", "0.900 vs 0.950", "missed"),
        ("graded_smollm2", "tilt R² ≥ paper R², held-out prompts", "0.500 vs 0.500", "met"),
        ("hh_smollm2", "tilt R² ≥ 0.6, training prompts", "0.600", "met"),
        ("hh_smollm2", "tilt R² ≥ paper R², training prompts", "0.600 vs –", "missed"),  # no paper number: not shown as met
    ]


def test_headline_reads_the_training_prompt_measurement(bench):
    doc = {"settings": {"s": {"methods": {"paper": _entry(0.25, "train"), "tilt": _entry(0.5, "train")},
                              "methods_heldout": {"paper": _entry(0.125, "heldout")}},
                        "old": {"methods": {"paper": _entry(0.3, None)}}, "gone": {"skipped": "absent"}}}
    rows = bench.headline(doc).splitlines()[2:]
    assert rows == ["| s | train | 0.250 [0.100, 0.900] (12) | 0.500 [0.100, 0.900] (12) | – |",
                    "| old | heldout | 0.300 [0.100, 0.900] (12) | – | – |"]
