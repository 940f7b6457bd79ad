"""Audit statistics and structure on synthetic span features with known answers."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from lightning_anatomy.audit import audit_features, benjamini_hochberg, paired_statistics
from lightning_anatomy.audit import statistics as audit_stats
from lightning_anatomy.audit.clustering import cofiring_mutual_information, data_clusters
from lightning_anatomy.audit.statistics import add_decisions, split_halves
from lightning_anatomy.concepts.span_features import SpanFeatures
from tests.helpers.audit_synthetic import HOOK, make_span_features, random_sparse

REQUIRED = ["hook", "feature", "delta", "cohens_d", "z", "ci_low", "ci_high", "q_value", "split_half_agree",
            "delta_min", "predicted_shift", "predicted_direction", "welch_z", "delta_len_ctrl", "z_len_ctrl"]


def test_hand_checked_numbers_match_numpy_and_scipy():
    c = np.array([[1.0, 0.0, 0.5, 0.0], [2.0, 0.3, 0.0, 0.0], [1.5, 0.0, 0.7, 0.0], [0.0, 0.2, 0.0, 0.0],
                  [2.5, 0.0, 0.9, 0.0], [1.0, 0.4, 0.0, 0.0], [3.0, 0.0, 0.2, 0.0], [0.5, 0.1, 0.0, 0.0]])
    r = np.array([[0.0, 0.2, 0.5, 0.0], [1.0, 0.0, 0.4, 0.0], [0.0, 0.3, 0.0, 0.0], [0.5, 0.0, 0.6, 0.0],
                  [1.0, 0.1, 0.0, 0.0], [0.0, 0.0, 0.3, 0.0], [1.0, 0.2, 0.0, 0.0], [0.0, 0.0, 0.8, 0.0]])
    x = np.array([3.0, -2.0, 5.0, 1.0, -4.0, 0.0, 6.0, -1.0])
    table = paired_statistics(sp.csr_matrix(c), sp.csr_matrix(r), length_diff=x, n_bootstrap=0, seed=3)
    assert table["feature"].tolist() == [0, 1, 2]  # feature 3 never fires: not tested
    n = len(c)
    half = split_halves(n, 3)
    assert half.sum() == n // 2
    for j in range(3):
        d = c[:, j] - r[:, j]
        row = table.iloc[j]
        assert row["delta"] == pytest.approx(d.mean(), abs=1e-12)
        assert row["cohens_d"] == pytest.approx(d.mean() / d.std(ddof=1), rel=1e-10)
        assert row["z"] == pytest.approx(stats.ttest_rel(c[:, j], r[:, j]).statistic, rel=1e-10)
        assert row["welch_z"] == pytest.approx(stats.ttest_ind(c[:, j], r[:, j], equal_var=False).statistic, rel=1e-10)
        assert row["p_value"] == pytest.approx(2 * stats.norm.sf(abs(row["z"])), rel=1e-10)
        assert row["n_fire_chosen"] == (c[:, j] > 0).sum() and row["n_fire_rejected"] == (r[:, j] > 0).sum()
        d1, d2 = d[half].mean(), d[~half].mean()
        assert row["delta_half1"] == pytest.approx(d1, abs=1e-12)
        assert row["delta_half2"] == pytest.approx(d2, abs=1e-12)
        assert row["split_half_agree"] == (np.sign(d1) == np.sign(d2) and d1 != 0)
        assert row["delta_min"] == pytest.approx(np.sign(d.mean()) * min(abs(d1), abs(d2)), abs=1e-12)
        fit = stats.linregress(x, d)
        assert row["delta_len_ctrl"] == pytest.approx(fit.intercept, abs=1e-12)
        assert row["z_len_ctrl"] == pytest.approx(fit.intercept / fit.intercept_stderr, rel=1e-9)
    ranked = add_decisions(table.assign(hook=HOOK), alpha=0.05)
    expected_q = stats.false_discovery_control(table["p_value"].to_numpy())
    by_feature = ranked.set_index("feature")
    np.testing.assert_allclose(by_feature.loc[[0, 1, 2], "q_value"], expected_q, rtol=1e-12)
    # feature 0 leans chosen strongly: first, passing, predicted amplify; the others are noise
    assert ranked["feature"].iloc[0] == 0 and bool(ranked["passes"].iloc[0])
    assert ranked["predicted_direction"].tolist()[0] == "amplify"
    assert ranked["predicted_shift"].iloc[0] == pytest.approx(ranked["delta"].iloc[0])
    assert (ranked.loc[~ranked["passes"], "predicted_direction"] == "none").all()
    assert ranked["rank"].tolist() == [1, 2, 3]


def test_benjamini_hochberg_against_scipy_and_edge_cases():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.2, 0.9, 0.04])
    np.testing.assert_allclose(benjamini_hochberg(p), stats.false_discovery_control(p), rtol=1e-12)
    # by hand: sorted p 0.005,0.01,0.03,0.04,0.04,0.2,0.9 -> q_(i)=min_{j>=i} p_(j)*7/j
    assert benjamini_hochberg(np.array([0.005, 0.01]))[0] == pytest.approx(0.01)
    assert benjamini_hochberg(np.array([np.nan, 0.001])).tolist() == pytest.approx([1.0, 0.002])
    assert benjamini_hochberg(np.zeros(0)).size == 0


def test_degenerate_columns_constant_and_zero_differences():
    n = 10
    c = np.zeros((n, 3))
    r = np.zeros((n, 3))
    c[:, 0], r[:, 0] = 2.0, 1.5          # constant non-zero difference: infinitely sure
    c[:, 1], r[:, 1] = 1.0, 1.0          # fires equally on both sides: no difference at all
    c[::2, 2] = 1.0                      # ordinary feature
    table = paired_statistics(c, r, n_bootstrap=50, seed=0)
    row0, row1 = table.iloc[0], table.iloc[1]
    assert row0["delta"] == pytest.approx(0.5) and row0["sd_diff"] == 0.0
    assert np.isinf(row0["z"]) and row0["z"] > 0 and row0["p_value"] == 0.0
    assert row0["ci_low"] == pytest.approx(0.5) and row0["ci_high"] == pytest.approx(0.5)
    assert row1["delta"] == 0.0 and row1["z"] == 0.0 and row1["p_value"] == 1.0
    assert not row1["split_half_agree"]
    assert np.isnan(table["delta_len_ctrl"]).all()  # no lengths given: no length control


def test_bootstrap_ci_is_seeded_chunk_independent_and_close_to_normal_theory(monkeypatch):
    c = random_sparse(400, 50, 0.2, seed=1)
    r = random_sparse(400, 50, 0.2, seed=2)
    a = paired_statistics(c, r, n_bootstrap=300, seed=7)
    monkeypatch.setattr(audit_stats, "_BOOT_BUDGET", 300 * 7)  # 7 columns per block
    b = paired_statistics(c, r, n_bootstrap=300, seed=7)
    np.testing.assert_allclose(a[["ci_low", "ci_high"]], b[["ci_low", "ci_high"]], rtol=0, atol=0)
    other = paired_statistics(c, r, n_bootstrap=300, seed=8)
    assert not np.allclose(a["ci_low"], other["ci_low"])
    assert (a["ci_low"] <= a["delta"]).all() and (a["delta"] <= a["ci_high"]).all()
    width = a["ci_high"] - a["ci_low"]
    normal = 2 * 1.959964 * a["sd_diff"] / np.sqrt(400)
    ratio = (width / normal).to_numpy()
    assert 0.8 < ratio.min() and ratio.max() < 1.2


def test_planted_marker_ranks_first_with_strong_evidence():
    markers = (7, 42, 133)
    features, _ = make_span_features(n_pairs=300, planted=markers, seed=0)
    result = audit_features(features, n_bootstrap=200, n_data_clusters=1)
    concepts = result.concepts
    assert set(REQUIRED) <= set(concepts.columns)
    assert set(concepts["feature"].head(3)) == set(markers)
    top = concepts.head(3)
    assert (top["q_value"] < 0.01).all() and top["split_half_agree"].all() and top["passes"].all()
    assert (top["predicted_direction"] == "amplify").all() and (top["ci_low"] > 0).all()
    assert (top["delta_min"] > 0).all() and (top["delta_min"] <= top["delta"] * 1.5).all()
    # sorted: every passing row before every failing one, |z| descending within each
    passes = concepts["passes"].to_numpy()
    assert not np.any(~passes[:-1] & passes[1:])
    for flag in (True, False):
        z = concepts.loc[concepts["passes"] == flag, "z"].abs().to_numpy()
        assert np.all(np.diff(z) <= 1e-12)
    # the markers fire together: one feature cluster, which itself passes at cluster level
    clusters = concepts.set_index("feature").loc[list(markers), "cluster"]
    assert clusters.nunique() == 1 and clusters.iloc[0] >= 0
    cl = result.clusters.set_index("cluster").loc[clusters.iloc[0]]
    assert sorted(cl["features"]) == sorted(markers) and bool(cl["passes"]) and cl["predicted_direction"] == "amplify"


def test_rejected_side_marker_is_predicted_suppressed():
    features, _ = make_span_features(n_pairs=300, planted=(11,), seed=1)
    swapped = SpanFeatures(row_ids=features.row_ids, lengths=features.lengths, d_sae=features.d_sae, matrices={
        (HOOK, "prompt", "max"): features.get(HOOK, "prompt", "max"),
        (HOOK, "chosen", "max"): features.get(HOOK, "rejected", "max"),
        (HOOK, "rejected", "max"): features.get(HOOK, "chosen", "max")})
    top = audit_features(swapped, n_bootstrap=0, n_data_clusters=1).concepts.iloc[0]
    assert top["feature"] == 11 and top["predicted_direction"] == "suppress" and top["delta"] < 0


@pytest.mark.slow
def test_no_signal_after_random_swaps_in_19_of_20_seeds():
    false_alarms = 0
    for seed in range(20):
        features, _ = make_span_features(n_pairs=200, d_sae=300, planted=(7, 42), seed=seed, swap=True)
        result = audit_features(features, n_bootstrap=0, n_data_clusters=1, top_n_cluster=20, top_k_trace=0)
        false_alarms += bool(((result.concepts["q_value"] < 0.05) & result.concepts["split_half_agree"]).any())
    assert false_alarms <= 1


def test_length_control_removes_a_pure_length_effect():
    rng = np.random.default_rng(0)
    n = 300
    len_c = rng.integers(20, 80, n)
    len_r = rng.integers(5, 60, n)
    c = np.zeros((n, 3))
    r = np.zeros((n, 3))
    c[:, 0], r[:, 0] = 0.05 * len_c, 0.05 * len_r        # difference exactly proportional to length diff
    c[:, 1] = np.where(rng.random(n) < 0.5, 1.0, 0.0)   # a real chosen-side concept, length-free
    r[:, 2] = np.where(rng.random(n) < 0.3, 1.0, 0.0)
    table = paired_statistics(c, r, length_diff=(len_c - len_r).astype(float), n_bootstrap=0)
    pure, real = table.iloc[0], table.iloc[1]
    assert pure["delta"] > 0.5 and pure["z"] > 10
    assert pure["delta_len_ctrl"] == pytest.approx(0.0, abs=1e-9) and pure["z_len_ctrl"] == 0.0
    fit = stats.linregress((len_c - len_r).astype(float), c[:, 1] - r[:, 1])
    assert real["delta_len_ctrl"] == pytest.approx(fit.intercept, rel=1e-9)
    assert abs(real["delta_len_ctrl"] - real["delta"]) < 0.1 and real["z_len_ctrl"] > 5


def test_20k_features_2k_pairs_vectorised_with_bounded_memory():
    n, d = 2000, 20000
    c = random_sparse(n, d, 0.005, seed=10)
    r = random_sparse(n, d, 0.005, seed=11)
    c = sp.lil_matrix(c)
    c[:600, 123] = 3.0  # a planted chosen-side feature
    c = c.tocsr()
    length_diff = np.random.default_rng(0).integers(-30, 30, n).astype(float)
    sparse_bytes = sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes for m in (c, r))
    tracemalloc.start()
    table = paired_statistics(c, r, length_diff=length_diff, n_bootstrap=200, seed=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    dense_bytes = n * d * 8
    assert peak < 12 * sparse_bytes + 64 * d * 8 + audit_stats._BOOT_BUDGET * 8 and peak < dense_bytes / 4
    ranked = add_decisions(table.assign(hook=HOOK))
    assert ranked["feature"].iloc[0] == 123 and ranked["q_value"].iloc[0] < 1e-10
    # spot-check a few columns against dense numpy
    cols = np.random.default_rng(1).choice(table["feature"].to_numpy(), 5, replace=False)
    by_feature = table.set_index("feature")
    dc = c[:, cols].toarray().astype(np.float64)
    dr = r[:, cols].toarray().astype(np.float64)
    np.testing.assert_allclose(by_feature.loc[cols, "delta"], (dc - dr).mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(by_feature.loc[cols, "sd_diff"], (dc - dr).std(0, ddof=1), rtol=1e-6)


def test_data_clusters_recover_prompt_topics_and_local_signal_is_found():
    features, topic = make_span_features(n_pairs=400, local=(60, 61), seed=2)
    labels = data_clusters(features, n_clusters=2, seed=0)
    agreement = max(np.mean(labels == topic), np.mean(labels != topic))
    assert agreement > 0.95
    np.testing.assert_array_equal(labels, data_clusters(features, n_clusters=2, seed=0))
    result = audit_features(features, n_bootstrap=100, n_data_clusters=2, min_cluster_pairs=20)
    glob = result.concepts.set_index("feature").loc[[60, 61]]
    assert not glob["passes"].any()  # cancels globally
    cluster = int(glob["cluster"].iloc[0])
    assert (glob["cluster"] == cluster).all()
    local = result.local[result.local["cluster"] == cluster]
    assert len(local) == 2 and local["local_only"].all() and local["passes"].all()
    assert sorted(np.sign(local["delta"])) == [-1.0, 1.0]
    assert set(result.data_clusters["row_id"]) == set(features.row_ids.tolist())


def test_cofiring_mutual_information_by_hand():
    a = np.array([1, 1, 0, 0, 1, 0, 0, 0])
    b = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    cc = np.array([0, 0, 1, 1, 0, 1, 1, 1])  # the complement of a: anti-correlated
    mi, positive = cofiring_mutual_information(sp.csr_matrix(np.c_[a, b, cc]))
    joint = pd.crosstab(a, b).to_numpy() / len(a)
    pa, pb = joint.sum(1), joint.sum(0)
    expected = sum(joint[i, j] * np.log(joint[i, j] / (pa[i] * pb[j])) for i in range(2) for j in range(2) if joint[i, j])
    assert mi[0, 1] == pytest.approx(expected) and mi[1, 0] == pytest.approx(expected)
    assert positive[0, 1] and not positive[0, 2] and mi[0, 2] > mi[0, 1]  # high MI, but negative: no edge
    assert mi[0, 0] == 0.0


def test_results_are_deterministic():
    features, _ = make_span_features(n_pairs=200, planted=(5, 6), local=(60, 61), seed=4)
    a = audit_features(features, n_bootstrap=50, n_data_clusters=2)
    b = audit_features(features, n_bootstrap=50, n_data_clusters=2)
    pd.testing.assert_frame_equal(a.concepts, b.concepts)
    pd.testing.assert_frame_equal(a.clusters, b.clusters)
    pd.testing.assert_frame_equal(a.local, b.local)


@pytest.mark.parametrize(("options", "message"), [
    ({"stat": "median"}, "stat='median'"),
    ({"n_bootstrap": -1}, "n_bootstrap=-1"),
    ({"alpha": 1.5}, "alpha=1.5"),
    ({"min_fire_count": 0}, "min_fire_count=0"),
    ({"n_clusters": 0}, "n_clusters=0"),
    ({"stat": "freq"}, "stat='freq'"),   # not extracted in these features
])
def test_bad_options_are_named(options, message):
    features, _ = make_span_features(n_pairs=20, d_sae=50)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        audit_features(features, **options)


def test_bad_inputs_are_named():
    features, _ = make_span_features(n_pairs=20, d_sae=50)
    with pytest.raises(TypeError, match="n_bootstraps"):
        audit_features(features, n_bootstraps=10)
    with pytest.raises(ValueError, match="differ in shape"):
        paired_statistics(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_statistics(np.ones((1, 3)), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="length_diff"):
        paired_statistics(np.ones((5, 3)), np.zeros((5, 3)), length_diff=np.zeros(4))
    with pytest.raises(ValueError, match="halves"):
        paired_statistics(np.ones((5, 3)), np.zeros((5, 3)), halves=np.ones(5, dtype=bool))
    no_len = SpanFeatures(row_ids=features.row_ids, lengths={}, matrices=features.matrices, d_sae=features.d_sae)
    with pytest.raises(ValueError, match="length_control"):
        audit_features(no_len)
    plain = audit_features(no_len, length_control=False, n_bootstrap=0)
    assert plain.concepts["delta_len_ctrl"].isna().all() and len(plain.concepts) > 0


def test_two_hooks_share_one_bh_family_and_keep_their_own_clusters():
    features, _ = make_span_features(n_pairs=200, planted=(7, 42), seed=1, hooks=("a.hook", "b.hook"))
    result = audit_features(features, n_bootstrap=0, n_data_clusters=1)
    concepts = result.concepts
    assert set(map(tuple, concepts[["hook", "feature"]].head(4).to_numpy().tolist())) == {
        ("a.hook", 7), ("a.hook", 42), ("b.hook", 7), ("b.hook", 42)}
    np.testing.assert_allclose(concepts["q_value"], stats.false_discovery_control(concepts["p_value"]), rtol=1e-12)
    marker_clusters = result.clusters[result.clusters["features"].map(sorted).map(tuple) == (7, 42)]
    assert sorted(marker_clusters["hook"]) == ["a.hook", "b.hook"] and marker_clusters["passes"].all()
    assert marker_clusters["cluster"].nunique() == 2
