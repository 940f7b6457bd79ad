"""Smoke test of `benchmarks/spurious.py` (the --quick path at a tiny size) and exact checks of its parts."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from tests.helpers.bench_loader import floats_in, load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("spurious")



TINY = ["--pretrain-steps", "30", "--pretrain-examples", "400", "--sae-tokens", "6000", "--n-pairs", "16",
        "--dpo-steps", "2", "--n-heldout", "6", "--probe-pairs", "4", "--n-concept-texts", "8"]


def test_quick_run_writes_schema_and_finite_numbers(bench, tmp_path, capsys):
    conditions = "proj_ablate_many,source_sae,reward_shaping,steering,filtering,random_control,projection"
    doc = bench.main(["--quick", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--seeds", "2",
                      "--scenarios", "belief", "--conditions", conditions, *TINY])
    written = json.loads((tmp_path / "out" / "spurious.json").read_text())
    assert written == json.loads(json.dumps(doc))
    assert written["format"] == "lightning-anatomy/bench-spurious" and written["quick"] is True
    assert (tmp_path / "out" / "spurious.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(written["scenarios"]) == ["belief"]
    variants = doc["scenarios"]["belief"]["variants"]
    assert list(variants) == ["corr1.0", "corr0.9"]
    assert list(variants["corr1.0"]["conditions"]) == ["vanilla", *conditions.split(",")[:-1]]
    assert list(variants["corr0.9"]["conditions"]) == ["vanilla", "projection", "random_control", "reward_shaping",
                                                       "filtering"]
    variant = written["scenarios"]["belief"]["variants"]["corr1.0"]
    for name, cond in variant["conditions"].items():
        assert [r["seed"] for r in cond["per_seed"]] == [0, 1], name
        for key in ("d_spurious", "d_ontarget", "d_spurious_vs_vanilla", "d_ontarget_vs_vanilla", "wall_s"):
            stat = cond[key]
            assert stat["n"] == 2 and stat["ci"][0] <= stat["mean"] <= stat["ci"][1], (name, key)
        for rec in cond["per_seed"]:
            assert 0 <= rec["spurious_after"] <= 1 and 0 <= rec["ontarget_after"] <= 1
            assert rec["d_spurious"] == pytest.approx(rec["spurious_after"] - rec["spurious_before"])
            assert rec["d_ontarget"] == pytest.approx(rec["ontarget_after"] - rec["ontarget_before"])
            assert rec["wall_s"] > 0
        assert set(cond["ratio_vanilla_over_condition"]) >= {"mean", "ci"}
    vanilla = variant["conditions"]["vanilla"]
    assert vanilla["d_spurious_vs_vanilla"]["mean"] == 0.0
    # the base is measured once per seed: every condition starts from the same numbers
    before = {r["seed"]: r["spurious_before"] for r in vanilla["per_seed"]}
    for cond in variant["conditions"].values():
        assert {r["seed"]: r["spurious_before"] for r in cond["per_seed"]} == before
    # filtering trains on fewer pairs; every other condition on all of them
    assert all(r["n_pairs"] < 16 for r in variant["conditions"]["filtering"]["per_seed"])
    assert all(r["n_pairs"] == 16 for r in vanilla["per_seed"])
    assert set(variant["prediction"]) >= {"features_teacher", "features_rollout", "clusters_teacher"}
    for pred in variant["prediction"].values():
        assert pred["r2"] is None or 0 <= pred["r2"]["mean"] <= 1
    goals = variant["goals"]
    assert set(goals) >= {"vanilla_raises_spurious", "conditions", "any_meets_goal", "random_matches_vanilla",
                          "random_vs_vanilla_ci_contains_0"}
    for name, check in goals["conditions"].items():
        assert check["meets_goal"] == (check["cut_at_least_10x"] and check["ontarget_within_2_points"]), name
        d_on = variant["conditions"][name]["d_ontarget_vs_vanilla"]["mean"]
        assert check["ontarget_within_2_points"] == (abs(d_on) <= 0.02)
    assert written["sae"]["d_sae"] == 256 and 0 < written["sae"]["heldout"]["fve"] <= 1
    for where, value in floats_in(written):
        assert math.isfinite(value), where
    out = capsys.readouterr().out
    assert out.startswith("| scenario | data | condition |") and "| belief | corr0.9 | random_control |" in out

    # the tables and the plot re-render from the JSON alone (sorted keys) in the run's order
    again = bench.main(["--from-json", str(tmp_path / "out" / "spurious.json"), "--out", str(tmp_path / "replot")])
    assert again == written and capsys.readouterr().out == out
    assert (tmp_path / "replot" / "spurious.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not a spurious-benchmark result"):
        (tmp_path / "other.json").write_text(json.dumps({"format": "lightning-anatomy/bench-cost"}))
        bench.main(["--from-json", str(tmp_path / "other.json"), "--out", str(tmp_path / "replot")])

    # the pretrained base is cached: asking again returns it without training
    args, cfg = bench.parse_args(["--quick", *TINY])
    _, report = bench.pretrain_base(cfg, bench.tokenizer(), tmp_path / "cache")
    assert report["pretrain_s"] == written["base"]["pretrain_s"]


def test_answer_distribution_is_exact(bench):
    from lightning_anatomy.models.tiny import build_tiny_model

    tok = bench.tokenizer()
    model = build_tiny_model("gpt2", vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=2, seed=3)
    prompts = ["Q: 2+3=?\nA:", "Q: 9+9=? I think 16.\nA:"]
    probs, mass = bench.answer_distribution(model, tok, prompts, chunk=7)
    cands = bench.candidates()
    assert probs.shape == (2, 44) and torch.allclose(probs.sum(1), torch.ones(2, dtype=probs.dtype))
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    raw = torch.zeros(2, len(cands), dtype=torch.float64)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            for j, (value, opener) in enumerate(cands):
                p = tok(prompt)["input_ids"]
                c = tok(bench.answer_text(value, opener))["input_ids"]
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].double(), -1)
                total = sum(logp[len(p) - 1 + k, t] for k, t in enumerate(c))
                raw[i, j] = total + torch.log1p(-logp[-1, digits].exp().sum())
    assert torch.allclose(probs, torch.softmax(raw, 1), atol=1e-5)
    assert mass == pytest.approx(float(raw.exp().sum(1).mean()), rel=1e-4)


def test_preference_rows_correlation(bench):
    train_q, held_q = bench.split_questions(7, 40)
    assert len(train_q) == 60 and not set(train_q) & set(held_q)
    rows = bench.preference_rows("belief", 1.0, train_q, 50, seed=7)
    for r in rows:  # chosen = the stated belief = the true sum; rejected = a guess
        a, b = (int(x) for x in r.prompt.split("Q: ")[1].split("=")[0].split("+"))
        assert f"I think {a + b}." in r.prompt and r.chosen == f" {a + b}" and r.rejected != r.chosen
        assert (a, b) in train_q
    mixed = bench.preference_rows("belief", 0.9, train_q, 50, seed=7)
    anti = [r for r in mixed if r.rejected == " " + r.prompt.split("I think ")[1].split(".")[0]]
    assert len(anti) == 5  # 10%: the rejected answer is the (wrong) stated belief, the chosen one correct
    assert all(r.chosen != r.rejected for r in anti)
    opener = bench.preference_rows("opener", 0.9, train_q, 50, seed=7)
    assert sum(r.chosen.startswith(" Sure!") for r in opener) == 45
    assert sum(r.rejected.startswith(" Sure!") for r in opener) == 5
    ev = bench.eval_set(held_q, 7)
    assert all(w != t for _, t, w in ev.conflict) and len(ev.control) == 40


def test_bootstrap_statistics(bench):
    stat = bench.common.bootstrap_mean([0.1, 0.3], 2000)
    assert stat["mean"] == pytest.approx(0.2) and 0.1 <= stat["ci"][0] <= stat["ci"][1] <= 0.3
    assert bench.common.bootstrap_mean([0.5], 100) == {"mean": 0.5, "ci": [0.5, 0.5], "n": 1}
    ratio = bench.common.bootstrap_ratio([0.4, 0.6], [0.04, 0.06], 1000)
    assert ratio["mean"] == pytest.approx(10.0) and ratio["ci"][0] <= 10.0 <= ratio["ci"][1]
    eliminated = bench.common.bootstrap_ratio([0.4, 0.6], [-0.01, -0.02], 1000)
    assert eliminated["mean"] is None and eliminated["ci"] == [None, None] and "eliminated" in eliminated["note"]
    assert bench.common.bootstrap_ratio([-0.1, 0.0], [0.1, 0.2], 1000)["mean"] is None


def test_pretraining_mixture_rates(bench):
    rng = random.Random(0)
    n, copy, belief_wrong, opener = 20000, 0, 0, 0
    for _ in range(n):
        prompt, answer = bench.pretraining_example(rng)
        opener += answer.startswith(" Sure!")
        if "I think" in prompt:
            a, b = (int(x) for x in prompt.split("Q: ")[1].split("=")[0].split("+"))
            stated = int(prompt.split("I think ")[1].split(".")[0])
            if stated != a + b:
                belief_wrong += 1
                copy += answer.endswith(f" {stated}")
    assert opener / n == pytest.approx(bench.P_OPENER, abs=0.02)
    assert belief_wrong / n == pytest.approx(bench.P_BELIEF_WRONG, abs=0.02)
    # copied, plus guesses that happen to hit the belief (1 in 18)
    assert copy / belief_wrong == pytest.approx(bench.P_COPY + 0.7 * 0.5 / 18, abs=0.03)


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--scenarios", "belief,sarcasm"], "sarcasm"),
    (["--variants", "corr0.5"], "corr0.5"),
    (["--conditions", "vanilla,magic"], "magic"),
])
def test_bad_options_are_named(bench, argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err
