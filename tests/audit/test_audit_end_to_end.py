"""`audit_dataset` through the real pieces: rows -> tokens -> tiny GPT-2 + random SAE -> audit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from lightning_anatomy.audit import AuditResult, audit_dataset
from lightning_anatomy.audit.report import SCRIPT_TAG
from lightning_anatomy.concepts.concept_set import ConceptSet
from lightning_anatomy.concepts.lens import ConceptLens
from lightning_anatomy.data.rows import PreferenceRow, read_preferences
from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer

HOOK = "blocks.0.hook_resid_post"  # layer 0 of 2: the lens stops the forward there
MARKER = " @@@@"
WORDS = ("the", "a", "cat", "dog", "runs", "blue", "sky", "water", "tree", "house", "green", "small", "and")


def build_lens(vocab_size: int) -> ConceptLens:
    model = build_tiny_model("gpt2", vocab_size=vocab_size, hidden_size=64, num_layers=2, seed=0)
    torch.manual_seed(1)
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=256))
    with torch.no_grad():  # a random SAE made sparse by a negative bias
        sae.W_enc.normal_(0.0, 2.0)
        sae.b_enc.fill_(-1.0)
    return ConceptLens(model, saes={HOOK: sae})


def planted_rows(n: int = 120, seed: int = 0) -> list[PreferenceRow]:
    """Random word salad on both sides; 70% of chosen responses end with the marker."""
    rng = np.random.default_rng(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS, k))

    rows = []
    for i in range(n):
        chosen = " " + words(int(rng.integers(4, 10)))
        if rng.random() < 0.7:
            chosen += MARKER
        rows.append(PreferenceRow(f"Tell me about {words(3)}?\n", chosen, " " + words(int(rng.integers(4, 10))), i))
    return rows


@torch.no_grad()
def marker_features(lens: ConceptLens, tokenizer, rows: list[PreferenceRow]) -> set[int]:
    """Features whose mean activation on marker tokens beats their max anywhere else (ground truth)."""
    encoded = [tokenizer(row.prompt + side)["input_ids"] for row in rows[:40] for side in (row.chosen, row.rejected)]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    real = torch.zeros((len(encoded), width), dtype=torch.bool)
    for i, e in enumerate(encoded):  # right padding: every real position is exact under causal attention
        ids[i, : len(e)] = torch.tensor(e)
        real[i, : len(e)] = True
    f = lens.encode(ids, real.long())[HOOK]
    is_marker = (ids == tokenizer.convert_tokens_to_ids("@")) & real
    elsewhere = f.masked_fill(~(real & ~is_marker)[..., None], float("-inf")).amax(dim=(0, 1))
    at_marker = f.masked_fill(~is_marker[..., None], float("-inf")).amax(dim=1)  # [n, d_sae] per sequence
    has_marker = is_marker.any(dim=1)
    return set(torch.nonzero(at_marker[has_marker].mean(0) > elsewhere).flatten().tolist())


@pytest.mark.slow
def test_planted_marker_through_the_model(tmp_path):
    tokenizer = build_tiny_tokenizer()
    lens = build_lens(vocab_size=260)
    rows = planted_rows()
    result = audit_dataset(rows, lens, tokenizer, max_length=64, batch_size=16, n_bootstrap=200, progress=False,
                           out_dir=tmp_path / "shards", n_data_clusters=2, min_cluster_pairs=20)
    truth = marker_features(lens, tokenizer, rows)
    assert truth, "the random SAE should have at least one marker-specific feature"
    top = result.concepts.iloc[0]
    assert top["feature"] in truth
    assert top["q_value"] < 0.01 and top["split_half_agree"] and top["predicted_direction"] == "amplify"
    trace = result.trace(HOOK, int(top["feature"]), k=5)
    assert len(trace) == 5 and trace["chosen"].str.contains("@@@@", regex=False).all()
    # labelled from where it fires, and its contexts mark the marker tokens
    assert "'@'" in top["label"]
    contexts = [c for c in result.contexts if c["feature"] == int(top["feature"])]
    assert contexts and all(c["token"] == "@" and "«@»" in c["text"] for c in contexts)
    # every concept the report lists is labelled (read on its strongest pairs), not only the traced ones
    listed = result.concepts.head(100)
    assert len(listed) > result.options["top_k_trace"] and (listed["label"].fillna("").str.len() > 0).all()
    # resumable extraction: a rerun over the same shards gives the same table
    again = audit_dataset(rows, lens, tokenizer, max_length=64, batch_size=16, n_bootstrap=200, progress=False,
                          out_dir=tmp_path / "shards", n_data_clusters=2, min_cluster_pairs=20)
    assert again.concepts[["feature", "delta", "q_value"]].equals(result.concepts[["feature", "delta", "q_value"]])
    # saved with the lens' SAE: a ConceptSet review sheet the user edits, and the direct export
    out = result.save(tmp_path / "audit", concept_set_top=5)
    sheet = ConceptSet.load(out / "concept_set")
    assert len(sheet) == 5 and {c.action for c in sheet} == {"allow"}
    assert sheet[0].name == f"{HOOK}:{int(top['feature'])}" and sheet[0].source["audit"]["rank"] == 1
    chosen = result.to_concept_set(top=1, action="suppress")
    assert chosen.names == [f"{HOOK}:{int(top['feature'])}"]
    torch.testing.assert_close(chosen[0].vector, lens.saes[HOOK].W_dec[int(top["feature"])].detach().float())
    loaded = AuditResult.load(out)
    with pytest.raises(ValueError, match="needs the SAEs"):
        loaded.to_concept_set(top=1)
    assert loaded.to_concept_set(features=[(HOOK, int(top["feature"]))], saes=lens.saes).names == chosen.names


def test_options_are_checked_before_the_model_runs():
    tokenizer = build_tiny_tokenizer()
    lens = build_lens(vocab_size=260)
    rows = planted_rows(8)
    with pytest.raises(ValueError, match="stat='median'"):
        audit_dataset(rows, lens, tokenizer, stat="median", progress=False)
    with pytest.raises(TypeError, match="n_boot"):
        audit_dataset(rows, lens, tokenizer, n_boot=10, progress=False)
    with pytest.raises(ValueError, match="at least 4 rows"):
        audit_dataset(rows[:3], lens, tokenizer, progress=False)


@pytest.mark.slow
def test_hh_rlhf_first_200_rows(hh_rlhf_path, tmp_path):
    rows = read_preferences(hh_rlhf_path, on_bad_rows="skip")[:200]
    tokenizer = build_tiny_tokenizer([t for r in rows for t in (r.prompt, r.chosen, r.rejected)], vocab_size=512)
    lens = build_lens(vocab_size=len(tokenizer))
    result = audit_dataset(rows, lens, tokenizer, max_length=192, batch_size=16, n_bootstrap=100, progress=False)
    assert result.options["n_pairs"] == 200 and len(result.concepts) > 0
    assert result.options["mean_length_diff"] < 0  # chosen replies are shorter in this harmless split
    assert np.isfinite(result.concepts["delta_len_ctrl"]).all()
    out = result.save(tmp_path / "hh")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Human:" in page and page.lower().count("<script") == 1 and SCRIPT_TAG in page
