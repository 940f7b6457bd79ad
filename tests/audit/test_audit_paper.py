"""method="paper": co-firing NMI + Leiden clusters, the disparity u, data clusters and the
inside-vs-outside table, each against a direct computation; the contract; bad inputs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from lightning_anatomy.audit import AuditResult, audit_dataset, audit_features
from lightning_anatomy.audit import feature_conditioned as fc
from lightning_anatomy.audit.cofiring import cofiring_clusters, cofiring_edges
from lightning_anatomy.audit.report import SCRIPT_TAG, render_report
from lightning_anatomy.concepts.span_features import SpanFeatures
from lightning_anatomy.data.rows import PreferenceRow
from tests.helpers.paper_synthetic import HOOK, blocks_of, planted_firing, planted_spans

EVIL = '<script>alert("x")</script>'
pytestmark = pytest.mark.filterwarnings("ignore:SAE at .* explains only")


# ---------------------------------------------------------------------------- co-firing


def nmi_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """MI of two binary vectors from their 2×2 table, over √(H_a·H_b)."""
    n = len(a)
    mi = 0.0
    for va, vb in itertools.product((0, 1), repeat=2):
        p = np.mean((a == va) & (b == vb))
        pa, pb = np.mean(a == va), np.mean(b == vb)
        if p > 0:
            mi += p * math.log(p / (pa * pb))
    h = [-sum(q * math.log(q) for q in (np.mean(x), 1 - np.mean(x)) if q > 0) for x in (a, b)]
    assert n == len(b)
    return mi / math.sqrt(h[0] * h[1])


def test_blocked_cofiring_equals_a_dense_hand_computation():
    x = planted_firing(blocks_of(3, 4), 20, n_tokens=600, seed=4).toarray().astype(bool)
    x[:, 19] = True  # fires everywhere: entropy 0, left out
    x[:, 18] = False
    x[:3, 18] = True  # fires on 3 tokens: below min_tokens
    truth = {}
    for g, h in itertools.combinations(range(18), 2):
        a, b = x[:, g], x[:, h]
        if (a & b).sum() * len(a) > a.sum() * b.sum():  # co-fires more often than chance
            truth[(g, h)] = nmi_by_hand(a.astype(int), b.astype(int))
    k = 18
    for fraction in (1.0, 0.05):
        quota = math.ceil(fraction * k * (k - 1) / 2)
        want = sorted(truth.items(), key=lambda kv: (-kv[1], kv[0]))[:quota]
        for block in (1, 7, 64):
            kept, i, j, v = cofiring_edges(sp.csr_matrix(x), min_tokens=10, top_fraction=fraction, block_size=block)
            assert kept.tolist() == list(range(18))
            got = [((int(a), int(b)), float(w)) for a, b, w in zip(kept[i], kept[j], v)]
            assert [p for p, _ in got] == [p for p, _ in want]
            np.testing.assert_allclose([w for _, w in got], [w for _, w in want], rtol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_cofiring_mi_and_leiden_recover_planted_blocks(seed):
    blocks = blocks_of(6, 10) + [list(range(60, 63))]  # a block of 3 is below min_cluster_size
    x = planted_firing(blocks, 90, seed=seed)
    clusters = cofiring_clusters({HOOK: x}, min_tokens=10, top_fraction=0.06, seed=seed, block_size=16)
    assert list(clusters.columns) == ["hook", "cluster", "feature"]
    got = sorted(clusters.groupby("cluster")["feature"].apply(list).tolist())
    assert got == blocks[:6]  # every planted block, nothing else (noise features stay unclustered)
    again = cofiring_clusters({HOOK: x}, min_tokens=10, top_fraction=0.06, seed=seed, block_size=1000)
    pd.testing.assert_frame_equal(clusters, again)  # the block size changes memory, not the result


# ---------------------------------------------------------------------------- statistics by hand


def small_case():
    """12 pairs, 7 features: cluster 0 = {0, 1}, cluster 1 = {2, 3, 4}; features 5, 6 unclustered."""
    rng = np.random.default_rng(6)
    n, d = 12, 7
    c = np.where(rng.random((n, d)) < 0.5, rng.choice([0.005, 0.02, 0.3], (n, d)), 0.0)
    r = np.where(rng.random((n, d)) < 0.5, rng.choice([0.005, 0.02, 0.3], (n, d)), 0.0)
    c[0], r[0] = 0.0, 0.0  # a silent pair
    matrices = {(HOOK, s, "freq"): sp.csr_matrix(m.astype(np.float32)) for s, m in (("chosen", c), ("rejected", r))}
    lengths = {s: np.full(n, 10) for s in ("prompt", "chosen", "rejected")}
    features = SpanFeatures(row_ids=np.arange(n) + 100, lengths=lengths, matrices=matrices, d_sae={HOOK: d})
    assign = pd.DataFrame({"hook": HOOK, "cluster": [0, 0, 1, 1, 1], "feature": [0, 1, 2, 3, 4]})
    return features, assign, c, r


def test_disparity_activity_and_inside_outside_equal_a_hand_computation():
    features, assign, c, r = small_case()
    tau = 0.01
    members = {0: [0, 1], 1: [2, 3, 4]}
    n = len(c)
    u = np.zeros((n, 2))
    s = np.zeros((n, 2))
    for i in range(n):
        for m, fs in members.items():
            u[i, m] = sum(int(c[i, f] > tau) - int(r[i, f] > tau) for f in fs) / len(fs)
            s[i, m] = sum(int(c[i, f] > tau) + int(r[i, f] > tau) for f in fs) / (2 * len(fs))
    chosen, rejected, ids = fc.cluster_sides(features, assign, tau)
    np.testing.assert_allclose((chosen - rejected).toarray(), u)
    np.testing.assert_allclose(((chosen + rejected) * 0.5).toarray(), s)

    total = s.sum(1)
    silent = fc.silent_bucket(sp.csr_matrix(s), 5.0)
    assert silent.tolist() == ((total < np.percentile(total, 5)) | (total == 0)).tolist() and silent[0]

    labels = np.array([-1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 0])
    table = fc.inside_outside(sp.csr_matrix(u), labels, cluster_ids=ids, cluster_hooks=np.array([HOOK, HOOK]),
                              cluster_sizes=np.array([2, 3]), global_delta=u.mean(0), min_features=3, min_pairs=6)
    assert len(table) == 4 and table["rank"].tolist() == [1, 2, 3, 4]
    for k, m in itertools.product((0, 1), (0, 1)):
        row = table[(table["data_cluster"] == k) & (table["cluster"] == m)].iloc[0]
        inside = [i for i in range(n) if labels[i] == k]
        outside = [i for i in range(n) if labels[i] >= 0 and labels[i] != k]
        a, b = u[inside, m], u[outside, m]
        delta = a.mean() - b.mean()
        welch = delta / math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
        pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
        halves = []
        for parity in (0, 1):
            ai = [u[i, m] for i in inside if i % 2 == parity]
            bi = [u[i, m] for i in outside if i % 2 == parity]
            halves.append(np.mean(ai) - np.mean(bi))
        agree = np.sign(halves[0]) == np.sign(halves[1]) and halves[0] != 0
        assert row["n_pairs"] == len(inside) and row["size"] == len(members[m])
        assert row["mean_inside"] == pytest.approx(a.mean()) and row["mean_outside"] == pytest.approx(b.mean())
        assert row["delta"] == pytest.approx(delta) and row["welch_z"] == pytest.approx(welch)
        assert row["cohens_d"] == pytest.approx(delta / pooled)
        assert [row["delta_even"], row["delta_odd"]] == pytest.approx(halves)
        assert bool(row["split_half_agree"]) == agree
        assert row["delta_min"] == pytest.approx(np.sign(delta) * min(abs(halves[0]), abs(halves[1])))
        assert bool(row["passes"]) == (len(members[m]) >= 3 and len(inside) >= 6 and agree)
        assert row["global_delta"] == pytest.approx(u[:, m].mean())
    # one row passes every filter (the split-half agreeing size-3 cluster in the 6-pair data cluster)
    assert table["passes"].tolist() == [True, False, False, False]
    # ranking: passing rows first, then |Δ_min| descending
    key = [(not p, -abs(d)) for p, d in zip(table["passes"], table["delta_min"])]
    assert key == sorted(key)


def test_global_cluster_table_and_prediction_by_hand():
    features, assign, c, r = small_case()
    result = audit_features(features, method="paper", feature_clusters=assign, n_bootstrap=0, n_data_clusters=2,
                            length_control=False, min_fire_count=1)
    u0 = np.array([((c[i, [0, 1]] > 0.01).astype(int) - (r[i, [0, 1]] > 0.01)).mean() for i in range(len(c))])
    u1 = np.array([((c[i, [2, 3, 4]] > 0.01).astype(int) - (r[i, [2, 3, 4]] > 0.01)).mean() for i in range(len(c))])
    pred = result.cluster_predictions
    assert list(pred.columns) == ["hook", "cluster", "predicted_shift", "n_features"]
    assert pred["predicted_shift"].tolist() == pytest.approx([u0.mean(), u1.mean()])
    assert pred["n_features"].tolist() == [2, 3]
    row = result.clusters.set_index("cluster").loc[1]
    even, odd = u1[0::2].mean(), u1[1::2].mean()  # split halves by index parity
    assert [row["delta_half1"], row["delta_half2"]] == pytest.approx([even, odd])
    assert row["z"] == pytest.approx(u1.mean() / (u1.std(ddof=1) / math.sqrt(len(u1))))
    # per-feature rows use the same active indicator
    f2 = result.concepts.set_index("feature").loc[2]
    assert f2["delta"] == pytest.approx(np.mean((c[:, 2] > 0.01).astype(int) - (r[:, 2] > 0.01)))
    assert result.options["method"] == "paper" and result.stat == "active"


def test_spherical_kmeans_separates_orthogonal_groups():
    rng = np.random.default_rng(0)
    a = np.c_[rng.uniform(1, 2, (30, 3)), np.zeros((30, 3))]
    b = np.c_[np.zeros((20, 3)), rng.uniform(1, 2, (20, 3))]
    labels = fc.spherical_kmeans(sp.csr_matrix(np.r_[a, b] * rng.uniform(0.1, 10, (50, 1))), 2, seed=3)
    assert labels.tolist() == [0] * 30 + [1] * 20  # scale-free (cosine), ids by size
    with pytest.raises(ValueError, match="non-zero rows"):
        fc.spherical_kmeans(sp.csr_matrix(np.zeros((3, 2))), 2)


# ---------------------------------------------------------------------------- the audit


@pytest.fixture(scope="module")
def planted():
    blocks = blocks_of(6, 10)
    chosen = np.array([0.1, 0.3, 0.5, 0.5, 0.6, 0.8])
    rejected = np.array([0.8, 0.5, 0.5, 0.3, 0.4, 0.1])
    features = planted_spans(blocks, 80, chosen, rejected, n_pairs=240)
    firing = planted_firing(blocks, 80)
    rows = [PreferenceRow(f"Q{i} {EVIL}", f"chosen {i} & <b>", f"rejected {i}", int(rid))
            for i, rid in enumerate(features.row_ids)]
    result = audit_features(features, rows=rows, method="paper", token_firing={HOOK: firing}, n_bootstrap=100,
                            cofire_top_fraction=0.08, labels={(HOOK, 3): f"label {EVIL}"})
    return result, blocks, 0.8 * (chosen - rejected)


@pytest.mark.slow
def test_paper_audit_contract_and_planted_predictions(planted, tmp_path):
    result, blocks, expected = planted
    assign = result.feature_clusters
    assert set(assign.columns) == {"hook", "cluster", "feature"}
    got = {tuple(g) for g in assign.groupby("cluster")["feature"].apply(list)}
    assert got == {tuple(b) for b in blocks}
    pred = result.cluster_predictions
    block_of = {int(c): blocks.index(sorted(part["feature"].tolist())) for c, part in assign.groupby("cluster")}
    planted_shift = np.array([expected[block_of[int(c)]] for c in pred["cluster"]])
    np.testing.assert_allclose(pred["predicted_shift"], planted_shift, atol=0.1)
    assert (pred["n_features"] == 10).all()
    strong = result.clusters[np.abs(result.clusters["predicted_shift"]) > 0.3]
    assert strong["passes"].all() and (strong["rank"] <= len(strong)).all()  # ranked first by Δ_min
    assert set(result.data_clusters["data_cluster"]) <= set(range(-1, 8))
    assert (result.local.columns.tolist() == list(fc.LOCAL_COLUMNS)) and len(result.local)
    assert len(result.cluster_examples) == 3 * len(pred)
    # the report: cluster table with members, labels, examples; the data × feature cluster views; escaped
    page = render_report(result)
    assert "Feature clusters (co-firing, Leiden)" in page and "Data cluster × feature cluster" in page
    assert EVIL not in page and "&lt;script&gt;" in page and "label &lt;script&gt;" in page
    assert "http://" not in page and "https://" not in page and page.count("<script") == 1 and SCRIPT_TAG in page
    # round trip
    loaded = AuditResult.load(result.save(tmp_path / "audit"))
    assert loaded.method == "paper"
    pd.testing.assert_frame_equal(loaded.cluster_predictions, pred)
    pd.testing.assert_frame_equal(loaded.cluster_examples.reset_index(drop=True), result.cluster_examples)


@pytest.mark.parametrize(("options", "message"), [
    ({"method": "bogus"}, "method='bogus'"),
    ({"method": "paper", "stat": "max"}, "stat='max'"),
    ({"method": "paper", "tau": 1.5}, "tau=1.5"),
    ({"method": "paper", "cofire_top_fraction": 0.0}, "cofire_top_fraction=0.0"),
    ({"method": "paper", "min_cluster_size": 0}, "min_cluster_size=0"),
    ({"method": "paper", "silent_percentile": 100}, "silent_percentile=100"),
    ({"method": "paper", "local_min_pairs": 0}, "local_min_pairs=0"),
])
def test_bad_options_are_named(options, message):
    features, _, _, _ = small_case()
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        audit_features(features, **options)


def test_bad_cluster_inputs_are_named():
    features, assign, _, _ = small_case()
    with pytest.raises(ValueError, match="pass token_firing"):
        audit_features(features, method="paper")
    with pytest.raises(ValueError, match="has 5 columns but the hook's SAE has d_sae=7"):
        audit_features(features, method="paper", token_firing={HOOK: sp.csr_matrix((10, 5))})
    with pytest.raises(ValueError, match="token_firing lacks hook"):
        audit_features(features, method="paper", token_firing={"other": sp.csr_matrix((10, 7))})
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['cluster'\]"):
        audit_features(features, method="paper", feature_clusters=assign.drop(columns="cluster"))
    with pytest.raises(ValueError, match="feature 9 is out of range"):
        audit_features(features, method="paper", feature_clusters=assign.assign(feature=[0, 1, 2, 3, 9]))
    with pytest.raises(ValueError, match="belong to method='paper'"):
        audit_features(features, feature_clusters=assign, stat="freq", n_data_clusters=1)
    with pytest.raises(ValueError, match="min_tokens=0"):
        cofiring_edges(sp.csr_matrix((4, 4)), min_tokens=0)


@pytest.mark.slow
def test_audit_dataset_paper_through_a_tiny_model_and_its_cluster_cache(tmp_path, monkeypatch):
    from lightning_anatomy.models.tiny import build_tiny_tokenizer
    from tests.audit.test_audit_end_to_end import build_lens, planted_rows

    tokenizer = build_tiny_tokenizer()
    lens = build_lens(vocab_size=260)
    rows = planted_rows(48)
    kwargs = dict(method="paper", max_length=64, batch_size=16, n_bootstrap=0, progress=False,
                  out_dir=tmp_path / "shards", cofire_top_fraction=0.05, label_concepts=False)
    with pytest.raises(ValueError, match="belong to method='paper'"):
        audit_dataset(rows, lens, tokenizer, cofire_max_tokens=10, progress=False)
    import lightning_anatomy.concepts.token_firing as tf

    separate_pass = tf.pair_span_firing
    # the co-firing corpus comes from the extraction's own forwards: no second pass
    monkeypatch.setattr(tf, "pair_span_firing", lambda *a, **k: pytest.fail("a second pass over the pairs"))
    result = audit_dataset(rows, lens, tokenizer, **kwargs)
    assert len(result.cluster_predictions) >= 2 and result.method == "paper"
    assert list((tmp_path / "shards" / "cofiring").glob("clusters-*.parquet"))
    # ... and gives the clusters the separate pass gives
    from lightning_anatomy.audit.cofiring import cofiring_clusters
    from lightning_anatomy.data.tokenize import tokenize_rows

    pairs = tokenize_rows(rows, tokenizer, max_length=64, max_prompt_length=32)
    firing = separate_pass(lens, pairs, pad_token_id=tokenizer.pad_token_id, batch_size=16)
    want = cofiring_clusters(firing, min_tokens=10, top_fraction=0.05, min_cluster_size=4, resolution=1.0, seed=0)
    pd.testing.assert_frame_equal(result.feature_clusters.reset_index(drop=True), want.reset_index(drop=True))
    # a rerun reads the clusters from the cache
    again = audit_dataset(rows, lens, tokenizer, **kwargs)
    pd.testing.assert_frame_equal(again.feature_clusters, result.feature_clusters)
    # a text corpus instead of the dataset's spans, capped
    corpus = audit_dataset(rows, lens, tokenizer, **{**kwargs, "out_dir": None},
                           cofire_corpus=[r.chosen for r in rows], cofire_max_tokens=500)
    assert corpus.options["method"] == "paper"


@pytest.mark.slow
def test_top_clusters_best_members_are_labelled_on_the_clusters_example_pairs(monkeypatch):
    """With few traced concepts, the cluster table would name few clusters: the best-ranked
    tested members of the top clusters get labels and contexts too (cluster_label_members).
    The other rule, every concept the report lists gets a label, is switched off here to see this one."""
    from lightning_anatomy.audit import run
    from lightning_anatomy.models.tiny import build_tiny_tokenizer

    monkeypatch.setattr(run, "REPORT_CONCEPTS", 0)
    from tests.audit.test_audit_end_to_end import build_lens, planted_rows

    tokenizer, lens, rows = build_tiny_tokenizer(), build_lens(vocab_size=260), planted_rows(48)
    kwargs = dict(method="paper", max_length=64, batch_size=16, n_bootstrap=0, progress=False,
                  cofire_top_fraction=0.05, top_k_trace=2)
    some = audit_dataset(rows, lens, tokenizer, **kwargs, cluster_label_members=2)
    none = audit_dataset(rows, lens, tokenizer, **kwargs, cluster_label_members=0)
    labelled = lambda r: {(h, int(f)) for h, f, lab in r.concepts[["hook", "feature", "label"]].itertuples(  # noqa: E731
        index=False) if isinstance(lab, str) and lab}
    traced = {(h, int(f)) for h, f in some.traces[["hook", "feature"]].drop_duplicates().itertuples(index=False)}
    assert labelled(none) == traced
    rank = {(h, int(f)): int(r) for h, f, r in some.concepts[["hook", "feature", "rank"]].itertuples(index=False)}
    want = set(traced)
    for _, row in some.clusters.head(2).iterrows():  # the top top_k_trace clusters
        if (some.cluster_examples["cluster"] == row["cluster"]).any():
            tested = sorted((int(f) for f in row["features"] if (row["hook"], int(f)) in rank),
                            key=lambda f, h=row["hook"]: rank[(h, f)])
            want |= {(row["hook"], f) for f in tested[:2]}
    assert len(want) > len(traced)
    assert labelled(some) == want
    assert {(c["hook"], c["feature"]) for c in some.contexts} == want
    with pytest.raises(ValueError, match="cluster_label_members=-1"):
        audit_dataset(rows, lens, tokenizer, **kwargs, cluster_label_members=-1)


def test_token_firing_counts_the_spans_tokens_in_a_measurement_pass():
    from lightning_anatomy.concepts.token_firing import pair_span_firing, sequence_firing
    from lightning_anatomy.data import TokenizedPair
    from lightning_anatomy.model_access import is_measurement_pass
    from tests.audit.test_audit_end_to_end import build_lens

    lens = build_lens(vocab_size=260)
    seen = []
    lens.model.transformer.h[0].register_forward_hook(lambda *a: seen.append(is_measurement_pass()))
    pairs = [TokenizedPair(i, [5, 6, 7], [8, 9], [10, 11, 12]) for i in range(3)]
    firing = pair_span_firing(lens, pairs, pad_token_id=3, batch_size=2)[HOOK]
    assert firing.shape == (3 * (3 + 2 + 3), 256) and seen and all(seen)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    dense = (lens.encode(ids)[HOOK][0] > 0).numpy()
    np.testing.assert_array_equal(sequence_firing(lens, [[5, 6, 7, 8, 9]])[HOOK].toarray().astype(bool), dense)
    assert sequence_firing(lens, [[5, 6, 7, 8, 9]] * 3, max_tokens=7)[HOOK].shape[0] == 7


@pytest.mark.slow
def test_cofiring_scale_benchmark_quick(tmp_path):
    import json

    from tests.helpers.bench_loader import run_quick

    _, results = run_quick("cofiring_scale", tmp_path)
    run = json.loads((tmp_path / "cofiring_scale.quick.json").read_text())["run"]
    assert run == json.loads(json.dumps(results["run"]))
    assert run["d_sae"] == 1024 and 40 < run["mean_l0"] < 70 and run["edges_kept"] == math.ceil(
        0.01 * run["features_in_graph"] * (run["features_in_graph"] - 1) / 2)
    assert run["clusters_at_least_4"] >= 1 and run["peak_rss_increase_mb"] >= 0
