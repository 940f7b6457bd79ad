"""Dataset-scale extraction: exact stats, row order, sparse storage, shards, resume, DDP, real data."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from lightning_anatomy.concepts import extraction
from lightning_anatomy.concepts.extraction import ExtractionError, extract_span_features, load_span_features
from lightning_anatomy.concepts.lens import ConceptLens
from lightning_anatomy.concepts.span_features import SPANS, STATS
from lightning_anatomy.concepts.token_firing import pair_span_firing
from lightning_anatomy.data import TokenizedPair
from lightning_anatomy.models.tiny import build_tiny_model

HOOK = "blocks.1.hook_resid_post"
D_SAE = 256
VOCAB = 260
N_PAIRS = 22
BATCH = 4
SHARD = 8  # 2 batches per shard -> 3 shards for 22 pairs
TESTS_DIR = Path(__file__).resolve().parent


def build_lens(sae_seed: int = 1) -> ConceptLens:
    """Tiny GPT-2 (2 layers, width 64) + a random StandardSAE whose negative bias keeps it sparse."""
    model = build_tiny_model("gpt2", vocab_size=VOCAB, hidden_size=64, num_layers=2, seed=0)
    torch.manual_seed(sae_seed)
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=D_SAE))
    with torch.no_grad():
        sae.W_enc.normal_(0.0, 2.0)
        sae.b_enc.fill_(-1.0)
    return ConceptLens(model, saes={HOOK: sae})


def make_pairs(n: int = N_PAIRS, seed: int = 0) -> list[TokenizedPair]:
    """Pairs of varied lengths in no length order; row ids are neither positions nor sorted."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        p, c, r = (int(x) for x in rng.integers([1, 1, 1], [14, 20, 20]))
        ids = [rng.integers(4, VOCAB, k).tolist() for k in (p, c, r)]
        pairs.append(TokenizedPair(row_id=1000 - 7 * i, prompt_ids=ids[0], chosen_ids=ids[1] + [0],
                                   rejected_ids=ids[2] + [0]))
    return pairs


@torch.no_grad()
def brute_force(lens: ConceptLens, pairs: list[TokenizedPair], threshold: float) -> dict[tuple[str, str], np.ndarray]:
    """Each sequence alone (no padding), dense features, stats straight from their definitions."""
    out = {(span, stat): np.zeros((len(pairs), D_SAE), np.float32) for span in SPANS for stat in STATS}
    for i, pair in enumerate(pairs):
        n_p = len(pair.prompt_ids)
        for side, completion in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            ids = torch.tensor([pair.prompt_ids + completion])
            f = lens.encode(ids, torch.ones_like(ids))[HOOK][0].float()
            spans = {side: f[n_p:]} | ({"prompt": f[:n_p]} if side == "chosen" else {})
            for span, x in spans.items():
                out[(span, "max")][i] = x.max(0).values.numpy()
                out[(span, "freq")][i] = (x > threshold).float().mean(0).numpy()
                out[(span, "mean")][i] = x.mean(0).numpy()
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared, oversubscribed 2-core machine two threads made these tiny
    matmuls ~7x slower (spinning), and the DDP workers use one thread each too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lens() -> ConceptLens:
    return build_lens()


@pytest.fixture(scope="module")
def pairs() -> list[TokenizedPair]:
    return make_pairs()


@pytest.fixture(scope="module")
def reference(lens, pairs):
    """An uninterrupted in-memory extraction, the yardstick of the other tests."""
    return extract_span_features(pairs, lens, batch_size=BATCH, shard_size=SHARD, progress=False)


def count_encodes(monkeypatch, lens) -> list[int]:
    """Record the padded length T of every batch the lens encodes."""
    seen: list[int] = []
    real = lens.encode

    def spy(input_ids, attention_mask=None):
        seen.append(int(input_ids.shape[1]))
        return real(input_ids, attention_mask)

    monkeypatch.setattr(lens, "encode", spy)
    return seen


def assert_same_features(a, b) -> None:
    """Bit-identical: same rows, lengths, and CSR arrays of every matrix."""
    np.testing.assert_array_equal(a.row_ids, b.row_ids)
    for span in SPANS:
        np.testing.assert_array_equal(a.lengths[span], b.lengths[span])
    assert a.matrices.keys() == b.matrices.keys()
    for key, m in a.matrices.items():
        o = b.matrices[key]
        for field in ("data", "indices", "indptr"):
            np.testing.assert_array_equal(getattr(m, field), getattr(o, field), err_msg=f"{key} {field}")


# ------------------------------------------------------------------------------------------ exact


