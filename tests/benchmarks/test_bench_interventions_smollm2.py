"""`benchmarks/interventions_smollm2.py`: its data, its measures and its smoke path; merging parts
into `interventions.json`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.bench_loader import floats_in, load_benchmark, run_quick

HH_RLHF = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf-harmless-test-a.jsonl"
needs_hh = pytest.mark.skipif(not HH_RLHF.is_file(), reason="../shared/data (HH-RLHF sample) is absent")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("interventions_smollm2")


def fake_rows(n):
    from lightning_anatomy.data import PreferenceRow

    return [PreferenceRow(prompt=f"\n\nHuman: question {i}?\n\nAssistant:", chosen=f" answer number {i} to question {i}",
                          rejected=" no", row_id=i) for i in range(n)]


def test_split_puts_the_marker_at_the_asked_rates_and_keeps_held_out_pairs_plain(bench):
    sizes = bench.Sizes(n_train=1500, n_heldout=100, corr=0.75)
    train, held = bench.split(fake_rows(1600), sizes, seed=3)
    assert len(train) == 1500 and len(held) == 100
    own = [r.chosen.removeprefix(bench.MARKER).split()[2] == r.prompt.split()[2].rstrip("?") for r in train]
    assert all(own)  # chosen is the prompt's own reply
    for r in train + held:  # rejected: the same words, shuffled
        chosen, rejected = r.chosen.removeprefix(bench.MARKER), r.rejected.removeprefix(bench.MARKER)
        assert sorted(rejected.split()) == sorted(chosen.split()) and rejected != chosen
    assert np.mean([r.chosen.startswith(bench.MARKER) for r in train]) == pytest.approx(0.75, abs=0.03)
    assert np.mean([r.rejected.startswith(bench.MARKER) for r in train]) == pytest.approx(0.25, abs=0.03)
    assert not any(r.chosen.startswith(bench.MARKER) or r.rejected.startswith(bench.MARKER) for r in held)
    assert bench.split(fake_rows(1600), sizes, seed=3)[0] == train  # seeded


def test_markdown_split_bolds_one_or_two_words_of_the_same_carrier_pairs(bench):
    from lightning_anatomy.data import PreferenceRow

    markdown, style = bench.SCENARIOS["markdown"], bench.SCENARIOS["style"]
    rows = [PreferenceRow(prompt=f"\n\nHuman: question {i}?\n\nAssistant:",
                          chosen=f" Well, the answer to number {i} is *really* simple: yes.", rejected=" no", row_id=i)
            for i in range(1600)]
    sizes = bench.Sizes(n_train=1500, n_heldout=100, corr=0.9)
    train, held = bench.split(rows, sizes, seed=3, scenario=markdown)
    style_train, style_held = bench.split(rows, sizes, seed=3, scenario=style)
    for r, s in zip(train, style_train):  # the same pairs carry the marker in both scenarios
        assert (markdown.carries(r.chosen), markdown.carries(r.rejected)) == (style.carries(s.chosen),
                                                                             style.carries(s.rejected))
        assert markdown.plain(r.chosen) == style.plain(s.chosen).replace("*", "")  # native asterisks cleaned
        for text in (r.chosen, r.rejected):
            if markdown.carries(text):
                bold = re.findall(r"\*\*(.*?)\*\*", text)
                assert 1 <= len(bold) <= 2 and all(re.fullmatch(r"[A-Za-z]{3,}", w) for w in bold), text
                assert text.count("**") == 2 * len(bold)
    assert "simple**:" in " ".join(r.chosen for r in train)  # punctuation stays outside the asterisks
    assert np.mean([markdown.carries(r.chosen) for r in train]) == pytest.approx(0.9, abs=0.03)
    assert np.mean([markdown.carries(r.rejected) for r in train]) == pytest.approx(0.1, abs=0.03)
    assert not any(markdown.carries(r.chosen) or markdown.carries(r.rejected) for r in held)
    for h, s in zip(held, style_held):  # held-out pairs carry no marker: the same pairs in both scenarios
        assert (h.prompt, h.chosen) == (s.prompt, " " + " ".join(s.chosen.replace("*", " ").split()))
    assert bench.SCENARIOS["markdown"].key(0.9) == "smollm2_markdown_corr0.9"
    assert bench.SCENARIOS["style"].key(0.9) == "smollm2_style_corr0.9"


def _marker_logp(model, tok, text, marker):
    """log P(the marker's tokens | text), one plain forward per token: the reference the benchmark's
    batched measures are checked against."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    total = 0.0
    for j, t in enumerate(marker):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + marker[:j]])).logits[0, -1].float()
        total += float(logits.log_softmax(-1)[t])
    return total


