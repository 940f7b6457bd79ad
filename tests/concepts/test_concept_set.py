"""ConceptSet: bases, actions, constructors that recover planted directions, and the file format."""

from __future__ import annotations

import pytest
import torch
import yaml
from sae_lens import StandardSAE, StandardSAEConfig
from safetensors.torch import load_file, save_file

from lightning_anatomy.concepts.concept_set import Concept, ConceptSet, ConceptSetError
from lightning_anatomy.concepts.lens import capture_activations
from lightning_anatomy.models.tiny import build_tiny_model, build_tiny_tokenizer

D = 64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def sae_with_metadata():
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=128))
    sae.cfg.metadata.model_name = "tiny-gpt2"
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    return sae


def mixed_set() -> ConceptSet:
    sae = sae_with_metadata()
    feats = ConceptSet.from_sae_features(sae, "blocks.1.hook_resid_post", [3, 7, 11], labels=["a", "b", "c"])
    vecs = ConceptSet.from_vectors(torch.randn(2, 32, generator=gen(1)), "blocks.0.hook_mlp_out", action="amplify")
    return (feats + vecs).with_actions({"blocks.1.hook_resid_post:7": "allow"})


def test_from_sae_features_uses_decoder_rows_and_provenance():
    sae = sae_with_metadata()
    cs = ConceptSet.from_sae_features(sae, "blocks.1.hook_resid_post", [5, 2], labels={2: "two"})
    assert cs.names == ["blocks.1.hook_resid_post:5", "blocks.1.hook_resid_post:2"]
    assert torch.equal(cs["blocks.1.hook_resid_post:5"].vector, sae.W_dec[5].detach())
    c = cs[1]
    assert (c.label, c.action, c.hook, c.dim) == ("two", "suppress", "blocks.1.hook_resid_post", D)
    assert c.source == {
        "kind": "sae_feature", "feature": 2, "d_sae": 128,
        "sae_model_name": "tiny-gpt2", "sae_hook_name": "blocks.1.hook_resid_post",
    }
    with pytest.raises(ConceptSetError, match="feature id 128 is out of range for an SAE with d_sae=128"):
        ConceptSet.from_sae_features(sae, "h", [128])
    with pytest.raises(ConceptSetError, match="repeat"):
        ConceptSet.from_sae_features(sae, "h", [1, 1])
    with pytest.raises(ConceptSetError, match="2 labels for 1 concepts"):
        ConceptSet.from_sae_features(sae, "h", [1], labels=["x", "y"])


def test_collection_protocol_and_actions_filter():
    cs = mixed_set()
    assert len(cs) == 5 and cs.hooks == ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]
    assert [c.action for c in cs] == ["suppress", "allow", "suppress", "amplify", "amplify"]
    assert "blocks.0.hook_mlp_out:v1" in cs and cs[-1].name == "blocks.0.hook_mlp_out:v1"
    assert cs.select(action="suppress").names == ["blocks.1.hook_resid_post:3", "blocks.1.hook_resid_post:11"]
    assert cs.basis("blocks.1.hook_resid_post").shape == (D, 2)  # the "allow" concept is left out
    assert cs.basis("blocks.1.hook_resid_post", action=None).shape == (D, 3)
    assert cs.basis("blocks.0.hook_mlp_out", action="amplify").shape == (32, 2)
    # with_actions returns a new set and leaves the old one alone.
    flipped = cs.with_actions({"blocks.1.hook_resid_post:3": "allow"})
    assert flipped["blocks.1.hook_resid_post:3"].action == "allow" and cs["blocks.1.hook_resid_post:3"].action == "suppress"
    assert cs.vectors("blocks.1.hook_resid_post").shape == (2, D)
    with pytest.raises(KeyError, match=r"no concepts named \['nope'\]"):
        cs.with_actions({"nope": "allow"})
    with pytest.raises(ConceptSetError, match="action 'supress' is not one of suppress, amplify, allow"):
        cs.with_actions({"blocks.1.hook_resid_post:3": "supress"})
    with pytest.raises(KeyError, match="no concept named 'x'"):
        cs["x"]
    with pytest.raises(ConceptSetError) as err:
        cs.basis("blocks.0.hook_mlp_out")
    assert "no concepts with action 'suppress' at hook 'blocks.0.hook_mlp_out'" in str(err.value)
    assert "['blocks.1.hook_resid_post']" in str(err.value)


