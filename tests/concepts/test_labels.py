"""Labels: a planted feature's contexts come back marked, the logit lens finds its token."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from lightning_anatomy.concepts.labels import (
    Context,
    HeuristicLabeller,
    Labeller,
    label_features,
    logit_lens_tokens,
    top_activating_contexts,
)
from lightning_anatomy.concepts.lens import ConceptLens
from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer

WIDTH, FEATURE = 32, 5
HOOK = "transformer.wte"  # token embeddings: context-free, so the planted feature is exact


@dataclass
class Row:
    prompt: str
    chosen: str
    rejected: str
    row_id: int


@pytest.fixture(scope="module")
def planted():
    """Feature 5 reads the direction of token 'Z' (strongly) plus 'Q' (weakly); nothing else fires."""
    model = build_tiny_model("gpt2", num_layers=2, hidden_size=WIDTH)
    tok = build_tiny_tokenizer()
    emb = model.transformer.wte.weight.detach()
    z, q = tok("Z")["input_ids"][0], tok("Q")["input_ids"][0]
    emb[z] *= 4.0  # make the planted tokens stand out of the random embedding cloud
    emb[q] *= 3.0
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=WIDTH, d_sae=16))
    read = emb[z] / emb[z].norm() + emb[q] / emb[q].norm()
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_enc[:, FEATURE] = read
        scores = emb @ read
        # Threshold halfway between the weaker planted token and the best of the rest.
        others = scores.clone()
        others[[z, q]] = -1e9
        sae.b_enc[FEATURE] = -(float(scores[q]) + float(others.max())) / 2
        sae.W_dec.copy_(torch.randn(16, WIDTH) * 0.1)
        sae.W_dec[FEATURE] = emb[z]
    lens = ConceptLens(model, {HOOK: sae}, fidelity_check=False)
    expected = torch.relu(scores + sae.b_enc[FEATURE].detach())
    assert expected[z] > expected[q] > 0 and int((expected > 0).sum()) == 2
    return lens, tok, float(expected[z]), float(expected[q])


TEXTS = ["hello there", "a Qbert", "nothing here", "Zig and Zag", "xyz", ""]


def test_top_contexts_are_the_planted_ones_marked(planted):
    lens, tok, act_z, act_q = planted
    ctx = top_activating_contexts(lens, tok, TEXTS, HOOK, FEATURE, k=10, window=3, batch_size=4)
    assert [c.item_index for c in ctx] == [3, 1]  # strongest first; texts where it never fires omitted
    first, second = ctx
    assert isinstance(first, Context) and first.source == "text 3" and first.token == "Z"
    assert first.token_index == 0 and first.activation == pytest.approx(act_z, rel=1e-5)
    # Window 3: the peak and the 3 tokens after it (none before position 0).
    assert first.text == f"«Z»({act_z:.2f})ig "
    assert second.text == f"a «Q»({act_q:.2f})ber" and second.token == "Q"
    wide = top_activating_contexts(lens, tok, TEXTS, HOOK, FEATURE, k=1, window=20)
    assert len(wide) == 1 and wide[0].text == f"«Z»({act_z:.2f})ig and «Z»({act_z:.2f})ag"


def test_preference_rows_give_chosen_and_rejected_contexts(planted):
    lens, tok, act_z, _ = planted
    rows = [Row("Say: ", "Zap", "nope", row_id=7), {"prompt": "P ", "chosen": "ok", "rejected": "Zoom", "row_id": 9}]
    ctx = top_activating_contexts(lens, tok, rows, HOOK, FEATURE, window=2)
    assert [c.source for c in ctx] == ["row 7 chosen", "row 9 rejected"]
    assert [c.item_index for c in ctx] == [0, 3]
    pair = top_activating_contexts(lens, tok, [("prompt ", "Zed")], HOOK, FEATURE)
    assert pair[0].token_index == len("prompt ") and pair[0].activation == pytest.approx(act_z, rel=1e-5)


def test_bad_inputs(planted):
    lens, tok, _, _ = planted
    with pytest.raises(ValueError, match=r"feature 16 is out of range for the SAE at 'transformer.wte' \(d_sae=16\)"):
        top_activating_contexts(lens, tok, TEXTS, HOOK, 16)
    with pytest.raises(TypeError, match=r"texts_or_pairs\[1\] is a int"):
        top_activating_contexts(lens, tok, ["a", 3], HOOK, FEATURE)
    with pytest.raises(ValueError, match="texts_or_pairs is empty"):
        top_activating_contexts(lens, tok, [], HOOK, FEATURE)
    with pytest.raises(KeyError, match="no SAE at hook 'blocks.0.hook_resid_post'"):
        top_activating_contexts(lens, tok, TEXTS, "blocks.0.hook_resid_post", FEATURE)


def test_logit_lens_finds_the_planted_token(planted):
    lens, tok, _, _ = planted
    emb = lens.model.transformer.wte.weight.detach()
    z = tok("Z")["input_ids"][0]
    by_feature = logit_lens_tokens(lens.model, tok, (lens.saes[HOOK], FEATURE), k=5)
    assert len(by_feature) == 5 and by_feature[0][0] == "Z"
    assert by_feature[0][1] == pytest.approx(float(emb[z] @ emb[z]), rel=1e-5)
    assert [s for _, s in by_feature] == sorted((s for _, s in by_feature), reverse=True)
    assert logit_lens_tokens(lens.model, tok, emb[z], k=1)[0][0] == "Z"
    with pytest.raises(ValueError, match="direction has d=7 but the model's unembedding has width 32"):
        logit_lens_tokens(lens.model, tok, torch.ones(7))


def test_labellers(planted):
    lens, tok, _, _ = planted
    labels = label_features(lens, tok, TEXTS, HOOK, [FEATURE, 0])
    assert labels[FEATURE].startswith("fires on 'Z', 'Q'; promotes 'Z'")
    assert labels[0].startswith("promotes ")  # feature 0 never fires: the logit lens alone
    seen = {}

    def llm(contexts, logit_tokens):
        seen["contexts"], seen["tokens"] = contexts, logit_tokens
        return "the letter Z"

    assert isinstance(llm, Labeller) and isinstance(HeuristicLabeller(), Labeller)
    assert label_features(lens, tok, TEXTS, HOOK, [FEATURE], labeller=llm, n_logit_tokens=2) == {FEATURE: "the letter Z"}
    assert [c.token for c in seen["contexts"]] == ["Z", "Q"] and len(seen["tokens"]) == 2
    assert HeuristicLabeller()([], []) == "unlabelled"