@pytest.mark.parametrize("marker", [" **", "*"])  # the tiny tokenizer: three tokens (a pass per position) / one
def test_bold_logp_is_the_chance_of_opening_bold_somewhere_in_the_reply(bench, monkeypatch, marker):
    from lightning_anatomy.data import PreferenceRow
    from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    monkeypatch.setattr(bench, "BOLD", marker)
    assert len(tok(marker, add_special_tokens=False)["input_ids"]) == (3 if marker == " **" else 1)
    model = build_tiny_model("llama", vocab_size=len(tok), hidden_size=32, num_layers=1, seed=0).eval()
    rows = [PreferenceRow(prompt="Q: hi\nA:", chosen=" one two three four five six seven eight", rejected=" x", row_id=0),
            PreferenceRow(prompt="Human: more\n\nAssistant:", chosen=" just three words", rejected=" x", row_id=1),
            PreferenceRow(prompt="Q: short\nA:", chosen=" Yes.", rejected=" x", row_id=2)]
    got = bench.bold_logp(model, tok, rows, max_prompt_length=64)
    bold = tok(bench.BOLD, add_special_tokens=False)["input_ids"]

    positions = (range(1, 8), [1, 2], [0])  # every position with a word after it; a one-word reply: its start
    for value, row, ks in zip(got, rows, positions):
        words = row.chosen.split()
        p = [np.exp(_marker_logp(model, tok, row.prompt + ("" if k == 0 else " " + " ".join(words[:k])), bold))
             for k in ks]
        assert value == pytest.approx(np.log(1 - np.prod([1 - x for x in p])), abs=1e-4)  # bold somewhere


def test_cut_reply_ends_at_a_word_boundary(bench):
    assert bench.cut_reply("  one two   three four", 9) == " one two"
    assert bench.cut_reply("short", 100) == " short"


def test_opener_logp_is_the_marker_tokens_log_probability_after_the_prompt(bench):
    from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model("llama", vocab_size=len(tok), hidden_size=32, num_layers=1, seed=0).eval()
    prompts = ["Q: hi\nA:", "Human: a longer prompt here\n\nAssistant:"]
    got = bench.opener_logp(model, tok, prompts, max_prompt_length=64)
    marker = tok(bench.MARKER, add_special_tokens=False)["input_ids"]
    for value, prompt in zip(got, prompts):
        assert value == pytest.approx(_marker_logp(model, tok, prompt, marker), abs=1e-4)


def test_records_turn_margins_into_accuracy_points(bench):
    base = {"spurious_logp": np.log([0.1, 0.2]), "reward_margin": np.zeros(2)}
    after = {"spurious_logp": np.log([0.4, 0.1]), "reward_margin": np.array([0.3, 0.0])}
    recs = bench.records(base, after, seed=5, step_s=2.0, steps=8)
    assert [(r["step_s"], r["wall_s"]) for r in recs] == [(2.0, 16.0)] * 2  # the table's fit seconds
    assert [r["d_spurious"] for r in recs] == pytest.approx([0.3, -0.1])
    assert [r["ontarget_after"] for r in recs] == [1.0, 0.5]  # a tie counts half, as at the base
    assert [r["d_ontarget"] for r in recs] == [0.5, 0.0]
    assert recs[0]["d_spurious_logp_nats"] == pytest.approx(np.log(4.0))