def test_stats_match_brute_force_in_pair_order(lens, pairs, reference, monkeypatch):
    feats = reference
    want = brute_force(lens, pairs, threshold=0.0)
    assert feats.n_pairs == N_PAIRS and feats.d_sae == {HOOK: D_SAE} and feats.threshold == 0.0
    np.testing.assert_array_equal(feats.row_ids, [p.row_id for p in pairs])
    np.testing.assert_array_equal(feats.lengths["prompt"], [len(p.prompt_ids) for p in pairs])
    np.testing.assert_array_equal(feats.lengths["chosen"], [len(p.chosen_ids) for p in pairs])
    np.testing.assert_array_equal(feats.lengths["rejected"], [len(p.rejected_ids) for p in pairs])
    for span in SPANS:
        for stat in STATS:
            m = feats.get(HOOK, span, stat)
            assert m.shape == (N_PAIRS, D_SAE) and m.dtype == np.float32
            assert np.all(m.data != 0), "explicit zeros stored"
            np.testing.assert_allclose(feats.dense(HOOK, span, stat), want[(span, stat)], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{span}/{stat}")
    # the features are sparse but not trivially empty, so the comparison means something
    freq = want[("chosen", "freq")]
    assert 0.05 < (freq > 0).mean() < 0.9
    assert feats.get(HOOK, "chosen", "max").nnz == int((want[("chosen", "max")] != 0).sum())

    # processed longest-first, not in pair order (which is not length-sorted)
    seen = count_encodes(monkeypatch, lens)
    extract_span_features(pairs[:9], lens, batch_size=BATCH, progress=False)
    longest = sorted((len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs[:9]), reverse=True)
    assert seen == [longest[0], longest[4], longest[8]]


def test_threshold_and_stats_subset(lens, pairs):
    sub = pairs[:6]
    feats = extract_span_features(sub, lens, batch_size=3, threshold=0.5, stats=("freq", "max"), progress=False)
    want = brute_force(lens, sub, threshold=0.5)
    assert sorted(feats.matrices) == sorted((HOOK, s, t) for s in SPANS for t in ("freq", "max"))
    assert feats.threshold == 0.5 and feats.meta["stats"] == ["freq", "max"]
    for span in SPANS:
        np.testing.assert_allclose(feats.dense(HOOK, span, "freq"), want[(span, "freq")], atol=1e-6)
    # a higher threshold fires less often than 0
    low = brute_force(lens, sub, threshold=0.0)[("chosen", "freq")]
    assert feats.dense(HOOK, "chosen", "freq").sum() < low.sum()
    with pytest.raises(KeyError, match="stat='mean'"):
        feats.get(HOOK, "chosen", "mean")


# ------------------------------------------------------------------------------------- out_dir


def test_out_dir_manifest_shards_and_rerun_skips(lens, pairs, reference, tmp_path, monkeypatch):
    out = tmp_path / "feats"
    feats = extract_span_features(pairs, lens, batch_size=BATCH, shard_size=SHARD, out_dir=out, progress=False)
    assert_same_features(feats, reference)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["n_shards"] == 3
    assert [e["index"] for e in manifest["shards"]] == [0, 1, 2]
    assert [e["rows"] for e in manifest["shards"]] == [[0, 8], [8, 16], [16, 22]]
    assert manifest["settings"]["hooks"] == {HOOK: D_SAE} and manifest["settings"]["stats"] == list(STATS)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [f"shard-0-{k:05d}.safetensors" for k in range(3)]
    for e in manifest["shards"]:
        assert (out / e["file"]).stat().st_size == e["bytes"]
    assert_same_features(load_span_features(out), reference)
    assert load_span_features(out).meta["fingerprint"] == manifest["fingerprint"]

    seen = count_encodes(monkeypatch, lens)
    again = extract_span_features(pairs, lens, batch_size=BATCH, shard_size=SHARD, out_dir=out, progress=False)
    assert seen == [] and again.n_pairs == N_PAIRS

    # a corrupted shard is caught on load
    shard = out / manifest["shards"][1]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ExtractionError, match="does not match its sha256"):
        load_span_features(out)


