"""The tilt predictor (`audit.tilt`): on a planted log-linear toy with correlated concepts it
recovers the true changes where the independent per-cluster disparity does not; no preference
signal predicts ≈ 0; the Bradley–Terry fit is the direct MLE; the tilt's exact math; the
resolution rule is deterministic; bad predictor names are refused before any work; the
audit and `check_prediction` expose it (side by side on the same, reused rollouts)."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import minimize

from lightning_anatomy.audit import AuditOptions, audit_features, check_prediction
from lightning_anatomy.audit.agreement import r_squared
from lightning_anatomy.audit.cofiring import RESOLUTION_GRID, cofiring_clusters, target_cluster_size
from lightning_anatomy.audit.tilt import (
    L2_GRID,
    bt_objective,
    check_predictor,
    fit_bradley_terry,
    fit_bradley_terry_fixed,
    tilt_predict,
    tilt_shift,
)
from tests.helpers.paper_synthetic import (
    HOOK,
    add_block0_bias,
    blocks_of,
    coordinate_case,
    planted_firing,
    planted_spans,
)

pytestmark = pytest.mark.filterwarnings("ignore:SAE at .* explains only")
M = 6
W_TRUE = np.array([1.5, -1.0, 0.0, 1.0, 0.0, -0.5])


def log_linear_toy(*, signal: bool = True, n_pairs: int = 3000, n_rollouts: int = 20000, seed: int = 0):
    """Six binary concepts, correlated under the base policy p₀(a) ∝ exp(h·a + aᵀJa) (0-1-2 ride
    together, 3 and 4 exclude each other, 4 and 5 go together); DPO's target p₁ ∝ p₀·exp(w*·a).
    Pairs vary the concepts independently (as the graded benchmark inserts markers) and are labelled
    by Bradley–Terry with w* (or by a coin without signal). Returns (chosen, rejected, rollouts of
    p₀, the exact change E_p₁[a] − E_p₀[a])."""
    configs = np.array(list(itertools.product([0.0, 1.0], repeat=M)))
    h = np.array([-0.5, -0.5, -0.5, 0.0, 0.0, -0.3])
    j = np.zeros((M, M))
    j[0, 1] = j[1, 2] = j[0, 2] = 1.5
    j[3, 4] = -1.5
    j[4, 5] = 1.2
    logp0 = configs @ h + np.einsum("ni,ij,nj->n", configs, j, configs)
    p0 = np.exp(logp0 - logp0.max())
    p0 /= p0.sum()
    p1 = p0 * np.exp(configs @ W_TRUE)
    p1 /= p1.sum()
    true = p1 @ configs - p0 @ configs
    rng = np.random.default_rng(seed)
    rollouts = configs[rng.choice(len(configs), size=n_rollouts, p=p0)]
    a = (rng.random((n_pairs, M)) < 0.5).astype(float)
    b = (rng.random((n_pairs, M)) < 0.5).astype(float)
    p_a = 1.0 / (1.0 + np.exp(-(a - b) @ W_TRUE)) if signal else np.full(n_pairs, 0.5)
    a_wins = rng.random(n_pairs) < p_a
    chosen = np.where(a_wins[:, None], a, b)
    rejected = np.where(a_wins[:, None], b, a)
    return chosen, rejected, rollouts, true


def test_tilt_recovers_correlated_changes_where_the_independent_disparity_does_not():
    chosen, rejected, rollouts, true = log_linear_toy()
    pred = tilt_predict(chosen, rejected, rollouts=rollouts)
    paper = (chosen - rejected).mean(axis=0)  # the paper's ū per cluster
    np.testing.assert_allclose(pred.fit.weights, W_TRUE, atol=0.2)  # the joint reward is recovered
    assert r_squared(pred.full, true) > 0.98  # measured 0.995
    assert r_squared(pred.first_order, true) > 0.95  # measured 0.974
    assert r_squared(paper, true) < 0.8  # measured 0.657: concept 0's own lean is cancelled by 1 and 2
    np.testing.assert_allclose(pred.full, true, atol=0.03)  # t = 1 is the planted tilt: the size is right too
    assert list(pred.sample) == ["rollouts"] * M
    # concept 0 (rewarded, rides with 1 and 2, punished/neutral) rises far less than its own lean says
    assert paper[0] > 2 * true[0] > 0


def test_no_preference_signal_predicts_about_zero():
    chosen, rejected, rollouts, true = log_linear_toy(signal=False)
    pred = tilt_predict(chosen, rejected, rollouts=rollouts)
    assert pred.fit.l2 >= 0.1  # cross-validation picks a strong penalty
    assert np.abs(pred.full).max() < 0.02 < 0.1 < np.abs(true).max()  # measured 0.004 vs 0.25
    assert np.abs(pred.first_order).max() < 0.02


def test_bradley_terry_fit_equals_the_direct_mle():
    rng = np.random.default_rng(3)
    diff = rng.integers(-1, 2, (60, 4)).astype(float)
    labels = rng.random(60) < 1 / (1 + np.exp(-diff @ np.array([1.0, -0.5, 0.2, 0.0])))
    diff[~labels] *= -1  # rows where the "first" lost: chosen − rejected flips
    for l2 in (1e-3, 0.1):
        ours = fit_bradley_terry_fixed(diff, l2)
        direct = minimize(bt_objective, np.zeros(4), args=(diff, l2), method="BFGS", options={"gtol": 1e-11})
        np.testing.assert_allclose(ours, direct.x, atol=1e-6)
        assert bt_objective(ours, diff, l2) <= direct.fun + 1e-12
    fit = fit_bradley_terry(diff, seed=1)
    assert fit.l2 in L2_GRID and set(fit.cv_loglik) == set(L2_GRID) and fit.n_folds == 5
    best = max(fit.cv_loglik, key=fit.cv_loglik.get)
    assert fit.l2 >= best  # the one-standard-error rule only ever picks a stronger penalty than the best
    np.testing.assert_array_equal(fit.weights, fit_bradley_terry_fixed(diff, fit.l2))
    again = fit_bradley_terry(diff, seed=1)
    np.testing.assert_array_equal(again.weights, fit.weights)


def test_tilt_math_by_hand_and_the_dataset_fallback():
    sample = np.array([[1.0, 0.0], [0.0, 1.0]])
    full, first = tilt_shift(sample, np.array([np.log(3.0), 0.0]))
    np.testing.assert_allclose(full, [0.75 - 0.5, 0.25 - 0.5])  # weights 3/4, 1/4
    np.testing.assert_allclose(first, [np.log(3.0) / 4, -np.log(3.0) / 4])  # Cov(a, r), ddof 0
    chosen, rejected, rollouts, _ = log_linear_toy(n_rollouts=500)
    rollouts[:, 2] = 0.0  # concept 2 never fires in the rollouts: it falls back to the dataset
    with_rollouts = tilt_predict(chosen, rejected, rollouts=rollouts)
    dataset_only = tilt_predict(chosen, rejected)
    assert list(with_rollouts.sample) == ["rollouts", "rollouts", "dataset", "rollouts", "rollouts", "rollouts"]
    assert with_rollouts.full[2] == dataset_only.full[2] and list(dataset_only.sample) == ["dataset"] * M
    np.testing.assert_allclose(dataset_only.full, tilt_shift(np.vstack([chosen, rejected]), dataset_only.fit.weights)[0])
    ignored = tilt_predict(chosen, rejected, rollouts=rollouts, sample="dataset")
    np.testing.assert_array_equal(ignored.full, dataset_only.full)
    assert list(ignored.sample) == ["dataset"] * M
    pooled = tilt_predict(chosen, rejected, rollouts=rollouts, sample="both")
    full, first = tilt_shift(np.vstack([rollouts, chosen, rejected]), pooled.fit.weights)
    np.testing.assert_array_equal(pooled.full, full)
    np.testing.assert_array_equal(pooled.first_order, first)
    assert list(pooled.sample) == ["both"] * M and pooled.full[2] != 0  # concept 2 moves through the dataset rows
    with pytest.raises(ValueError, match="tilt_sample='both' pools .* no rollouts were given"):
        tilt_predict(chosen, rejected, sample="both")
    with pytest.raises(ValueError, match="tilt_sample='pooled' is invalid: choose one of rollouts, dataset, both"):
        tilt_predict(chosen, rejected, rollouts=rollouts, sample="pooled")


def test_resolution_rule_is_deterministic_and_scaled_to_the_sae():
    assert target_cluster_size(65536) == pytest.approx(80.0)
    assert target_cluster_size(512) == pytest.approx(80 * np.sqrt(512 / 65536))  # ≈ 7.07
    assert target_cluster_size(128) == 4.0  # never below min_cluster_size
    blocks = blocks_of(6, 8) + blocks_of(4, 5, offset=48)
    firing = {HOOK: planted_firing(blocks, 96, n_tokens=3000, seed=2)}
    runs = [cofiring_clusters(firing, top_fraction=0.05, target_size=t) for t in ("auto", "auto", 8.0, 40.0)]
    pd.testing.assert_frame_equal(runs[0], runs[1])
    assert runs[0].attrs["resolution"] == runs[1].attrs["resolution"]
    used = [r.attrs["resolution"][HOOK] for r in runs]
    assert all(u in RESOLUTION_GRID for u in used)
    sizes = [r.groupby("cluster").size().mean() for r in runs]
    assert used[3] <= used[2] and sizes[3] >= sizes[2]  # a larger target: a lower resolution, larger clusters
    fixed = cofiring_clusters(firing, top_fraction=0.05, resolution=used[2])
    pd.testing.assert_frame_equal(fixed, runs[2])  # the rule only picks the resolution
    with pytest.raises(ValueError, match="cluster_target_size='big'"):
        AuditOptions(method="paper", cluster_target_size="big").validate()


def test_bad_predictor_names_are_refused():
    with pytest.raises(ValueError, match="predictor='tilted' is invalid: choose one of paper, tilt"):
        AuditOptions(method="paper", predictor="tilted").validate()
    with pytest.raises(ValueError, match="predictors='oracle'"):
        check_predictor("oracle", "predictors")
    with pytest.raises(ValueError, match="tilt_folds"):
        AuditOptions(predictor="tilt", tilt_folds=1).validate()
    from lightning_anatomy.audit import audit_dataset

    with pytest.raises(ValueError, match="predictor='Tilt' is invalid"):  # before any model work
        audit_dataset([], None, None, method="paper", predictor="Tilt")


def test_audit_with_the_tilt_predictor_keeps_delta_and_adds_the_tilt():
    blocks = blocks_of(6, 5)
    chosen_rate = np.array([0.8, 0.2, 0.5, 0.7, 0.3, 0.5])
    features = planted_spans(blocks, 64, chosen_rate, chosen_rate[::-1], n_pairs=200, seed=1)
    assign = pd.DataFrame([(HOOK, m, f) for m, b in enumerate(blocks) for f in b], columns=["hook", "cluster", "feature"])
    paper = audit_features(features, method="paper", feature_clusters=assign, n_bootstrap=0)
    tilt = audit_features(features, method="paper", feature_clusters=assign, n_bootstrap=0, predictor="tilt")
    a, b = paper.clusters.set_index("cluster"), tilt.clusters.set_index("cluster")
    np.testing.assert_array_equal(a["delta"], b.loc[a.index, "delta"])
    np.testing.assert_array_equal(a["predicted_shift"], a["delta"])
    assert {"predicted_shift_first_order", "tilt_weight", "tilt_sample"} <= set(b.columns)
    assert set(b["tilt_sample"]) == {"dataset"} and tilt.options["predictor"] == "tilt" and tilt.options["tilt_l2"] > 0
    # independent planted blocks: the tilt agrees with the disparity in sign and order
    assert r_squared(b.loc[a.index, "predicted_shift"], a["delta"]) > 0.9
    assert (np.sign(b.loc[a.index, "predicted_shift"]) == np.sign(a["delta"])).all()
    paired = audit_features(features, n_bootstrap=0, predictor="tilt", top_n_cluster=40, n_data_clusters=1)
    assert "tilt_weight" in paired.clusters.columns or paired.clusters.empty


@pytest.fixture(scope="module")
def case():
    return coordinate_case()


def test_drift_monitor_takes_the_predictor(case):
    from lightning_anatomy.audit.tilt import predictions_for
    from lightning_anatomy.callbacks.drift import ConceptDriftMonitor
    from tests.helpers.concept_callback_helpers import random_pairs

    _, sae, result, _ = case
    own = ConceptDriftMonitor({HOOK: sae}, random_pairs(2), rollouts=2, clusters=result)
    tilt = ConceptDriftMonitor({HOOK: sae}, random_pairs(2), rollouts=2, clusters=result, predictor="tilt")
    pd.testing.assert_frame_equal(tilt.cluster_predictions, predictions_for(result, "tilt"))
    pd.testing.assert_frame_equal(own.cluster_predictions, predictions_for(result, "paper"))
    assert not np.allclose(tilt.cluster_predictions["predicted_shift"], own.cluster_predictions["predicted_shift"])
    with pytest.raises(ValueError, match="predictor='joint' is invalid"):
        ConceptDriftMonitor({HOOK: sae}, random_pairs(2), rollouts=2, clusters=result, predictor="joint")
    with pytest.raises(ValueError, match="pass clusters="):
        ConceptDriftMonitor({HOOK: sae}, random_pairs(2), predictor="tilt")


@pytest.mark.slow
def test_check_prediction_compares_predictors_on_the_same_reused_rollouts(case):
    model, sae, result, bias = case
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, 260, (8,), generator=g).tolist() for _ in range(8)]
    after = copy.deepcopy(model)
    add_block0_bias(after, bias(1.0))
    kw = dict(samples_per_prompt=2, max_new_tokens=16, n_bootstrap=50)
    with pytest.raises(ValueError, match="predictors=\\['paper', 'bogus'\\]|predictors='bogus'"):
        check_prediction(result, model, after, prompts, predictors=["paper", "bogus"], **kw)
    both = check_prediction(result, model, after, prompts, predictors=("paper", "tilt"), **kw)
    assert list(both.predictors["predictor"]) == ["paper", "tilt"] and len(both.predictors) == 2
    np.testing.assert_array_equal(both.table["predicted"], both.table["predicted_paper"])
    assert both.r2 == both.predictors.iloc[0]["r2"] and both.summary()["predictors"].keys() == {"paper", "tilt"}
    assert both.predictors.iloc[1]["sample"] in ("rollouts", "rollouts+dataset", "dataset")
    assert set(both.table["tilt_sample"]) <= {"rollouts", "dataset"}
    reused = check_prediction(result, model, after, prompts, predictors=("tilt",), reuse=both, **kw)
    assert reused.rollouts is both.rollouts and reused.settings["reused_rollouts"]
    np.testing.assert_array_equal(reused.table["observed"], both.table["observed"])
    np.testing.assert_array_equal(reused.table["predicted"], both.table["predicted_tilt"])
    assert reused.r2 == both.predictors.iloc[1]["r2"]
    pooled = check_prediction(result, model, after, prompts, predictors=("tilt",), tilt_sample="both", reuse=both, **kw)
    assert pooled.predictors.iloc[0]["sample"] == "both" and set(pooled.table["tilt_sample"]) == {"both"}
    assert pooled.settings["tilt_sample"] == "both" and reused.settings["tilt_sample"] == "rollouts"
    np.testing.assert_array_equal(pooled.table["observed"], both.table["observed"])
    assert not np.array_equal(pooled.table["predicted"], both.table["predicted_tilt"])
    with pytest.raises(ValueError, match="tilt_sample='all' is invalid"):  # before any sampling
        check_prediction(result, model, after, prompts, predictors=("tilt",), tilt_sample="all", **kw)
    with pytest.raises(ValueError, match="reuse= was sampled with other seed"):
        check_prediction(result, model, after, prompts, reuse=both, **(kw | {"seed": 1}))
