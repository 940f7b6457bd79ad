"""The explain-away λ (Bradley–Terry MLE of ΔA on the preferences), the paper's scoring and `lam="auto"`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_anatomy.concepts import ConceptSet
from lightning_anatomy.data import TokenizedPair
from lightning_anatomy.interventions import (
    ConfoundedConceptError,
    compute_concept_scores,
    explain_away_lambda,
)
from lightning_anatomy.models.tiny import build_tiny_model

PAD = 3
HOOK = "blocks.0.hook_resid_post"


def _log_likelihood(lam: float, d: np.ndarray) -> float:
    return float(np.sum(-np.logaddexp(0.0, -lam * d)))


def test_81_for_1_against_is_ln_81_and_zeros_carry_no_information():
    d = [1.0] * 81 + [-1.0] + [0.0] * 18
    assert explain_away_lambda(d) == pytest.approx(math.log(81), abs=1e-9)
    # the stationarity condition 81·σ(−λ) = σ(λ) holds exactly there
    assert abs(explain_away_lambda(d) - math.log(81)) < 1e-9
    # the mirror image, a mapping, a tensor and an array give the same λ
    assert explain_away_lambda([-x for x in d]) == pytest.approx(-math.log(81), abs=1e-9)
    assert explain_away_lambda(dict(enumerate(d))) == pytest.approx(math.log(81), abs=1e-9)
    assert explain_away_lambda(torch.tensor(d)) == pytest.approx(math.log(81), abs=1e-9)
    assert explain_away_lambda(np.asarray(d)) == pytest.approx(math.log(81), abs=1e-9)


def test_no_rescaling_inside_and_the_result_maximises_the_likelihood():
    d = np.asarray([1.0] * 81 + [-1.0])
    assert explain_away_lambda(2.0 * d) == pytest.approx(math.log(81) / 2, abs=1e-9)
    rng = np.random.default_rng(0)
    d = rng.normal(0.4, 1.3, size=500)
    lam = explain_away_lambda(d)
    best = _log_likelihood(lam, d)
    for eps in (1e-3, 1e-2, 0.1):
        assert best > _log_likelihood(lam + eps, d) and best > _log_likelihood(lam - eps, d)
    assert abs(np.sum(d / (1.0 + np.exp(lam * d)))) < 1e-9  # the score equation Σ d·σ(−λd) = 0
    assert explain_away_lambda(d) == lam  # deterministic


def test_perfect_confounding_raises_and_names_the_representation_methods():
    with pytest.raises(ConfoundedConceptError, match="alone orders every pair") as err:
        explain_away_lambda([0.5, 2.0, 0.0, 1.0])
    assert isinstance(err.value, ValueError)
    for name in ("ConceptProjection", "ConceptBlocking", "ConceptSteering"):
        assert name in str(err.value)
    with pytest.raises(ConfoundedConceptError, match="negative"):
        explain_away_lambda([-0.5, -2.0])


@pytest.mark.parametrize(("scores", "match"), [
    ([], "no scores"),
    ({}, "no scores"),
    ([0.0, 0.0, 0.0], "every ΔA is 0"),
    ([1.0, float("nan"), -1.0], "must be finite"),
    (["a", "b"], "must be numbers"),
])
def test_no_information_is_an_error_not_zero(scores, match):
    with pytest.raises(ValueError, match=match) as err:
        explain_away_lambda(scores)
    assert not isinstance(err.value, ConfoundedConceptError)


# --------------------------------------------------------------------------- the paper's scoring


def _pairs(n: int) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(1)

    def ids(k: int) -> list[int]:
        return torch.randint(4, 260, (k,), generator=g).tolist()

    return [TokenizedPair(i, ids(3), ids(2 + i % 3) + [0], ids(3 + i % 2) + [0]) for i in range(n)]


def _block0(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]


def test_zscored_max_scores_match_a_hand_computation():
    model = build_tiny_model("gpt2", num_layers=2)
    pairs = _pairs(6)
    v = torch.randn(64, generator=torch.Generator().manual_seed(2))
    concepts = ConceptSet.from_vectors(v[None], HOOK, names=["s"])
    scores = compute_concept_scores(model, pairs, concepts, tokenizer_pad_id=PAD, reduce="max", zscore=True)
    sides = {}
    for p in pairs:
        for name, completion in (("c", p.chosen_ids), ("r", p.rejected_ids)):
            h = _block0(model, p.prompt_ids + completion)[len(p.prompt_ids):]
            sides[(p.row_id, name)] = float((h @ (v / v.norm())).max())
    values = np.asarray(list(sides.values()))
    mu, sd = values.mean(), values.std()
    for p in pairs:
        want = (sides[(p.row_id, "c")] - mu) / sd - (sides[(p.row_id, "r")] - mu) / sd
        assert scores[p.row_id] == pytest.approx(want, abs=1e-5)
    raw = compute_concept_scores(model, pairs, concepts, tokenizer_pad_id=PAD, reduce="max")
    assert raw[0] == pytest.approx(scores[0] * sd, abs=1e-5)
    with pytest.raises(ValueError, match="zscore must be True or False"):
        compute_concept_scores(model, pairs, concepts, tokenizer_pad_id=PAD, zscore="yes")


def test_the_zscore_setting_is_part_of_the_cache_key(tmp_path):
    model = build_tiny_model("gpt2", num_layers=2)
    pairs = _pairs(4)
    concepts = ConceptSet.from_vectors(torch.randn(1, 64, generator=torch.Generator().manual_seed(3)), HOOK)
    raw = compute_concept_scores(model, pairs, concepts, tokenizer_pad_id=PAD, cache_dir=tmp_path)
    z = compute_concept_scores(model, pairs, concepts, tokenizer_pad_id=PAD, cache_dir=tmp_path, zscore=True)
    assert len(list(tmp_path.glob("concept-scores-*.json"))) == 2
    assert raw != z


def test_reward_shaping_auto_uses_the_explain_away_lambda():
    from lightning_anatomy import RewardShaping

    scores = {i: v for i, v in enumerate([1.0] * 81 + [-1.0] + [0.0] * 18)}
    shaping = RewardShaping(scores, lam="auto")
    assert shaping.lam == pytest.approx(math.log(81), abs=1e-9)
    assert shaping.offsets(torch.tensor([0, 81, 90])).tolist() == pytest.approx([math.log(81), -math.log(81), 0.0])
    with pytest.raises(ConfoundedConceptError, match="ConceptProjection"):
        RewardShaping({0: 1.0, 1: 2.0}, lam="auto")
    with pytest.raises(ValueError, match="lam must be a finite number or 'auto'"):
        RewardShaping(scores, lam="fit")


def test_the_confounding_summary_for_reports():
    from lightning_anatomy.interventions.explain_away import confounding, pair_auroc

    d = [1.0] * 81 + [-1.0] + [0.0] * 18
    assert pair_auroc(d) == pytest.approx((81 + 9) / 100)
    assert confounding(d) == {"lambda": pytest.approx(math.log(81), abs=1e-9), "auroc": pytest.approx(0.9)}
    assert confounding([1.0, 0.0]) == {"lambda": math.inf, "auroc": 0.75}
    assert confounding([-1.0, -2.0])["lambda"] == -math.inf
    with pytest.raises(ValueError, match="every ΔA is 0"):
        confounding([0.0])