def test_basis_is_orthonormal_spans_the_concepts_and_drops_dependent_ones():
    g = gen(2)
    a, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
    vectors = torch.stack([a * 3, b, 2 * a - 0.5 * b, torch.randn(D, generator=g), -a])
    cs = ConceptSet.from_vectors(vectors, "h")
    q = cs.basis("h")
    assert q.dtype == torch.float32 and q.shape == (D, 3)  # rows 2 and 4 lie in span(a, b)
    torch.testing.assert_close(q.T @ q, torch.eye(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(q[:, 0], a / a.norm(), rtol=0, atol=1e-6)  # concept order is kept
    for v in vectors:  # every concept lies in the span
        torch.testing.assert_close(q @ (q.T @ v), v, rtol=0, atol=1e-5)
    assert torch.equal(cs.basis("h"), q)  # deterministic
    wide = ConceptSet.from_vectors(torch.randn(40, D, generator=g), "h").basis("h")
    torch.testing.assert_close(wide.T @ wide, torch.eye(40), rtol=0, atol=1e-6)


def test_concept_validation():
    with pytest.raises(ConceptSetError, match="concept 'z': vector is all zeros"):
        Concept("z", "h", torch.zeros(4))
    with pytest.raises(ConceptSetError, match=r"concept 'n': vector has non-finite values"):
        Concept("n", "h", torch.tensor([1.0, float("nan")]))
    with pytest.raises(ConceptSetError, match=r"vector must be 1-D \[d\], got shape \(2, 2\)"):
        Concept("m", "h", torch.ones(2, 2))
    with pytest.raises(ConceptSetError, match="concept 'a': action 'ban'"):
        Concept("a", "h", torch.ones(2), action="ban")
    with pytest.raises(ConceptSetError, match="'a' appears twice"):
        ConceptSet([Concept("a", "h", torch.ones(2)), Concept("a", "g", torch.ones(2))])
    with pytest.raises(ConceptSetError, match="concept 'b': vector has d=3 but concept 'a' at the same hook 'h' has d=2"):
        ConceptSet([Concept("a", "h", torch.ones(2)), Concept("b", "h", torch.ones(3))])
    c = Concept("a", "h", torch.ones(3, dtype=torch.float64), source={"t": torch.tensor([1, 2])})
    assert c.vector.dtype == torch.float32 and c.source == {"t": [1, 2]}


def test_activation_difference_recovers_a_planted_direction():
    g = gen(3)
    direction = torch.randn(D, generator=g)
    direction /= direction.norm()
    base_a = torch.randn(4, 200, D, generator=g)
    base_b = torch.randn(1000, D, generator=g)
    mask = torch.rand(4, 200, generator=g) > 0.3
    acts_with = base_a + 3.0 * direction  # the trait shifts every token along `direction`
    acts_with[~mask] = 100.0  # padding junk must be ignored through the mask
    cs = ConceptSet.from_activation_difference(
        acts_with, base_b, "blocks.0.hook_resid_post", name="trait", label="planted", mask_with=mask
    )
    c = cs["trait"]
    assert cosine(c.vector, direction) > 0.95
    assert c.source["n_with"] == int(mask.sum()) and c.source["n_without"] == 1000
    assert abs(c.source["norm"] - 3.0) < 0.3
    with pytest.raises(ConceptSetError, match="acts_with has width 64 but acts_without has 8"):
        ConceptSet.from_activation_difference(base_b, torch.ones(3, 8), "h", name="x")
    with pytest.raises(ConceptSetError, match="all-False mask"):
        ConceptSet.from_activation_difference(base_a, base_b, "h", name="x", mask_with=torch.zeros(4, 200, dtype=torch.bool))


def test_mean_difference_on_texts_matches_the_tensor_variant():
    model = build_tiny_model("gpt2", num_layers=2, hidden_size=32)
    tok = build_tiny_tokenizer()
    with_texts = ["I am very happy today!", "What a joyful day"]
    without = ["The report is due.", "Tables have legs", "x"]
    cs = ConceptSet.from_mean_difference(
        model, tok, "blocks.0.hook_resid_post", with_texts, without, name="joy", batch_size=2
    )
    # Reference: each text alone, all tokens averaged.
    def acts(texts):
        rows = [capture_activations(model, ["blocks.0.hook_resid_post"], torch.tensor([tok(t)["input_ids"]]))[
            "blocks.0.hook_resid_post"][0] for t in texts]
        return torch.cat(rows)

    expected = ConceptSet.from_activation_difference(acts(with_texts), acts(without), "blocks.0.hook_resid_post", name="joy")
    torch.testing.assert_close(cs["joy"].vector, expected["joy"].vector, rtol=1e-5, atol=1e-5)
    assert cs["joy"].source["n_with"] == sum(len(tok(t)["input_ids"]) for t in with_texts)
    with pytest.raises(ConceptSetError, match="texts_without is empty"):
        ConceptSet.from_mean_difference(model, tok, "blocks.0.hook_resid_post", with_texts, [], name="j")


def test_pca_recovers_a_planted_subspace():
    g = gen(4)
    basis, _ = torch.linalg.qr(torch.randn(D, 3, generator=g))
    n = 400
    acts_b = torch.randn(n, D, generator=g)
    coeffs = torch.randn(n, 3, generator=g) * torch.tensor([5.0, 4.0, 3.0])
    acts_a = acts_b + coeffs @ basis.T + 0.05 * torch.randn(n, D, generator=g)
    cs = ConceptSet.from_pca(acts_a, acts_b, "blocks.1.hook_resid_post", k=3)
    assert cs.names == [f"blocks.1.hook_resid_post:pc{i}" for i in range(3)]
    q = cs.basis("blocks.1.hook_resid_post")
    # The principal angles between the recovered and planted subspaces are all ~0.
    singular = torch.linalg.svdvals(q.double().T @ basis.double())
    assert singular.min() > 0.99
    ratios = [c.source["explained_variance_ratio"] for c in cs]
    assert ratios == sorted(ratios, reverse=True) and sum(ratios) > 0.95
    # Uncentred PCA picks up a consistent shift as the first component, oriented along it.
    shift = basis[:, 0]
    shifted = ConceptSet.from_pca(acts_b + 3.0 * shift, acts_b, "h", k=1, center=False)
    assert cosine(shifted[0].vector, shift) > 0.99
    with pytest.raises(ConceptSetError, match="k=65 must be between 1 and min"):
        ConceptSet.from_pca(acts_a, acts_b, "h", k=65)
    with pytest.raises(ConceptSetError, match="paired activations of one shape"):
        ConceptSet.from_pca(acts_a, acts_b[:10], "h")


def test_save_load_round_trip(tmp_path):
    cs = mixed_set()
    out = cs.save(tmp_path / "set")
    assert sorted(p.name for p in out.iterdir()) == ["concepts.yaml", "vectors.safetensors"]
    text = (out / "concepts.yaml").read_text()
    assert text.startswith("# lightning-anatomy concept set") and "action: allow" in text
    back = ConceptSet.load(out)
    assert back.names == cs.names
    for a, b in zip(cs, back):
        assert (a.name, a.hook, a.label, a.action, a.source) == (b.name, b.hook, b.label, b.action, b.source)
        assert torch.equal(a.vector, b.vector)
    assert torch.equal(back.basis("blocks.1.hook_resid_post"), cs.basis("blocks.1.hook_resid_post"))


def test_user_edits_to_actions_are_read(tmp_path):
    out = mixed_set().save(tmp_path / "set")
    path = out / "concepts.yaml"
    path.write_text(path.read_text().replace("action: allow", "action: amplify"))
    assert ConceptSet.load(out)["blocks.1.hook_resid_post:7"].action == "amplify"


def _edit(out, fn):
    path = out / "concepts.yaml"
    doc = yaml.safe_load(path.read_text())
    fn(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_load_errors_name_concept_and_field(tmp_path):
    out = mixed_set().save(tmp_path / "set")
    good = (out / "concepts.yaml").read_text()
    first = "blocks.1.hook_resid_post:3"

    (out / "concepts.yaml").write_text(good.replace("action: suppress", "action: [oops", 1))
    with pytest.raises(ConceptSetError, match=r"not valid YAML at line \d+"):
        ConceptSet.load(out)

    cases = [
        (lambda d: d["concepts"][0].update(action="supress"), f"concept '{first}': field 'action' is 'supress'"),
        (lambda d: d["concepts"][0].update(acton="allow"), r"unknown field\(s\) \['acton'\]"),
        (lambda d: d["concepts"][0].update(hook=None), "field 'hook' must be a hook name"),
        (lambda d: d["concepts"][0].update(name="renamed"), "concept 'renamed': no vector named 'renamed'"),
        (lambda d: d["concepts"][0].update(dim=63), "field 'dim' is 63 but the stored vector has 64"),
        (lambda d: d["concepts"][0].update(source=[1]), "field 'source' must be a mapping"),
        (lambda d: d["concepts"].append(dict(d["concepts"][0])), f"'{first}' appears twice"),
        (lambda d: d.update(version=2), "field 'version' is 2"),
        (lambda d: d.pop("concepts"), "expected a mapping with a 'concepts' list"),
        (lambda d: d["concepts"].__setitem__(1, "text"), r"concepts\[1\]: expected a mapping"),
    ]
    for edit, message in cases:
        (out / "concepts.yaml").write_text(good)
        _edit(out, edit)
        with pytest.raises(ConceptSetError, match=message):
            ConceptSet.load(out)

    (out / "concepts.yaml").write_text(good)
    tensors = load_file(str(out / "vectors.safetensors"))
    tensors[first] = torch.full((D,), float("inf"))
    save_file(tensors, str(out / "vectors.safetensors"))
    with pytest.raises(ConceptSetError, match=f"concept '{first}': vector has non-finite values"):
        ConceptSet.load(out)
    (out / "vectors.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConceptSetError, match="vectors.safetensors: cannot read"):
        ConceptSet.load(out)
    (out / "vectors.safetensors").unlink()
    with pytest.raises(ConceptSetError, match="vectors.safetensors not found"):
        ConceptSet.load(out)
    with pytest.raises(ConceptSetError, match="concepts.yaml not found"):
        ConceptSet.load(tmp_path / "nowhere")


def test_validate_against_model_widths(tmp_path):
    model = build_tiny_model("gpt2", num_layers=2, hidden_size=D)
    cs = ConceptSet.from_vectors(torch.randn(2, D, generator=gen(5)), "blocks.1.hook_resid_post")
    out = cs.save(tmp_path / "ok")
    assert len(ConceptSet.load(out, model=model)) == 2
    narrow = build_tiny_model("gpt2", num_layers=2, hidden_size=32)
    with pytest.raises(ConceptSetError, match=r"concept 'blocks.1.hook_resid_post:v0': vector has d=64 but the model's width at 'blocks.1.hook_resid_post' is 32"):
        ConceptSet.load(out, model=narrow)
    far = ConceptSet.from_vectors(torch.randn(1, D, generator=gen(6)), "blocks.5.hook_resid_post")
    with pytest.raises(ConceptSetError, match=r"hook 'blocks.5.hook_resid_post' does not fit the model.*out of range"):
        far.validate_against(model)
    with pytest.raises(ConceptSetError, match="empty concept set"):
        ConceptSet().save(tmp_path / "empty")
