"""Token filtering: pattern → token masks, measured concepts, the masks in the batch and in DPO's loss."""

from __future__ import annotations

import logging

import pytest
import torch

from lightning_anatomy.concepts import ConceptSet
from lightning_anatomy.data import TokenizedPair, collate_pairs
from lightning_anatomy.data.batch import reference_view, scored_mask
from lightning_anatomy.digests import pairs_digest
from lightning_anatomy.interventions import Quantile, fit_threshold, pattern_token_mask
from lightning_anatomy.interventions.token_filter import measure_token_scores, sae_feature_score, token_spans
from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer
from tests.helpers.concept_callback_helpers import random_sae

HOOK = "blocks.0.hook_resid_post"
TEXTS = ["SURE thing, here it is.", "Sure! SUREly not.", "héllo wörld 😀 SURE"] * 20


@pytest.fixture(scope="module")
def merged():
    """A tokenizer with merges (multi-character tokens), from lightning_anatomy.models.tiny."""
    return build_tiny_tokenizer(TEXTS, vocab_size=300)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def _pieces(tok, ids, mask) -> list[str]:
    return [tok.decode([i]) for i, m in zip(ids, mask) if m]


# --------------------------------------------------------------------------- pattern → tokens


def test_a_pattern_flags_the_tokens_its_match_overlaps(merged):
    ids = _ids(merged, "SURE, here is héllo SUREly ok")
    mask = pattern_token_mask(merged, ids, ["SURE"])
    assert _pieces(merged, ids, mask) == ["SURE", " SUREly"]
    assert mask[-1] is False  # EOS carries no text and is never flagged
    # "word" widens a hit to its whitespace-delimited word: "SURE," takes its comma
    assert _pieces(merged, ids, pattern_token_mask(merged, ids, ["SURE"], unit="word")) == ["SURE", ",", " SUREly"]
    # a regex; a match inside a token flags that token
    assert _pieces(merged, ids, pattern_token_mask(merged, ids, [r"ly\b"])) == [" SUREly"]
    assert not any(pattern_token_mask(merged, ids, ["endoftext"]))


def test_byte_level_pieces_of_one_character_are_flagged_together():
    tok = build_tiny_tokenizer()  # one token per byte: 😀 is 4 tokens
    ids = _ids(tok, "a 😀 b")
    mask = pattern_token_mask(tok, ids, ["😀"])
    assert mask == [False, False, True, True, True, True, False, False, False]
    text, spans = token_spans(tok, ids)
    assert text == "a 😀 b" and spans[2] == spans[5] == (2, 3)
    # the word unit on a per-byte tokenizer: "b" alone, the space before it untouched
    assert pattern_token_mask(tok, ids, ["b"], unit="word") == [False] * 7 + [True, False]


def test_word_unit_spans_every_token_of_a_long_word(merged):
    ids = _ids(merged, "xx SURElyyyqq zz")
    word = pattern_token_mask(merged, ids, ["SURE"], unit="word")
    assert "".join(_pieces(merged, ids, word)) == " SURElyyyqq"
    assert "".join(_pieces(merged, ids, pattern_token_mask(merged, ids, ["SURE"]))) != " SURElyyyqq"