@pytest.mark.slow
def test_hooks_not_in_name_order_read_back_from_disk(pairs, tmp_path):
    """manifest.json sorts its keys: shards written in the lens's hook order must still be read
    back under the right hook (two SAEs of one width would swap silently)."""
    model = build_tiny_model("gpt2", vocab_size=VOCAB, hidden_size=64, num_layers=2, seed=0)
    saes = {}
    for seed, hook in ((3, HOOK), (4, "blocks.0.hook_resid_post")):  # not in name order
        torch.manual_seed(seed)
        saes[hook] = StandardSAE(StandardSAEConfig(d_in=64, d_sae=D_SAE))
    two = ConceptLens(model, saes=saes)
    in_memory = extract_span_features(pairs, two, batch_size=BATCH, shard_size=SHARD, progress=False,
                                      token_firing=True)
    on_disk = extract_span_features(pairs, two, batch_size=BATCH, shard_size=SHARD, progress=False,
                                    token_firing=True, out_dir=tmp_path / "f")
    assert_same_features(on_disk, in_memory)
    for hook in saes:
        assert (on_disk.token_firing[hook] != in_memory.token_firing[hook]).nnz == 0, hook
    direct = pair_span_firing(two, pairs, pad_token_id=0, batch_size=BATCH)
    for hook in saes:  # same tokens (row order aside): the column counts and co-firing counts agree
        a, b = on_disk.token_firing[hook].astype(np.int64), direct[hook].astype(np.int64)
        assert a.shape == b.shape
        np.testing.assert_array_equal((a.T @ a).toarray(), (b.T @ b).toarray())


def test_token_firing_is_the_separate_pass_from_the_same_forwards(lens, pairs, reference, tmp_path, monkeypatch):
    """token_firing=True: the co-firing corpus of `pair_span_firing` (the same token rows, in
    processing order) from the extraction's own forwards, resumable like the span stats."""
    direct = pair_span_firing(lens, pairs, pad_token_id=0, batch_size=BATCH)[HOOK]
    seen = count_encodes(monkeypatch, lens)
    out = tmp_path / "tf"
    feats = extract_span_features(pairs, lens, batch_size=BATCH, shard_size=SHARD, progress=False, out_dir=out,
                                  token_firing=True)
    assert len(seen) == math.ceil(N_PAIRS / BATCH)  # no second pass
    assert_same_features(feats, reference)  # the span statistics are untouched
    got = feats.token_firing[HOOK]
    assert got.shape == direct.shape and got.dtype == direct.dtype
    # processing order is length-sorted: compare as multisets of token rows
    key = lambda m: sorted(tuple(m.indices[m.indptr[i]:m.indptr[i + 1]]) for i in range(m.shape[0]))  # noqa: E731
    assert key(got) == key(direct)
    assert extraction.recorded_token_firing(out) is True and extraction.recorded_token_firing(tmp_path / "x") is None
    assert feats.subset(np.arange(3)).token_firing is None  # a corpus, not rows: not subset
    # without it: no token firing, the fingerprint of before (a plain extraction is reused as it was)
    plain = extract_span_features(pairs, lens, batch_size=BATCH, shard_size=SHARD, progress=False,
                                  out_dir=tmp_path / "plain")
    assert plain.token_firing is None and extraction.recorded_token_firing(tmp_path / "plain") is False
    assert "token_firing" not in json.loads((tmp_path / "plain" / "manifest.json").read_text())["settings"]
    with pytest.raises(ExtractionError, match="changed: token_firing"):
        extract_span_features(pairs, lens, batch_size=BATCH, shard_size=SHARD, progress=False,
                              out_dir=tmp_path / "plain", token_firing=True)
    with pytest.raises(ExtractionError, match="token_firing must be True or False"):
        extract_span_features(pairs, lens, batch_size=BATCH, token_firing="yes")


def test_token_firing_resumes_after_a_kill(lens, pairs, tmp_path, monkeypatch):
    whole = extract_span_features(pairs, lens, batch_size=BATCH, shard_size=SHARD, progress=False, token_firing=True)
    out = tmp_path / "killed"
    _kill_after(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="simulated kill"):
        extract_span_features(pairs, lens, batch_size=BATCH, shard_size=SHARD, out_dir=out, progress=False,
                              token_firing=True)
    monkeypatch.undo()
    resumed = extract_span_features(pairs, lens, batch_size=BATCH, shard_size=SHARD, out_dir=out, progress=False,
                                    token_firing=True)
    assert (resumed.token_firing[HOOK] != whole.token_firing[HOOK]).nnz == 0


def _kill_after(monkeypatch, n_ok: int) -> list[int]:
    """Let `n_ok` shard writes through, then die mid-write (leaving a temp file, as a kill would)."""
    written: list[int] = []
    real = extraction._write_shard

    def write(path, arrays, metadata):
        if len(written) == n_ok:
            (path.parent / f".{path.name}.killed.tmp").write_bytes(b"partial")
            raise RuntimeError("simulated kill")
        written.append(json.loads(metadata["span_features"])["shard"])
        return real(path, arrays, metadata)

    monkeypatch.setattr(extraction, "_write_shard", write)
    return written