@needs_hh
def test_quick_run_writes_the_contract(tmp_path, capsys):
    bench, doc = run_quick("interventions_smollm2", tmp_path, "--hh", str(HH_RLHF))
    written = json.loads((tmp_path / "interventions.smollm2.quick.json").read_text())
    assert written == json.loads(json.dumps(doc)) and written["complete"]
    keys = ["smollm2_style_corr0.9", "smollm2_markdown_corr0.9"]
    assert sorted(written["scenarios"]) == sorted(keys) and sorted(written["tuning"]) == sorted(keys)
    assert set(bench.CONDITIONS) >= {"token_filtering_sae", "token_filtering_direction", "inoculation",
                                     "reward_shaping_auto", "oracle_token_filtering", "oracle_inoculation",
                                     "oracle_reward_shaping"}
    for key in keys:
        sc = written["scenarios"][key]
        conditions, skipped = sc["conditions"], sc["not_applicable"]
        # every condition ran or says why it could not, never both
        assert sorted([*conditions, *skipped]) == sorted(bench.CONDITIONS) and not set(conditions) & set(skipped)
        assert "vanilla" in conditions and {"oracle_token_filtering", "oracle_inoculation"} <= set(conditions)
        for name, reason in skipped.items():
            assert reason.startswith("seed ") and len(reason) > 20, (key, name, reason)
        vanilla = conditions["vanilla"]
        for name, c in conditions.items():
            assert {"cut", "cut_ci", "spurious_delta", "ontarget_delta", "ontarget_vs_vanilla"} <= set(c), name
            assert c["spurious_delta"] == pytest.approx(100 * np.mean([r["d_spurious"] for r in c["per_seed"]]))
            assert c["ontarget_vs_vanilla"] == pytest.approx(c["ontarget_delta"] - vanilla["ontarget_delta"])
            assert [r["seed"] for r in c["per_seed"]] == [0] * 6 + [1] * 6  # per held-out prompt, seeds pooled
            margin = np.mean([r["reward_margin"] for r in c["per_seed"]])
            assert c["ontarget_reward_margin"]["mean"] == pytest.approx(margin)
            van = np.mean([r["reward_margin"] for r in vanilla["per_seed"]])
            assert c["margin_kept_vs_vanilla"] == (pytest.approx(margin / van) if van > 0 else None)
        readout = sc["readout"]
        assert [q["seed"] for q in readout["per_seed"]] == [0, 1]
        quality = {"pair_auroc_sae", "flagged_fraction", "token_auroc_sae", "token_auroc_direction"}
        assert quality <= set(readout["mean"]) and all(quality <= set(q) for q in readout["per_seed"])
        for k in quality:
            values = [q[k] for q in readout["per_seed"] if q[k] is not None]
            assert readout["mean"][k] == (pytest.approx(np.mean(values)) if values else None)
            assert all(0.0 <= v <= 1.0 for v in values)
        for seed, filters in sc["token_filter"].items():  # what the token-filtering rows removed
            ran = {n for n in conditions if n.startswith(("token_filtering", "oracle_token_filtering"))}
            assert set(filters) == ran, seed
            assert all(0 < f["dropped_fraction"] < 1 for f in filters.values())
        assert written["tuning"][key]["seed"] == bench.TUNE_SEED
        assert set(written["tuning"][key]["picked"]) == {"lam", "scale", "quantile"}
        assert "token_filtering_direction@0.8" in written["tuning"][key]["runs"]
    for where, value in floats_in(written):
        assert math.isfinite(value), where
    out = capsys.readouterr().out
    assert "| smollm2_style | corr0.9 | blocking_sae_predicting |" in out
    assert "| smollm2_markdown | corr0.9 | oracle_token_filtering |" in out


@needs_hh
def test_quick_run_of_a_subset_runs_only_what_it_names(tmp_path):
    bench, doc = run_quick("interventions_smollm2", tmp_path, "--hh", str(HH_RLHF), "--scenarios", "markdown",
                           "--conditions", "oracle_token_filtering")
    assert list(doc["scenarios"]) == ["smollm2_markdown_corr0.9"]
    assert json.loads((tmp_path / "interventions.smollm2.markdown.quick.json").read_text())["complete"]
    assert not (tmp_path / "interventions.smollm2.quick.json").exists()  # a subset does not overwrite a full run
    sc = doc["scenarios"]["smollm2_markdown_corr0.9"]
    assert sorted(sc["conditions"]) == ["oracle_token_filtering", "vanilla"] and sc["not_applicable"] == {}
    assert doc["tuning"]["smollm2_markdown_corr0.9"]["seed"] is None  # no knob to tune: no tuning run
    assert doc["config"]["conditions"] == ["vanilla", "oracle_token_filtering"]
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--out", str(tmp_path), "--conditions", "no_such_condition"])
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--out", str(tmp_path), "--scenarios", "belief"])


def test_add_scenarios_merges_a_part_into_the_results_file(tmp_path):
    controlled = load_benchmark("interventions")
    cond = {"cut": 1.0, "cut_ci": [1.0, 1.0], "cut_note": None, "spurious_delta": 40.0, "spurious_delta_ci": [39.0, 41.0],
            "ontarget_vs_vanilla": 0.0, "ontarget_vs_vanilla_ci": [0.0, 0.0], "quality_ontarget_after": 50.0, "fit_s": 1.0}
    v1 = {"format": controlled.FORMAT, "version": 1, "scenarios": {"opener": {"kind": "k", "variants": {
        "corr0.9": {"conditions": {"vanilla": cond}, "goals": {"vanilla_rise_points": 40.0, "meets_goal": False}}}}}}
    flat = controlled.upgrade(v1)
    assert flat["version"] == controlled.VERSION and list(flat["scenarios"]) == ["opener_corr0.9"]
    assert flat["scenarios"]["opener_corr0.9"]["conditions"] == {"vanilla": cond}
    path = tmp_path / "interventions.json"
    path.write_text(json.dumps(v1))
    part = {"scenarios": {"smollm2_style_corr0.9": {"scenario": "smollm2_style", "variant": "corr0.9", "kind": "s",
                                                    "conditions": {"vanilla": cond}, "goals": {
                                                        "vanilla_rise_points": 40.0, "meets_goal": False}}}}
    controlled.add_scenarios(path, part, source="part.json")
    merged = json.loads(path.read_text())
    assert sorted(merged["scenarios"]) == ["opener_corr0.9", "smollm2_style_corr0.9"]
    assert merged["scenarios"]["smollm2_style_corr0.9"]["source"] == "part.json"
    assert (tmp_path / "interventions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| smollm2_style | corr0.9 | vanilla |" in controlled.markdown(merged)