def test_thresholds_fit_and_quantiles():
    scores = [0.1, 0.2, 0.9, 0.8, 0.3, 0.95]
    labels = [0, 0, 1, 1, 0, 1]
    t = fit_threshold(scores, labels)
    assert 0.3 < t < 0.8
    assert fit_threshold([0.1, 0.5, 0.6], [0, 1, 0]) == pytest.approx(0.3)  # best F1 (2/3) at the highest cut
    with pytest.raises(ValueError, match="no token is labelled True"):
        fit_threshold([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match=r"q must be a number in \(0, 1\)"):
        Quantile(1.5)


# --------------------------------------------------------------------------- the callback's masks


def _pairs(tok) -> list[TokenizedPair]:
    prompt = tok("Q:", add_special_tokens=False)["input_ids"]
    texts = [("SURE, here it is", "no"), ("fine", "SURE thing"), ("ok then", "nope")]
    return [TokenizedPair(i, prompt, _ids(tok, c), _ids(tok, r)) for i, (c, r) in enumerate(texts)]


def test_pattern_masks_per_side_and_the_report(merged, caplog):
    from lightning_anatomy import TokenFiltering

    pairs = _pairs(merged)
    both = TokenFiltering(patterns=["SURE"]).compute_masks(pairs, merged, None)
    assert _pieces(merged, pairs[0].chosen_ids, [not k for k in both[0][0]]) == ["SURE"]
    assert _pieces(merged, pairs[1].rejected_ids, [not k for k in both[1][1]]) == ["SURE"]
    assert all(both[2][0]) and all(both[2][1])
    chosen = TokenFiltering(patterns=["SURE"], sides="chosen")
    masks = chosen.compute_masks(pairs, merged, None)
    assert all(masks[1][1]) and not all(masks[0][0])
    assert chosen.report["dropped_tokens"] == 1 and chosen.report["emptied_pairs"] == []
    with caplog.at_level(logging.WARNING):
        TokenFiltering(patterns=["SURE", "NEVER"]).compute_masks(pairs, merged, None)
    assert "'NEVER' flags no completion token of the 3 pairs (0 % dropped)" in caplog.text


def test_bad_input_is_refused_before_training(merged, caplog):
    from lightning_anatomy import TokenFiltering

    with pytest.raises(ValueError, match=r"pattern '\(SURE' is not a valid regular expression"):
        TokenFiltering(patterns=["(SURE"])
    with pytest.raises(ValueError, match="pass patterns="):
        TokenFiltering()
    with pytest.raises(ValueError, match="unit='sentence'"):
        TokenFiltering(patterns=["x"], unit="sentence")
    with pytest.raises(ValueError, match="needs a threshold"):
        TokenFiltering(concepts=ConceptSet.from_vectors(torch.randn(1, 64), HOOK))
    with pytest.raises(ValueError, match="saes= has no SAE there"):
        TokenFiltering(concepts={"f": (HOOK, 3)})
    pairs = _pairs(merged)
    everything = lambda row_id, side, ids: [1.0] * len(ids)  # noqa: E731
    with pytest.raises(ValueError, match="removes every token of a completion in all 3 pairs"):
        TokenFiltering(concepts=everything).compute_masks(pairs, merged, None)
    one_pair = lambda row_id, side, ids: [float(row_id == 0)] * len(ids)  # noqa: E731
    with caplog.at_level(logging.WARNING):
        f = TokenFiltering(concepts={"first": one_pair})
        f.compute_masks(pairs, merged, None)
    assert f.report["emptied_pairs"] == [0] and "1 of 3 pairs lose every token" in caplog.text
    bad_length = lambda row_id, side, ids: [0.0]  # noqa: E731
    with pytest.raises(ValueError, match="return one finite score per token"):
        TokenFiltering(concepts=bad_length).compute_masks(pairs, merged, None)


def test_measured_concepts_flag_tokens_above_their_threshold(merged):
    from lightning_anatomy import TokenFiltering

    model = build_tiny_model("gpt2", num_layers=2, vocab_size=len(merged))
    pairs = _pairs(merged)
    sae = random_sae()
    scores = measure_token_scores(model, pairs, {"f": sae_feature_score(sae, HOOK, 5)}, pad_token_id=0)
    assert [len(scores["f"][p.row_id][0]) for p in pairs] == [len(p.chosen_ids) for p in pairs]
    values = sorted(v for c, r in scores["f"].values() for v in c + r)
    cut = values[len(values) // 2]
    masks = TokenFiltering(concepts={"f": (HOOK, 5)}, saes={HOOK: sae}, threshold=cut).compute_masks(
        pairs, merged, model)
    for p in pairs:
        assert list(masks[p.row_id][0]) == [not v > cut for v in scores["f"][p.row_id][0]]
    quant = TokenFiltering(concepts={"f": (HOOK, 5)}, saes={HOOK: sae}, threshold=Quantile(0.75))
    quant.compute_masks(pairs, merged, model)
    assert 0.15 < quant.report["dropped_fraction"] < 0.35

    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    concepts = ConceptSet.from_vectors(v[None], HOOK, names=["style"])
    direction = TokenFiltering(concepts=concepts, threshold={"style": Quantile(0.8)}, unit="word")
    masks = direction.compute_masks(pairs, merged, model)
    assert set(direction.concept_drops) == {"style"} and sum(direction.concept_drops["style"].values()) > 0


# --------------------------------------------------------------------------- masks in the batch


def test_collate_adds_the_loss_mask_only_when_pairs_carry_masks(merged):
    pairs = _pairs(merged)
    plain = collate_pairs(pairs, 0)
    assert "loss_mask" not in plain and scored_mask(plain) is plain["completion_mask"]
    keep = [(tuple(i != 0 for i in range(len(p.chosen_ids))), None) for p in pairs]
    masked = [TokenizedPair(p.row_id, p.prompt_ids, p.chosen_ids, p.rejected_ids, chosen_keep=k[0]) for p, k in
              zip(pairs, keep)]
    batch = collate_pairs(masked, 0)
    first = batch["completion_mask"].long().argmax(-1)
    n = len(pairs)
    assert torch.equal(batch["loss_mask"][n:], batch["completion_mask"][n:])  # rejected sides untouched
    for i in range(n):
        assert not batch["loss_mask"][i, first[i]] and batch["completion_mask"][i, first[i]]
    assert int((batch["completion_mask"] & ~batch["loss_mask"]).sum()) == n
    assert pairs_digest(masked) != pairs_digest(pairs)
    # a reference prompt moves the same mask to the reference's positions
    longer = [TokenizedPair(p.row_id, p.prompt_ids + [5, 6], p.chosen_ids, p.rejected_ids, chosen_keep=p.chosen_keep,
                            ref_prompt_ids=p.prompt_ids) for p in masked]
    view = reference_view(collate_pairs(longer, 0))
    assert torch.equal(view["loss_mask"], batch["loss_mask"]) and torch.equal(view["input_ids"], batch["input_ids"])
    with pytest.raises(ValueError, match="token-filter mask has 1 entries"):
        collate_pairs([TokenizedPair(0, [1], [2, 3], [4], chosen_keep=(True,))], 0)


# --------------------------------------------------------------------------- in a Trainer


def _sure_rows(n: int = 8) -> list[dict[str, str]]:
    return [{"prompt": f"Question {i}: say hi.\n", "chosen": ("SURE! " if i % 2 == 0 else "") + f"hi number {i}",
             "rejected": f"hello {i}" + (" SURE" if i % 4 == 1 else "")} for i in range(n)]


def test_token_filtering_in_a_two_step_fit_logs_the_dropped_fraction():
    import lightning as L

    from lightning_anatomy import DPOModule, PreferenceDataModule, TokenFiltering
    from tests.helpers.intervention_helpers import MemoryLogger

    dm = PreferenceDataModule(_sure_rows(), "tiny:gpt2", batch_size=4, val_fraction=0.0, shuffle=False)
    logger = MemoryLogger()
    filtering = TokenFiltering(patterns=["SURE"])
    trainer = L.Trainer(callbacks=[filtering], max_steps=2, accelerator="cpu", devices=1, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1)
    trainer.fit(DPOModule("tiny:gpt2", lr=1e-4), datamodule=dm)
    series = [v for _, v in logger.series("concepts/token_filter/dropped_fraction")]
    assert len(series) == 2
    for step, batch_pairs in enumerate((dm.train_pairs[:4], dm.train_pairs[4:8])):
        batch = collate_pairs(batch_pairs, dm.pad_token_id)
        dropped = int((batch["completion_mask"] & ~batch["loss_mask"]).sum())
        assert dropped == sum(4 for p in batch_pairs for k in (p.chosen_keep, p.rejected_keep) if not all(k))
        assert series[step] == pytest.approx(dropped / int(batch["completion_mask"].sum()))
    assert series[0] > 0
    per_concept = [v for _, v in logger.series("concepts/token_filter/dropped_fraction/SURE")]
    assert per_concept == pytest.approx(series)
    # the DataModule's pairs carry the masks; "SURE" is 4 byte tokens wherever it appears
    assert filtering.report["dropped_tokens"] == 4 * (4 + 2)
    assert all(p.chosen_keep is not None for p in dm.train_pairs)
    assert filtering.state_dict()["masks"][0][0][:4] == [False] * 4


# --------------------------------------------------------------------------- the masks in DPO's loss


def _module_pairs() -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(0)

    def ids(k: int) -> list[int]:
        return torch.randint(4, 260, (k,), generator=g).tolist()

    return [TokenizedPair(i, ids(3 + i), ids(5) + [0], ids(4 + i) + [0]) for i in range(3)]


def _keep(pairs, drop: dict[tuple[int, str], list[int]]) -> list[TokenizedPair]:
    """Pairs with keep masks: `drop[(row, side)]` lists completion positions to leave out."""
    out = []
    for p in pairs:
        keeps = {s: tuple(k not in drop.get((p.row_id, s), []) for k in range(len(getattr(p, f"{s}_ids"))))
                 for s in ("chosen", "rejected")}
        out.append(TokenizedPair(p.row_id, p.prompt_ids, p.chosen_ids, p.rejected_ids,
                                 chosen_keep=keeps["chosen"], rejected_keep=keeps["rejected"]))
    return out


def _module(chunk: int | None, reference: str = "copy"):
    from lightning_anatomy import DPOModule

    torch.manual_seed(0)
    module = DPOModule(build_tiny_model("gpt2", num_layers=2), reference=reference, logps_chunk_size=chunk,
                       reference_cache_dir=None)
    with torch.no_grad():  # the policy moves away from the reference, so the loss has gradients
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def _loss_and_grads(module, batch):
    module.zero_grad()
    loss, _ = module.compute_loss(batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.policy.parameters() if p.grad is not None]


@pytest.mark.parametrize("chunk", [None, 512, 2])
def test_with_nothing_filtered_the_loss_is_vanilla_exactly(chunk):
    module = _module(chunk)
    pairs = _module_pairs()
    vanilla = collate_pairs(pairs, 0)
    all_kept = collate_pairs(_keep(pairs, {}), 0)
    assert "loss_mask" in all_kept
    loss_v, grads_v = _loss_and_grads(module, vanilla)
    loss_k, grads_k = _loss_and_grads(module, all_kept)
    assert torch.equal(loss_v, loss_k)
    assert all(torch.equal(a, b) for a, b in zip(grads_v, grads_k))


@pytest.mark.parametrize("chunk", [None, 512, 2])
def test_a_filtered_token_changes_neither_the_loss_nor_any_gradient(chunk):
    module = _module(chunk)
    pairs = _module_pairs()
    last = len(pairs[0].chosen_ids) - 1
    drop = {(0, "chosen"): [1, last], (2, "rejected"): [0]}
    batch = collate_pairs(_keep(pairs, drop), 0)
    loss, grads = _loss_and_grads(module, batch)
    # replace the filtered last token of pair 0's chosen completion: only its own log-prob could change
    changed = [TokenizedPair(p.row_id, p.prompt_ids, p.chosen_ids[:-1] + [77] if p.row_id == 0 else p.chosen_ids,
                             p.rejected_ids) for p in pairs]
    loss2, grads2 = _loss_and_grads(module, collate_pairs(_keep(changed, drop), 0))
    assert torch.equal(loss, loss2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    # ... while unfiltered, the same replacement changes the loss
    assert not torch.equal(_loss_and_grads(module, collate_pairs(pairs, 0))[0],
                           _loss_and_grads(module, collate_pairs(changed, 0))[0])
    # the policy's log-probs are the kept tokens' only (a hand computation from the full logits)
    with torch.no_grad():
        logits = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        token = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        want = (token * batch["loss_mask"][:, 1:]).sum(-1)
        got = module.concatenated_forward(module.policy, batch)
    assert torch.allclose(torch.cat([got["chosen_logps"], got["rejected_logps"]]), want, atol=1e-5)
    assert got["chosen_lengths"].tolist() == [len(pairs[0].chosen_ids) - 2, *[len(p.chosen_ids) for p in pairs[1:]]]


def test_a_filtered_tokens_logit_gets_no_gradient():
    module = _module(None)  # the full-logits path: every position's logits exist to perturb
    pairs = _module_pairs()
    batch = collate_pairs(_keep(pairs, {(0, "chosen"): [2]}), 0)
    scoring = len(pairs[0].prompt_ids) + 2 - 1  # the logits at t-1 score token t
    delta = torch.zeros(batch["input_ids"].shape[0], batch["input_ids"].shape[1], 260, requires_grad=True)
    head = module.policy.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _a, out: out + delta)
    try:
        loss, _ = module.compute_loss(batch)
        loss.backward()
    finally:
        handle.remove()
    assert torch.count_nonzero(delta.grad[0, scoring]) == 0
    assert torch.count_nonzero(delta.grad[0, scoring - 1]) > 0 and torch.count_nonzero(delta.grad[0, scoring + 1]) > 0


@pytest.mark.parametrize("reference", ["copy", "precomputed"])
def test_the_reference_drops_the_same_tokens(reference):
    module = _module(512, reference)
    pairs = _keep(_module_pairs(), {(1, "chosen"): [0, 3]})
    batch = collate_pairs(pairs, 0)
    if reference == "precomputed":
        module.precompute_reference(pairs, pad_token_id=0)
    scorer = module.reference if reference == "copy" else module.policy  # precomputed: the policy at that time
    with torch.no_grad():
        want = module.concatenated_forward(scorer, batch)
        unfiltered = module.concatenated_forward(scorer, collate_pairs(_module_pairs(), 0))
    got = module.reference_logps(batch)
    assert torch.allclose(got[0], want["chosen_logps"], atol=1e-6)
    assert torch.allclose(got[1], want["rejected_logps"], atol=1e-6)
    assert not torch.allclose(got[0][1], unfiltered["chosen_logps"][1])
    assert torch.allclose(got[0][0], unfiltered["chosen_logps"][0], atol=1e-6)


def test_a_precomputed_reference_table_is_computed_on_the_masks(tmp_path):
    import copy

    from lightning_anatomy import DPOModule, PreferenceDataModule, TokenFiltering
    from tests.helpers.intervention_helpers import trainer

    dm = PreferenceDataModule(_sure_rows(), "tiny:gpt2", batch_size=4, val_fraction=0.0, shuffle=False)
    module = DPOModule("tiny:gpt2", reference="precomputed", reference_cache_dir=str(tmp_path), lr=1e-3)
    initial = copy.deepcopy(module.policy)
    trainer([TokenFiltering(patterns=["SURE"])], max_steps=1).fit(module, datamodule=dm)
    batch = collate_pairs(dm.train_pairs, dm.pad_token_id)
    assert "loss_mask" in batch
    with torch.no_grad():
        want = module.concatenated_forward(initial, batch)
        unmasked = module.concatenated_forward(initial, {k: v for k, v in batch.items() if k != "loss_mask"})
    table = module.reference_table
    for i, p in enumerate(dm.train_pairs):
        assert table[p.row_id][0] == pytest.approx(float(want["chosen_logps"][i]), abs=1e-5)
        assert table[p.row_id][1] == pytest.approx(float(want["rejected_logps"][i]), abs=1e-5)
    assert table[0][0] != pytest.approx(float(unmasked["chosen_logps"][0]), abs=1e-3)  # row 0's chosen has SURE


# --------------------------------------------------------------------------- the mask cache


CACHE_ROWS = 16


def _dm(rows: list[dict[str, str]] | None = None):
    from lightning_anatomy import PreferenceDataModule

    dm = PreferenceDataModule(rows or _sure_rows(CACHE_ROWS), "tiny:gpt2", batch_size=4, val_fraction=0.0,
                              shuffle=False)
    dm.setup("fit")
    return dm


def _filter(cache, **overrides):
    """Patterns and a measured SAE feature (so the model's weights are part of the cache key)."""
    from lightning_anatomy import TokenFiltering

    opts = {"patterns": ["SURE"], "concepts": {"f": (HOOK, 5)}, "saes": {HOOK: random_sae(seed=2)},
            "threshold": {"f": Quantile(0.9)}, "cache_dir": None if cache is None else str(cache)}
    return TokenFiltering(**{**opts, **overrides})


class _Trainer:
    """What on_fit_start reads of a Trainer: a one-process strategy, the DataModule, no checkpoint."""

    def __init__(self, dm) -> None:
        from lightning.pytorch.strategies import SingleDeviceStrategy

        self.datamodule, self.ckpt_path, self.model = dm, None, None
        self.strategy = SingleDeviceStrategy(device=torch.device("cpu"))


def _oracle(row_id: int, side: str, ids: list[int]) -> list[float]:
    return [1.0 if k == 1 else 0.0 for k in range(len(ids))]


def _other_oracle(row_id: int, side: str, ids: list[int]) -> list[float]:
    return [1.0 if k == 1 else 0.0 for k in range(len(ids))]


def test_masks_are_cached_and_a_hit_skips_the_measurement_pass(tmp_path, monkeypatch):
    import lightning_anatomy.callbacks.token_filtering as tf
    from lightning_anatomy import DPOModule
    from tests.helpers.intervention_helpers import trainer

    cache = tmp_path / "masks"
    dm, first = _dm(), _filter(cache)
    trainer([first], max_steps=1).fit(DPOModule("tiny:gpt2", lr=1e-3), datamodule=dm)
    files = list(cache.iterdir())
    assert [f.name[:12] for f in files] == ["token-masks-"] and files[0].suffix == ".json"  # no temp left
    assert first.report["per_concept"]["f"] > 0 and first.report["per_concept"]["SURE"] > 0

    def refuse(*args, **kwargs):
        raise AssertionError("the measurement pass ran")

    real_measure, real_hits = tf.measure_token_scores, tf.pattern_hits
    monkeypatch.setattr(tf, "measure_token_scores", refuse)
    monkeypatch.setattr(tf, "pattern_hits", refuse)
    dm2, again = _dm(), _filter(cache)
    trainer([again], max_steps=1).fit(DPOModule("tiny:gpt2", lr=1e-3), datamodule=dm2)
    assert again.masks == first.masks and again.concept_drops == first.concept_drops
    assert again.report == first.report
    assert [(p.chosen_keep, p.rejected_keep) for p in dm2.train_pairs] == \
        [(p.chosen_keep, p.rejected_keep) for p in dm.train_pairs]

    # every setting the masks depend on is in the key: a change misses (measures, writes a new file)
    calls: list[int] = []
    monkeypatch.setattr(tf, "measure_token_scores", lambda *a, **k: calls.append(1) or real_measure(*a, **k))
    monkeypatch.setattr(tf, "pattern_hits", real_hits)
    module = DPOModule("tiny:gpt2")
    _filter(cache).on_fit_start(_Trainer(_dm()), module)
    assert calls == []  # the same settings: a hit
    perturbed = DPOModule("tiny:gpt2")
    with torch.no_grad():
        next(perturbed.policy.parameters()).add_(0.01)
    other_rows = _sure_rows(CACHE_ROWS)
    other_rows[3] = {**other_rows[3], "chosen": "SURE hi there"}
    changes = [({"threshold": {"f": Quantile(0.8)}}, module, None), ({"patterns": ["hi"]}, module, None),
               ({"unit": "word"}, module, None), ({"sides": "chosen"}, module, None),
               ({"concepts": {"f": (HOOK, 6)}}, module, None), ({"saes": {HOOK: random_sae(seed=3)}}, module, None),
               ({}, perturbed, None), ({}, module, other_rows)]
    for overrides, model, rows in changes:
        before = len(calls)
        _filter(cache, **overrides).on_fit_start(_Trainer(_dm(rows)), model)
        assert len(calls) == before + 1, overrides
    assert len(list(cache.iterdir())) == 1 + len(changes)

    # patterns and callables need no model: its weights are not part of their key
    oracle_calls: list[int] = []

    def counted(name):
        fn = {"_oracle": _oracle, "_other_oracle": _other_oracle}[name]

        def wrapped(*args):
            oracle_calls.append(1)
            return fn(*args)
        wrapped.__qualname__, wrapped.__module__ = fn.__qualname__, fn.__module__
        return wrapped

    def model_free(name="_oracle"):
        return _filter(cache, concepts={"gt": counted(name)}, saes=None, threshold=0.5)

    model_free().on_fit_start(_Trainer(_dm()), module)
    assert len(oracle_calls) == 2 * CACHE_ROWS  # once per completion
    model_free().on_fit_start(_Trainer(_dm()), perturbed)
    assert len(oracle_calls) == 2 * CACHE_ROWS  # a hit with other weights
    model_free("_other_oracle").on_fit_start(_Trainer(_dm()), module)
    assert len(oracle_calls) == 4 * CACHE_ROWS  # another callable (by qualified name): a miss


def test_a_file_that_is_not_a_token_mask_cache_is_refused_naming_it(tmp_path):
    import json

    from lightning_anatomy import DPOModule
    from lightning_anatomy.interventions.reward_shaping import save_scores

    cache, module = tmp_path / "masks", DPOModule("tiny:gpt2")
    _filter(cache).on_fit_start(_Trainer(_dm()), module)
    (path,) = cache.iterdir()
    for content in (lambda: save_scores({0: 1.0}, path), lambda: path.write_text("not json"),
                    lambda: path.write_text(json.dumps([1, 2]))):
        content()
        with pytest.raises(ValueError, match="is not a token-mask cache file") as err:
            _filter(cache).on_fit_start(_Trainer(_dm()), module)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    doc = {"format": "lightning-anatomy/token-masks", "masks": {"0": ["1", "1"]}, "concept_drops": {"f": {}}}
    path.write_text(json.dumps(doc))  # the right kind of file, for other data
    with pytest.raises(ValueError, match="does not fit this data") as err:
        _filter(cache).on_fit_start(_Trainer(_dm()), module)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------- resume


ORACLE_ON = {"on": True}  # switched off in resumed runs: re-measuring would change the masks


def _switchable(row_id: int, side: str, ids: list[int]) -> list[float]:
    return [1.0 if ORACLE_ON["on"] and k == 2 else 0.0 for k in range(len(ids))]


def _resume_run(root, epochs: int, *, cache=None, ckpt_path=None, late: bool = False, **overrides):
    """Fit 8 rows in batches of 4 (2 steps an epoch) under patterns, an SAE feature and a callable."""
    import lightning as L

    from lightning_anatomy import DPOModule
    from tests.helpers.intervention_helpers import MemoryLogger
    from tests.helpers.resume_helpers import RestoresAfterSetup

    L.seed_everything(0, verbose=False)
    dm = _dm(_sure_rows(8))
    cb = _filter(cache, concepts={"f": (HOOK, 5), "gt": _switchable}, threshold={"f": Quantile(0.9), "gt": 0.5},
                 **overrides)
    logger = MemoryLogger()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=-1, max_epochs=epochs, logger=logger,
                        log_every_n_steps=1, callbacks=[cb], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root),
                        **({"strategy": RestoresAfterSetup(device=torch.device("cpu"))} if late else {}))
    # a constant lr: a schedule's length would differ between the 1- and the 2-epoch run
    trainer.fit(DPOModule("tiny:gpt2", lr=1e-3, scheduler="constant", reference_cache_dir=None), datamodule=dm,
                ckpt_path=ckpt_path)
    return cb, dict(logger.series("train/loss")), trainer, dm


