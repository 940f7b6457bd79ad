"""Benchmarks: `cost.py --quick` and `throughput.py --quick` write complete, finite results whose
derived numbers follow from the measured ones; the shared helpers and the runner behave."""

from __future__ import annotations

import json
import math
import time

import pytest

from tests.helpers.bench_loader import load_benchmark

common = load_benchmark("_common")


@pytest.fixture(autouse=True)
def _one_thread():
    """The scripts run in-process here, where torch loaded before the benchmarks could make OpenMP
    wait passively; with 2 busy-waiting threads on a shared 2-core machine a step can take 50× longer.
    One thread sidesteps that; the thread count is restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _finite_positive(value, where: str) -> None:
    assert isinstance(value, int | float) and math.isfinite(value) and value > 0, f"{where} = {value!r}"


# --------------------------------------------------------------------------- cost.py --quick
def test_cost_quick_writes_finite_ratios_and_trl_comparison(tmp_path, capsys):
    cost = load_benchmark("cost")
    results = cost.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    on_disk = json.loads((tmp_path / "cost.quick.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert (tmp_path / "cost.quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert on_disk["format"] == cost.FORMAT and on_disk["quick"] is True
    assert on_disk["time_basis"] == "cpu_s" and on_disk["machine"]["device"] == "cpu"

    (setting,) = cost.QUICK
    model = on_disk["models"][setting.name]
    assert model["tokens_per_step"] == 2 * setting.pairs_per_step * (setting.prompt_tokens + setting.completion_tokens)
    conditions = model["callbacks"]["conditions"]
    assert set(conditions) == set(cost.CALLBACK_CONDITIONS)
    for name, c in conditions.items():
        for basis in ("wall_s", "cpu_s"):
            assert c[basis]["n"] == setting.steps_per_block * setting.repeats
            assert c[basis]["min"] <= c[basis]["q1"] <= c[basis]["median"] <= c[basis]["q3"]
            _finite_positive(c[basis]["median"], f"{name}.{basis}")
        _finite_positive(c["memory"]["peak_rss_mb"], f"{name}.peak_rss_mb")
        assert 0 <= c["memory"]["step_rss_increase_mb"] <= c["memory"]["peak_rss_mb"]

    ratios = model["callbacks"]["ratios"]
    t = {name: c["cpu_s"]["median"] for name, c in conditions.items()}
    # Every ratio is the quotient of the medians it names; the drift monitor is amortised over 50 steps.
    assert ratios["step_time"]["attribution"] == pytest.approx(t["attribution"] / t["vanilla"], rel=1e-12)
    probe = t["drift_probing"] - t["drift_between"]
    assert ratios["probe_cost_cpu_s"] == pytest.approx(probe, rel=1e-12)
    assert ratios["step_time"]["drift_amortised"] == pytest.approx((t["drift_between"] + probe / 50) / t["vanilla"])
    assert ratios["step_time"]["all_amortised"] == pytest.approx((t["all"] + probe / 50) / t["vanilla"])
    mem = {name: c["memory"]["peak_rss_mb"] for name, c in conditions.items()}
    assert ratios["peak_memory"]["projection_own"] == pytest.approx(mem["projection_own"] / mem["vanilla"])
    for group in ("step_time", "step_time_wall", "peak_memory", "step_memory"):
        for key, value in ratios[group].items():
            _finite_positive(value, f"{group}.{key}")

    # Issue 22: token filtering and inoculation timed like the rest; the one-time pass apart, per pair.
    assert ratios["step_time"]["token_filtering"] == pytest.approx(t["token_filtering"] / t["vanilla"], rel=1e-12)
    assert ratios["step_time"]["inoculation"] == pytest.approx(t["inoculation"] / t["vanilla"], rel=1e-12)
    assert 0 < model["callbacks"]["token_filtering"]["dropped_fraction"] < 0.5
    assert model["callbacks"]["inoculation"]["inoculated_share"] == 0.5
    assert model["callbacks"]["inoculation"]["instruction_tokens"] == setting.prompt_tokens // 2
    one = model["one_time_pass"]
    assert one["pairs"] == setting.pass_pairs and set(one["per_pair"]) == set(cost.PASS_JOBS)
    base = one["per_pair"]["audit_extraction"]["cpu_s"]["median"]
    for job in ("mask_patterns", "mask_sae_features"):
        assert one["per_pair"][job]["cpu_s"]["n"] == setting.repeats
        assert one["ratios"][job] == pytest.approx(one["per_pair"][job]["cpu_s"]["median"] / base, rel=1e-12)
        assert 0 < one["dropped_fraction"][job] < 0.5  # both passes flag a share of the tokens, not none or all
        _finite_positive(one["ratios_wall"][job], f"one_time_pass.ratios_wall.{job}")
    goals = model["goals"]
    assert set(goals) == {"token_filtering_step_time", "inoculation_step_time", "mask_patterns_vs_extraction",
                          "mask_sae_features_vs_extraction"}
    assert goals["inoculation_step_time"]["value"] == ratios["step_time"]["inoculation"]
    assert goals["mask_patterns_vs_extraction"]["value"] == one["ratios"]["mask_patterns"]
    for g in goals.values():
        assert g["met"] == (g["value"] <= g["target"]) and g["target"] in (1.0, 1.02)

    trl = model["trl"]
    dpo, ref = trl["conditions"]["dpomodule"], trl["conditions"]["trl"]
    assert trl["steps_per_s_ratio"] == pytest.approx(ref["cpu_s"]["median"] / dpo["cpu_s"]["median"])
    assert trl["settings"]["trl_precompute_ref_log_probs"] is False
    _finite_positive(trl["step_memory_ratio"], "trl.step_memory_ratio")
    full = trl["conditions"]["dpomodule_full_logits"]  # the path before chunked log-probs, interleaved with both
    assert trl["full_logits"]["steps_per_s_ratio"] == pytest.approx(ref["cpu_s"]["median"] / full["cpu_s"]["median"])
    assert trl["logps_chunk_size"] == 512
    for key in ("steps_per_s_ratio", "step_memory_ratio"):
        _finite_positive(trl["chunked_vs_full_logits"][key], f"trl.chunked_vs_full_logits.{key}")

    out = capsys.readouterr().out
    assert out.startswith("Concept callbacks:")  # stdout carries only the tables
    assert "| gpt2-2x64-byte | ConceptAttribution (every step) |" in out
    assert "DPOModule vs TRL 1.16 DPOTrainer" in out
    assert "| gpt2-2x64-byte | full logits (logps_chunk_size=None) |" in out
    assert "| gpt2-2x64-byte | TokenFiltering (pattern masks, every step) |" in out
    assert "Token filtering's one-time mask pass per pair vs the audit's extraction" in out
    assert "| gpt2-2x64-byte | mask_sae_features_vs_extraction |" in out
    assert cost.main(["--report", str(tmp_path / "cost.quick.json")]) == on_disk  # re-print without measuring
    assert capsys.readouterr().out.strip() == out.strip()
    (tmp_path / "other.json").write_text(json.dumps({"format": "lightning-anatomy/bench-throughput"}))
    with pytest.raises(SystemExit, match="not a cost result"):
        cost.main(["--report", str(tmp_path / "other.json")])


def test_cost_measures_a_subset_of_the_callback_conditions_into_its_own_file(tmp_path, capsys):
    cost = load_benchmark("cost")
    results = cost.main(["--quick", "--out", str(tmp_path), "--threads", "1", "--groups", "callbacks",
                         "--callbacks", "inoculation", "token_filtering", "--repeats", "2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cost.quick.callbacks.token_filtering+inoculation.json",
                                                          "cost.quick.callbacks.token_filtering+inoculation.png"]
    (model,) = results["models"].values()
    assert set(model["callbacks"]["conditions"]) == {"vanilla", "token_filtering", "inoculation"}  # vanilla always
    (setting,) = cost.QUICK
    assert model["callbacks"]["conditions"]["inoculation"]["cpu_s"]["n"] == 2 * setting.steps_per_block  # --repeats
    assert "trl" not in model and "one_time_pass" in model
    with pytest.raises(SystemExit, match="add --groups callbacks"):
        cost.main(["--quick", "--groups", "trl", "--callbacks", "inoculation"])
    capsys.readouterr()


def test_cost_marked_and_inoculated_pairs_keep_the_batch_shape():
    from lightning_anatomy.callbacks import TokenFiltering
    from lightning_anatomy.data import collate_pairs
    from lightning_anatomy.models.tiny import build_tiny_tokenizer

    cost = load_benchmark("cost")
    tok = build_tiny_tokenizer()
    setting = cost.ModelSetting("x", "tiny:gpt2", pairs_per_step=2, prompt_tokens=12, completion_tokens=16)
    plain = cost.random_pairs(40, setting, vocab=260, eos=0, seed=0)
    marker = cost._text_ids(tok, cost.MARKER)
    pairs = cost.mark_pairs(plain, marker, seed=0)
    assert [(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs] == [(16, 16)] * 40
    assert all(p.chosen_ids[-1] == 0 and p.rejected_ids[-1] == 0 for p in pairs)

    def has_marker(ids):
        return any(ids[i:i + len(marker)] == marker for i in range(len(ids)))

    chosen = sum(has_marker(p.chosen_ids) for p in pairs)
    rejected = sum(has_marker(p.rejected_ids) for p in pairs)
    assert chosen >= 30 and rejected <= 10 and chosen > rejected  # ~90 % / ~10 %
    # The filter's pattern removes the marker's asterisk tokens (4 of " **bold**") and nothing else.
    masks = TokenFiltering(patterns=[cost.FILTER_PATTERN]).compute_masks(pairs, tok, None)
    for p in pairs:
        for side, keep in zip(("chosen", "rejected"), masks[p.row_id]):
            assert keep.count(False) == (4 if has_marker(getattr(p, f"{side}_ids")) else 0)

    inoculated = cost.inoculate_pairs(pairs, cost._text_ids(tok, cost.INSTRUCTION))
    instruction = cost._text_ids(tok, cost.INSTRUCTION)[:6]
    for i, (p, q) in enumerate(zip(pairs, inoculated)):
        assert len(q.prompt_ids) == 12 and q.chosen_ids == p.chosen_ids
        if i % 2:
            assert q == p
        else:  # the policy's prompt ends with the instruction; the reference's is the prompt without it
            assert q.prompt_ids == p.prompt_ids[:6] + instruction and q.ref_prompt_ids == p.prompt_ids[:6]
    batch = collate_pairs(inoculated[:2], pad_token_id=3)
    assert batch["input_ids"].shape == collate_pairs(pairs[:2], pad_token_id=3)["input_ids"].shape == (4, 28)
    assert batch["ref_input_ids"].shape == (4, 28)  # the un-inoculated pair keeps the reference batch's length
    assert batch["ref_attention_mask"].sum().item() == batch["attention_mask"].sum().item() - 2 * 6
    with pytest.raises(ValueError, match="share must be in"):
        cost.inoculate_pairs(pairs, instruction, share=0)


def test_cost_rejects_bad_settings():
    cost = load_benchmark("cost")
    with pytest.raises(SystemExit, match="unknown setting"):
        cost.main(["--quick", "--models", "no-such-model"])
    with pytest.raises(SystemExit, match="--repeats must be >= 1"):
        cost.main(["--quick", "--repeats", "0"])
    with pytest.raises(ValueError, match="token_filtering decodes completions"):
        cost.ModelSetting("x", "random:qwen2-0.5b", 1, 4, 4)
    with pytest.raises(ValueError, match="must include 'vanilla'"):
        cost.ModelSetting("x", "tiny:gpt2", 1, 4, 4, conditions=("attribution",))
    with pytest.raises(ValueError, match="unknown model source"):
        cost.build_model(cost.ModelSetting("x", "hub:gpt2", 1, 4, 4))


def test_cost_random_pairs_have_exact_lengths():
    cost = load_benchmark("cost")
    setting = cost.ModelSetting("x", "tiny:gpt2", pairs_per_step=2, prompt_tokens=5, completion_tokens=3)
    pairs = cost.random_pairs(4, setting, vocab=260, eos=0, seed=0)
    assert [p.row_id for p in pairs] == [0, 1, 2, 3]
    for p in pairs:
        assert len(p.prompt_ids) == 5 and len(p.chosen_ids) == 3 and len(p.rejected_ids) == 3
        assert p.chosen_ids[-1] == 0 and p.rejected_ids[-1] == 0
        assert all(4 <= t < 260 for t in p.prompt_ids + p.chosen_ids[:-1])
    assert cost.random_pairs(4, setting, 260, 0, seed=0) == pairs  # seeded


# --------------------------------------------------------------------------- throughput.py --quick
def test_throughput_quick_counts_tokens_and_projects_exactly(tmp_path, capsys):
    tp = load_benchmark("throughput")
    results = tp.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    on_disk = json.loads((tmp_path / "throughput.quick.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    (setting,) = tp.QUICK
    model = on_disk["models"][setting.name]
    has_hh = common.HH_RLHF.is_file()
    assert model["data"].startswith("hh-rlhf" if has_hh else "demo")

    tokens = model["tokens"]
    assert tokens["pairs"] == setting.n_pairs
    assert tokens["real_tokens_per_pair"] * tokens["pairs"] == pytest.approx(tokens["real_tokens"])
    assert tokens["real_tokens"] <= tokens["padded_tokens"]
    assert set(model["conditions"]) == set(tp.CONDITIONS)
    for name, c in model["conditions"].items():
        assert c["cpu_s"]["n"] == setting.repeats
        assert c["pairs_per_s"] == pytest.approx(setting.n_pairs / c["cpu_s"]["median"])
        assert c["tokens_per_s"] == pytest.approx(tokens["real_tokens"] / c["cpu_s"]["median"])
        _finite_positive(c["tokens_per_s_wall"], f"{name}.tokens_per_s_wall")
    c = model["conditions"]
    assert model["extract_vs_forward"] == pytest.approx(c["forward"]["cpu_s"]["median"] / c["extract"]["cpu_s"]["median"])

    p = on_disk["projection"]
    a = p["assumptions"]
    # Llama-3.1-8B block: q,o 4096² each, k,v 4096×1024 each (8 KV heads), MLP 3 × 4096 × 14336.
    assert a["block_params"] == 2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 == 218_103_808
    goal = p["at_goal_efficiency_0.9"]
    f = goal["flops_per_token"]
    assert f["dense"] == 2 * 218_103_808 * 16 and f["sae_encode"] == 2 * 4096 * 131072
    assert f["total"] == pytest.approx(f["dense"] + f["attention"] + f["sae_encode"])
    hours = 260_000 * goal["padded_tokens_per_pair"] * f["total"] / (989e12 * 0.35) / 0.9 / 3600
    assert goal["gpu_hours"] == pytest.approx(hours, rel=1e-12)
    assert goal["gpu_hours"] == pytest.approx(goal["forward_gpu_hours"] / 0.9)
    if has_hh:
        assert p["token_stats"]["rows"] == tp.QUICK_HH_ROWS
        assert a["token_source"] == "hh-rlhf"
    out = capsys.readouterr().out
    assert "| model | data | tokens/pair |" in out and "GPU-hours" in out
    assert tp.main(["--report", str(tmp_path / "throughput.quick.json")]) == on_disk
    assert capsys.readouterr().out.strip() == out.strip()


def test_throughput_token_counts_and_sorted_batches():
    tp = load_benchmark("throughput")
    from lightning_anatomy.data import TokenizedPair

    pairs = [TokenizedPair(0, [1, 2], [3], [4, 5, 6]), TokenizedPair(1, [1], [2, 3], [4]),
             TokenizedPair(2, [1, 2, 3, 4], [5, 6], [7])]
    batches = tp.sorted_batches(pairs, 2)
    assert [[p.row_id for p in b] for b in batches] == [[2, 0], [1]]  # longest (6, 5, 3 tokens) first
    counts = tp.token_counts(pairs, 2)
    assert counts["real_tokens"] == (4 + 1 + 3) + (2 + 2 + 1) + (8 + 2 + 1)
    assert counts["padded_tokens"] == 2 * 2 * 6 + 2 * 1 * 3
    assert counts["mean_sequence"] == pytest.approx(counts["real_tokens"] / 6)


# --------------------------------------------------------------------------- _common helpers
def test_interleaved_alternates_order_and_drops_warmup():
    calls: list[str] = []

    def condition(name: str, value: float):
        return lambda: calls.append(name) or value

    samples = common.interleaved({"a": condition("a", 1.0), "b": condition("b", 2.0), "c": condition("c", 3.0)},
                                 repeats=3, warmup=1, log=None)
    assert calls == list("abc" "cba" "abc" "cba")
    assert samples == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [3.0] * 3}
    with pytest.raises(ValueError, match="repeats"):
        common.interleaved({"a": lambda: 1.0}, repeats=0)


def test_summarize_ratio_and_table():
    s = common.summarize([4.0, 1.0, 3.0, 2.0])
    assert s == {"median": 2.5, "q1": 1.75, "q3": 3.25, "min": 1.0, "n": 4}
    assert common.summarize([7.0]) == {"median": 7.0, "q1": 7.0, "q3": 7.0, "min": 7.0, "n": 1}
    with pytest.raises(ValueError, match="at least one sample"):
        common.summarize([])
    assert common.ratio(3.0, 2.0) == 1.5
    for bad in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cannot form the ratio"):
            common.ratio(1.0, bad)
    assert common.markdown_table(["a", "b"], [[1.23456, None], ["x", 2]]) == "| a | b |\n|---|---|\n| 1.235 |  |\n| x | 2 |"


def test_atomic_write_json_refuses_non_finite_and_keeps_old_file(tmp_path):
    path = tmp_path / "r" / "x.json"
    common.atomic_write_json(path, {"b": 1, "a": [1.5]})
    assert json.loads(path.read_text()) == {"a": [1.5], "b": 1}
    with pytest.raises(ValueError, match=r"result\.m\.ratio\[1\] is nan"):
        common.atomic_write_json(path, {"m": {"ratio": [1.0, float("nan")]}})
    assert json.loads(path.read_text()) == {"a": [1.5], "b": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]  # no temp file left behind


def test_peak_memory_sees_a_touched_allocation():
    import torch

    with common.PeakMemory() as small:
        pass
    with common.PeakMemory() as big:
        x = torch.ones(48 * 2**20 // 4)  # 48 MiB, every page written
        del x
    assert big.reset_ok
    assert big.rss_increase >= 40 * 2**20
    assert small.rss_increase < big.rss_increase
    assert big.rss_peak >= big.rss_start + big.rss_increase - 1


def test_time_call_cpu_separates_waiting_from_working():
    wall, cpu = common.time_call_cpu(lambda: time.sleep(0.05))
    assert wall >= 0.05 and cpu < 0.03


# --------------------------------------------------------------------------- run_all.py
def test_run_all_runs_every_script_in_order_and_reports_failures(tmp_path, capsys):
    run_all = load_benchmark("run_all")
    bench = tmp_path / "bench"
    bench.mkdir()
    log = tmp_path / "log.txt"
    for name, code in (("b_second", 0), ("a_first", 0), ("c_fails", 3)):
        (bench / f"{name}.py").write_text(
            "import os, sys\n"
            f"open({str(log)!r}, 'a').write('{name} ' + ' '.join(sys.argv[1:]) + ' ' + os.environ['HF_HUB_OFFLINE'] + '\\n')\n"
            f"sys.exit({code})\n")
    (bench / "_helper.py").write_text("raise SystemExit('helpers are not benchmarks')\n")

    assert [p.stem for p in run_all.discover(bench)] == ["a_first", "b_second", "c_fails"]
    assert run_all.main(["--dir", str(bench), "--quick"]) == 1
    assert log.read_text().splitlines() == ["a_first --quick 1", "b_second --quick 1", "c_fails --quick 1"]
    out = capsys.readouterr()
    assert "| c_fails | 3 |" in out.out and "failed: c_fails" in out.err

    log.unlink()
    assert run_all.main(["--dir", str(bench), "b_second"]) == 0
    assert log.read_text().splitlines() == ["b_second  1"]
    with pytest.raises(SystemExit):
        run_all.main(["--dir", str(bench), "nope"])
    assert "unknown benchmark(s) ['nope']" in capsys.readouterr().err


def test_run_all_lists_the_real_benchmarks(capsys):
    run_all = load_benchmark("run_all")
    assert run_all.main(["--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"cost", "throughput"} <= set(listed)
    assert "run_all" not in listed and "_common" not in listed


# --------------------------------------------------------------------------- audit_speed.py
def test_audit_speed_quick_times_each_method_in_its_own_process(tmp_path):
    speed = load_benchmark("audit_speed")
    results = speed.main(["--quick", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "audit_speed.quick.json").read_text())
    assert on_disk == json.loads(json.dumps(results)) and on_disk["format"] == speed.FORMAT
    assert set(on_disk["methods"]) == {"paper", "paired"}
    for method, r in on_disk["methods"].items():
        assert r["n_pairs"] == 64 and r["goal_s"] is None and r["goal_met"] is None  # below every goal's size
        for key in ("wall_s", "cpu_s", "peak_rss_mb", "report_bytes"):
            _finite_positive(r[key], f"{method}.{key}")
        assert r["pairs_per_s"] == pytest.approx(64 / r["wall_s"])
        assert r["command"].startswith("anatomy audit --config configs/audit/tiny.yaml")
        assert f"--audit.method={method}" in r["command"]
    tilt = on_disk["tilt_fit"]  # the quick path's small tilt-predictor timing
    assert (tilt["n_pairs"], tilt["n_clusters"], tilt["n_rollouts"]) == (400, 16, speed.TILT_ROLLOUTS)
    assert tilt["goal_s"] is None and tilt["goal_met"] is None  # below the goal's 10,000 pairs
    _finite_positive(tilt["wall_s"], "tilt_fit.wall_s")
    assert "| tilt_fit | 400 | 16 |" in speed.tables(on_disk)


def test_audit_speed_tilt_only_times_the_fit_against_its_goal(tmp_path):
    speed = load_benchmark("audit_speed")
    results = speed.main(["--tilt-only", "--tilt-pairs", "10000", "--tilt-clusters", "6", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "audit_speed.tilt.json").read_text())
    assert on_disk == json.loads(json.dumps(results)) and on_disk["methods"] == {}
    tilt = on_disk["tilt_fit"]
    assert (tilt["n_pairs"], tilt["n_clusters"], tilt["n_folds"]) == (10_000, 6, 5)
    assert tilt["goal_s"] == 60 and tilt["goal_met"] == (tilt["wall_s"] <= 60)
    table = speed.tables(on_disk)
    assert "| tilt_fit | 10000 | 6 |" in table and "| method |" not in table  # no audit measured, no audit table
    with pytest.raises(SystemExit):
        speed.main(["--tilt-only", "--tilt-clusters", "1", "--out", str(tmp_path)])


def test_audit_speed_tilt_sizes_follow_the_smollm2_sae_and_plant_a_preference():
    import numpy as np

    speed = load_benchmark("audit_speed")
    assert speed.smollm2_cluster_count() == 154  # 2,304 features / the size rule's 15 per cluster, rounded up
    chosen, rejected, rollouts = speed.synthetic_pairs(2000, 10, 50, seed=1)
    assert chosen.shape == rejected.shape == (2000, 10) and rollouts.shape == (50, 10)
    assert 0 <= chosen.min() and chosen.max() <= 1 and (chosen == 0).mean() > 0.3  # sparse activities
    from lightning_anatomy.audit.tilt import fit_bradley_terry

    assert np.abs(fit_bradley_terry(chosen - rejected).weights).max() > 0.5  # a preference to fit
    # the audits' table is unchanged for results without tilt_fit (the stored files)
    old = {"methods": {"paper": {"n_pairs": 10, "wall_s": 60.0, "pairs_per_s": 1 / 6, "peak_rss_mb": 100.0,
                                 "goal_met": None, "goal_s": None}}}
    assert speed.tables(old) == speed.common.markdown_table(
        ["method", "pairs", "wall", "pairs/s", "peak RSS", "goal"], [["paper", 10, "1.0 min", "0.17", "100 MB", "–"]])


def test_audit_speed_repeats_a_file_for_timing_and_refuses_bad_sizes(tmp_path):
    speed = load_benchmark("audit_speed")
    src = tmp_path / "rows.jsonl"
    src.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3}\n')
    assert speed.count_rows(src) == 3
    out = speed.repeated_file(src, 7, tmp_path)
    assert out.read_text().splitlines() == ['{"a": 1}', '{"a": 2}', '{"a": 3}'] * 2 + ['{"a": 1}']
    with pytest.raises(SystemExit):
        speed.main(["--pairs", "3", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        speed.main(["--data", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path)])


def test_audit_speed_goal_follows_the_requested_size():
    speed = load_benchmark("audit_speed")
    assert speed.goal_for(None) is None and speed.goal_for(500) is None
    assert speed.goal_for(1156) == 15 * 60  # the whole sample (one row of it is dropped when read)
    assert speed.goal_for(10_000) == 2 * 3600  # 9,991 readable pairs: still the 10k goal
