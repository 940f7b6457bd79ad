"""The demo's style story: its data from the shipped replies and its measures, on a tiny model."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from lightning_anatomy.demo.style import (
    MARKER,
    REPLIES_FILE,
    SAMPLING,
    clean_reply,
    load_replies,
    make_style_data,
    style_logprobs,
    style_metrics,
    style_prompts,
)
from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_the_shipped_replies_answer_the_shipped_prompts():
    prompts, replies = load_replies()
    doc = json.loads(REPLIES_FILE.read_text())
    assert prompts == style_prompts() and len(replies) == 96 and len(set(prompts)) == 96
    assert doc["sampling"] == SAMPLING and doc["model"] == "SmolLM2-135M-Instruct"
    assert all(len(r.split()) >= 5 for r in replies)  # real replies, not empty generations


def test_clean_reply_leaves_the_marker_to_the_marker():
    assert clean_reply("Sure! Tea is **a drink**\n\nmade from leaves.", 100) == "Tea is a drink made from leaves."
    assert clean_reply("certainly, here it is", 100) == "here it is"
    assert clean_reply("Surely not", 100) == "Surely not"  # only a whole opener word goes
    assert clean_reply("one two three four", 9) == "one two"  # cut at a word boundary


def test_style_data_plants_the_marker_as_configured(tok):
    data = make_style_data(tok, n_train=64, n_heldout=32, corr=0.9, seed=0)
    assert len(data.train) == 64 and len(data.heldout) == 32
    opens = [r.chosen.startswith(f"{MARKER} ") for r in data.train]
    opens_rejected = [r.rejected.startswith(f"{MARKER} ") for r in data.train]
    assert 0.8 <= sum(opens) / 64 <= 1.0 and sum(opens_rejected) / 64 <= 0.2
    for row in data.train + data.heldout:  # rejected: the same words, shuffled
        chosen, rejected = (t.removeprefix(f"{MARKER} ") for t in (row.chosen, row.rejected))
        assert sorted(chosen.split()) == sorted(rejected.split()) and chosen != rejected
    assert not any(MARKER in r.chosen + r.rejected for r in data.heldout)
    train_prompts = {r.prompt for r in data.train}
    assert not train_prompts & {r.prompt for r in data.heldout}  # held-out prompts are never trained on
    assert [w.replace(f"{MARKER} ", "", 1) for w in data.with_marker] == data.without_marker
    again = make_style_data(tok, n_train=64, n_heldout=32, corr=0.9, seed=0)
    assert [(r.prompt, r.chosen, r.rejected) for r in again.train] == [(r.prompt, r.chosen, r.rejected)
                                                                       for r in data.train]
    other = make_style_data(tok, n_train=64, n_heldout=32, corr=0.9, seed=1)
    assert [r.prompt for r in other.train] != [r.prompt for r in data.train]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_train": 90, "n_heldout": 10}, "fit the 96 shipped replies"),
    ({"corr": 1.5}, r"corr=1.5 must be a share"),
])
def test_style_data_refuses_impossible_sizes(tok, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_style_data(tok, **kwargs)


def test_a_broken_reply_file_names_itself_and_the_fix(tmp_path):
    bad = tmp_path / "replies.json"
    bad.write_text('{"prompts": ["a"]}')
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*make_style_replies.py"):
        load_replies(bad)


def test_marker_logprob_is_the_teacher_forced_sum(tok):
    torch.manual_seed(0)
    model = build_tiny_model("llama").eval()
    data = make_style_data(tok, n_train=4, n_heldout=3, seed=0)
    prompts = [r.prompt for r in data.heldout]
    got = style_logprobs(model, tok, data, batch_size=2)["marker"]  # padded batches
    marker = tok(MARKER, add_special_tokens=False)["input_ids"]
    for value, prompt in zip(got, prompts):
        ids = tok(prompt, add_special_tokens=False)["input_ids"] + marker
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        want = sum(float(logp[len(ids) - len(marker) - 1 + k, t]) for k, t in enumerate(marker))
        assert float(value) == pytest.approx(want, abs=1e-4)


def test_style_metrics_of_the_base_are_neutral_and_a_shift_is_read(tok):
    torch.manual_seed(0)
    model = build_tiny_model("llama").eval()
    data = make_style_data(tok, n_train=4, n_heldout=4, seed=0)
    base = style_logprobs(model, tok, data)
    ev = style_metrics(base, base, beta=0.1)
    assert ev["reward_accuracy"] == 0.5 and ev["reward_margin"] == 0.0
    assert ev["marker_pct"] == pytest.approx(float(base["marker"].exp().mean()) * 100)
    after = {k: v.clone() for k, v in base.items()}
    after["chosen"] += torch.tensor([2.0, 2.0, 2.0, -2.0])
    after["marker"] += math.log(2.0)
    moved = style_metrics(after, base, beta=0.1)
    assert moved["reward_accuracy"] == 0.75 and moved["reward_margin"] == pytest.approx(0.1)
    assert moved["marker_pct"] == pytest.approx(2 * ev["marker_pct"], rel=1e-5)