@pytest.mark.parametrize("late", [False, True], ids=["restores-before-fit-start", "restores-after-fit-start"])
def test_a_resumed_run_takes_the_checkpoints_masks_and_never_measures_its_trained_model(tmp_path, monkeypatch, late):
    import lightning_anatomy.callbacks.token_filtering as tf

    ORACLE_ON["on"] = True
    full, full_losses, _, _ = _resume_run(tmp_path, 2)
    first, _, first_trainer, _ = _resume_run(tmp_path, 1)
    ckpt = tmp_path / "half.ckpt"
    first_trainer.save_checkpoint(ckpt)  # at an epoch end: the resumed run starts epoch 1 with its first batch
    assert first.masks == full.masks and full.report["per_concept"]["gt"] > 0

    measured: list[str] = []
    real = tf.measure_token_scores
    monkeypatch.setattr(tf, "measure_token_scores", lambda *a, **k: measured.append("model") or real(*a, **k))
    ORACLE_ON["on"] = False  # what a measurement now would give: none of the callable's tokens
    try:
        resumed, losses, _, dm = _resume_run(tmp_path, 2, ckpt_path=str(ckpt), late=late)
        # late: on_fit_start measured the freshly built (initial) weights; the checkpoint's masks replaced them
        assert measured == (["model"] if late else [])
        assert resumed.masks == full.masks and resumed.concept_drops == full.concept_drops
        assert resumed.report == full.report
        assert {p.row_id: (p.chosen_keep, p.rejected_keep) for p in dm.pairs} == full.masks
        assert losses == {2: full_losses[2], 3: full_losses[3]}  # exact in fp32 on CPU
    finally:
        ORACLE_ON["on"] = True

    # with a cache (written by a run from the same initial weights), the late order measures nothing either
    if late:
        cache = tmp_path / "masks"
        _resume_run(tmp_path, 1, cache=cache)
        measured.clear()
        _, cached_losses, _, _ = _resume_run(tmp_path, 2, cache=cache, ckpt_path=str(ckpt), late=True)
        assert measured == [] and cached_losses == losses
    else:  # a checkpoint without this filter's masks: its trained model would be measured, so refuse
        with pytest.raises(ValueError, match="holds no masks for this filter"):
            _resume_run(tmp_path, 2, ckpt_path=str(ckpt), sides="chosen")