def test_kill_then_resume_is_identical_and_skips_done_shards(lens, pairs, reference, tmp_path, monkeypatch):
    out = tmp_path / "feats"
    kwargs = dict(batch_size=BATCH, shard_size=SHARD, out_dir=out, progress=False)
    written = _kill_after(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="simulated kill"):
        extract_span_features(pairs, lens, **kwargs)
    assert written == [0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False and [e["index"] for e in manifest["shards"]] == [0]
    with pytest.raises(ExtractionError, match=r"incomplete \(1 of 3 shards\).*resume"):
        load_span_features(out)
    first = out / "shard-0-00000.safetensors"
    before = (first.stat().st_mtime_ns, first.read_bytes())

    monkeypatch.undo()
    written = _kill_after(monkeypatch, 99)
    seen = count_encodes(monkeypatch, lens)
    time.sleep(0.01)
    feats = extract_span_features(pairs, lens, **kwargs)
    assert written == [1, 2] and len(seen) == 4  # shards 1 and 2 only: 2 batches each
    assert (first.stat().st_mtime_ns, first.read_bytes()) == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert_same_features(feats, reference)

    # byte-identical shard files to an uninterrupted run
    clean = tmp_path / "clean"
    extract_span_features(pairs, lens, batch_size=BATCH, shard_size=SHARD, out_dir=clean, progress=False)
    for k in range(3):
        name = f"shard-0-{k:05d}.safetensors"
        assert (out / name).read_bytes() == (clean / name).read_bytes()


def test_resume_merges_journals_of_a_killed_multi_rank_run(lens, pairs, reference, tmp_path, monkeypatch):
    """A multi-process run killed before rank 0 merged the journals: shards recorded only in a
    rank's journal are kept, stale journals and unrecorded shard files are dropped."""
    out = tmp_path / "feats"
    extract_span_features(pairs, lens, batch_size=BATCH, shard_size=SHARD, out_dir=out, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    entry1, entry2 = manifest["shards"][1], manifest["shards"][2]
    (out / entry1["file"]).rename(out / "shard-1-00001.safetensors")
    entry1["file"] = "shard-1-00001.safetensors"
    (out / "journal-rank1.json").write_text(json.dumps({"fingerprint": manifest["fingerprint"], "shards": [entry1]}))
    (out / "journal-rank2.json").write_text(json.dumps({"fingerprint": "0" * 64, "shards": [entry2]}))  # stale
    (out / "shard-3-00007.safetensors").write_bytes(b"orphan")
    manifest["shards"], manifest["complete"] = manifest["shards"][:1], False
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / entry2["file"]).unlink()

    written = _kill_after(monkeypatch, 99)
    seen = count_encodes(monkeypatch, lens)
    feats = extract_span_features(pairs, lens, batch_size=BATCH, shard_size=SHARD, out_dir=out, progress=False)
    assert written == [2] and len(seen) == 2  # only shard 2 (2 batches) was redone
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "shard-0-00000.safetensors", "shard-0-00002.safetensors", "shard-1-00001.safetensors"]
    assert_same_features(feats, reference)

    # killed after the last shard was recorded but before `complete` was set: nothing to redo
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    seen.clear()
    feats = extract_span_features(pairs, lens, batch_size=BATCH, shard_size=SHARD, out_dir=out, progress=False)
    assert seen == [] and json.loads((out / "manifest.json").read_text())["complete"] is True
    assert_same_features(feats, reference)


def test_fingerprint_mismatch_and_foreign_dir(lens, pairs, tmp_path):
    out = tmp_path / "feats"
    extract_span_features(pairs[:5], lens, batch_size=BATCH, out_dir=out, progress=False)
    with pytest.raises(ExtractionError, match=r"different fingerprint \(changed: threshold\).*new out_dir.*delete"):
        extract_span_features(pairs[:5], lens, batch_size=BATCH, threshold=0.1, out_dir=out, progress=False)
    with pytest.raises(ExtractionError, match=r"changed: n_pairs, pairs_sha256"):
        extract_span_features(pairs[:6], lens, batch_size=BATCH, out_dir=out, progress=False)
    with pytest.raises(ExtractionError, match=r"changed: sae_digests"):
        extract_span_features(pairs[:5], build_lens(sae_seed=2), batch_size=BATCH, out_dir=out, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(ExtractionError, match=r"not empty \(notes.txt.*no manifest.json"):
        extract_span_features(pairs[:5], lens, out_dir=foreign, progress=False)
    with pytest.raises(ExtractionError, match="has no manifest.json"):
        load_span_features(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("kwargs", "pair_edit", "match"),
    [
        ({"batch_size": 0}, None, "batch_size must be a positive int"),
        ({"shard_size": 0}, None, "shard_size must be a positive int"),
        ({"threshold": float("nan")}, None, "threshold must be a finite number"),
        ({"stats": ("max", "median")}, None, "stats must be distinct names"),
        ({"stats": ("max", "max")}, None, "stats must be distinct names"),
        ({"trainer": object(), "trainer_kwargs": {"devices": 1}}, None, "either trainer or trainer_kwargs"),
        ({}, "dup", r"pairs\[3\] repeats row_id 1000 of pairs\[0\]"),
        ({}, "vocab", r"pairs\[2\] \(row_id 986\) has chosen_ids outside the model vocabulary \[0, 260\)"),
        ({}, "long", r"pairs\[1\] \(row_id 993\) has 600 tokens, more than the model's 512 positions"),
        ({}, "empty", "pairs is empty"),
        ({}, "dict", r"pairs\[1\] is a dict; extraction needs TokenizedPair"),
        ({"pad_token_id": 3.0}, None, "pad_token_id must be an int"),
    ],
)
def test_bad_inputs_raise_before_work(lens, pairs, kwargs, pair_edit, match):
    sub = list(pairs[:4])
    if pair_edit == "dup":
        sub[3] = TokenizedPair(row_id=sub[0].row_id, prompt_ids=[5], chosen_ids=[6], rejected_ids=[7])
    elif pair_edit == "vocab":
        sub[2] = TokenizedPair(row_id=sub[2].row_id, prompt_ids=[5], chosen_ids=[6, VOCAB], rejected_ids=[7])
    elif pair_edit == "long":
        sub[1] = TokenizedPair(row_id=sub[1].row_id, prompt_ids=[5] * 500, chosen_ids=[6] * 100, rejected_ids=[7])
    elif pair_edit == "empty":
        sub = []
    elif pair_edit == "dict":
        sub[1] = {"prompt": "a", "chosen": "b", "rejected": "c"}
    with pytest.raises(ExtractionError, match=match):
        extract_span_features(sub, lens, progress=False, **kwargs)








# ----------------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_hh_rlhf_extracts_and_resumes(hh_rlhf_path, tmp_path, monkeypatch):
    """The whole real file (1,155 readable pairs, max_length 128): killed after 2 shards, resumed, and
    bit-identical to an uninterrupted in-memory run."""
    from lightning_anatomy.data import read_preferences, tokenize_rows
    from lightning_anatomy.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    pairs = tokenize_rows(read_preferences(hh_rlhf_path, on_bad_rows="skip"), tok, max_length=128, max_prompt_length=64)
    assert len(pairs) > 1100
    lens = build_lens()
    kwargs = dict(batch_size=16, shard_size=256, progress=False, pad_token_id=tok.pad_token_id)
    start = time.perf_counter()
    whole = extract_span_features(pairs, lens, **kwargs)
    elapsed = time.perf_counter() - start
    print(f"hh-rlhf: {len(pairs)} pairs in {elapsed:.1f}s = {len(pairs) / elapsed:.0f} pairs/s (1 thread)")

    out = tmp_path / "hh"
    _kill_after(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="simulated kill"):
        extract_span_features(pairs, lens, out_dir=out, **kwargs)
    monkeypatch.undo()
    written = _kill_after(monkeypatch, 99)
    resumed = extract_span_features(pairs, lens, out_dir=out, **kwargs)
    assert written == list(range(2, -(-len(pairs) // 256)))
    assert_same_features(resumed, whole)
    np.testing.assert_array_equal(resumed.row_ids, [p.row_id for p in pairs])
    for span, field in (("prompt", "prompt_ids"), ("chosen", "chosen_ids"), ("rejected", "rejected_ids")):
        np.testing.assert_array_equal(resumed.lengths[span], [len(getattr(p, field)) for p in pairs])
    # a sample of pairs (long and short) equals the brute-force computation
    sample = [0, 1, 500, len(pairs) // 2, len(pairs) - 1]
    want = brute_force(lens, [pairs[i] for i in sample], threshold=0.0)
    for span in SPANS:
        for stat in STATS:
            np.testing.assert_allclose(resumed.dense(HOOK, span, stat)[sample], want[(span, stat)], rtol=1e-5,
                                       atol=1e-6, err_msg=f"{span}/{stat}")
