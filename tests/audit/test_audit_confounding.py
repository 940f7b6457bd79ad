"""How confounded each reported concept and cluster is with the preference: the explain-away λ and
the pair AUROC in the audit's tables, its report and its saved files, from the audit's own ΔA."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from lightning_anatomy.audit import AuditResult, audit_features
from lightning_anatomy.audit.report import anchor, fmt, render_report
from lightning_anatomy.audit.run import REPORT_CONCEPTS, confounding_columns
from lightning_anatomy.concepts.span_features import SpanFeatures
from lightning_anatomy.interventions.explain_away import explain_away_lambda, pair_auroc
from tests.helpers.audit_synthetic import HOOK, make_span_features
from tests.helpers.paper_synthetic import blocks_of, planted_spans

MARKERS = (7, 42)
CONFOUNDED = 7  # its rejected side is zeroed: every pair that differs leans to chosen


def _zero_rejected(features: SpanFeatures, columns: list[int]) -> SpanFeatures:
    """`features` with the rejected values of `columns` set to 0 in every stat (perfect confounding)."""
    matrices = dict(features.matrices)
    for (hook, span, stat), m in features.matrices.items():
        if span == "rejected":
            m = m.tolil(copy=True)
            m[:, columns] = 0
            matrices[(hook, span, stat)] = sp.csr_matrix(m)
    return SpanFeatures(row_ids=features.row_ids, lengths=features.lengths, matrices=matrices, d_sae=features.d_sae)


def _section(page: str, sid: str) -> str:
    return re.search(rf'<details class="sec" id="{sid}".*?</details>', page, re.S).group(0)


def _column(m: sp.spmatrix, j: int) -> np.ndarray:
    return np.asarray(m[:, j].todense(), dtype=np.float64).ravel()


@pytest.fixture(scope="module")
def paired() -> AuditResult:
    features, _ = make_span_features(n_pairs=160, planted=MARKERS, local=(60, 61), seed=5)
    return audit_features(_zero_rejected(features, [CONFOUNDED]), n_bootstrap=0, n_data_clusters=2,
                          min_cluster_pairs=20, top_k_trace=4, trace_pairs=3)


@pytest.fixture(scope="module")
def paper() -> tuple[AuditResult, list[list[int]]]:
    blocks = blocks_of(6, 10)
    chosen, rejected = np.array([0.1, 0.3, 0.5, 0.5, 0.6, 0.8]), np.array([0.8, 0.5, 0.5, 0.3, 0.4, 0.1])
    features = _zero_rejected(planted_spans(blocks, 80, chosen, rejected, n_pairs=240), blocks[5])
    assign = pd.DataFrame([(HOOK, m, f) for m, b in enumerate(blocks) for f in b], columns=["hook", "cluster", "feature"])
    return audit_features(features, method="paper", feature_clusters=assign, n_bootstrap=0), blocks


def test_paired_concepts_and_clusters_report_lambda_and_auroc_of_their_own_delta(paired):
    result = paired
    f = result.features
    chosen, rejected = f.get(HOOK, "chosen", "max"), f.get(HOOK, "rejected", "max")
    top = result.concepts.head(REPORT_CONCEPTS)
    assert top["pair_auroc"].notna().all() and result.concepts["pair_auroc"].iloc[REPORT_CONCEPTS:].isna().all()
    assert result.concepts["perfectly_confounded"].iloc[REPORT_CONCEPTS:].isna().all()
    finite = 0
    for _, row in top.iterrows():
        d = _column(chosen, int(row["feature"])) - _column(rejected, int(row["feature"]))
        assert row["pair_auroc"] == pytest.approx(pair_auroc(d), abs=1e-15)
        assert row["differing_pairs"] == int((d != 0).sum())
        if (d > 0).any() and (d < 0).any():  # finite: the MLE itself
            assert row["explain_away_lambda"] == pytest.approx(explain_away_lambda(d), rel=1e-12)
            assert not row["perfectly_confounded"]
            finite += 1
        elif d.any():  # one-signed: ±inf, flagged
            assert row["explain_away_lambda"] == (math.inf if (d > 0).any() else -math.inf)
            assert row["perfectly_confounded"]
        else:
            assert math.isnan(row["explain_away_lambda"]) and row["pair_auroc"] == 0.5
    assert finite > 10
    marker = result.concept(HOOK, 42)  # the planted marker: finite, strongly chosen-leaning
    assert math.isfinite(marker["explain_away_lambda"]) and marker["explain_away_lambda"] > 1
    assert marker["pair_auroc"] > 0.75
    confounded = result.concept(HOOK, CONFOUNDED)
    assert confounded["explain_away_lambda"] == math.inf and confounded["perfectly_confounded"]
    # clusters: ΔA is the members' mean span value, chosen − rejected
    assert len(result.clusters)
    for _, row in result.clusters.iterrows():
        members = [int(m) for m in row["features"]]
        d = (np.asarray(chosen[:, members].todense(), dtype=np.float64).mean(1)
             - np.asarray(rejected[:, members].todense(), dtype=np.float64).mean(1)).ravel()
        d[np.abs(d) < 1e-12] = 0.0
        assert row["pair_auroc"] == pytest.approx(pair_auroc(d))
        if (d > 0).any() and (d < 0).any():
            assert row["explain_away_lambda"] == pytest.approx(explain_away_lambda(d), rel=1e-9)


def test_paper_method_uses_the_active_indicator_and_flags_the_confounded_cluster(paper):
    result, blocks = paper
    tau = float(result.options["tau"])
    f = result.features  # the audited 1{freq > τ}
    assert result.stat == "active"
    for _, row in result.concepts.head(REPORT_CONCEPTS).iterrows():
        j = int(row["feature"])
        d = _column(f.get(HOOK, "chosen", "active"), j) - _column(f.get(HOOK, "rejected", "active"), j)
        assert set(np.unique(d)) <= {-1.0, 0.0, 1.0}
        assert row["pair_auroc"] == pytest.approx(pair_auroc(d), abs=1e-15)
        if (d > 0).any() and (d < 0).any():
            assert row["explain_away_lambda"] == pytest.approx(explain_away_lambda(d), rel=1e-12)
    source = planted_spans(blocks, 80, [0.1, 0.3, 0.5, 0.5, 0.6, 0.8], [0.8, 0.5, 0.5, 0.3, 0.4, 0.1], n_pairs=240)
    source = _zero_rejected(source, blocks[5])
    cluster_of = result.feature_clusters.set_index("feature")["cluster"]
    for m, members in enumerate(blocks):  # u = mean over members of 1{chosen active} − 1{rejected active}
        u = np.mean([_column(source.get(HOOK, "chosen", "freq"), j) > tau for j in members], axis=0) - np.mean(
            [_column(source.get(HOOK, "rejected", "freq"), j) > tau for j in members], axis=0)
        row = result.clusters[result.clusters["cluster"] == int(cluster_of.loc[members[0]])].iloc[0]
        assert row["pair_auroc"] == pytest.approx(pair_auroc(u))
        if m == 5:
            assert (u >= 0).all() and row["explain_away_lambda"] == math.inf and row["perfectly_confounded"]
        else:
            assert row["explain_away_lambda"] == pytest.approx(explain_away_lambda(u), rel=1e-9)
            assert not row["perfectly_confounded"]
    by_block = result.clusters.set_index("cluster")["explain_away_lambda"]
    assert by_block[int(cluster_of.loc[blocks[0][0]])] < 0 < by_block[int(cluster_of.loc[blocks[4][0]])]


def test_report_shows_both_columns_with_their_legend(paired, paper):
    for result in (paired, paper[0]):
        page = render_report(result)
        for sid in ("concepts", "clusters"):
            body = _section(page, sid)
            heads = re.findall(r"<th[^>]*>([^<]*)</th>", body)
            assert "λ" in heads and "pair AUROC" in heads and "pairs ≠" in heads, sid
            assert "<b>λ</b>: how much of the preference the concept alone explains (Bradley–Terry MLE" in body
            assert "perfect confounding" in body and "<b>pair AUROC</b>: P(chosen has more of it" in body
    page = render_report(paired)
    row = re.search(rf'<tr id="row-{anchor("concept", HOOK, CONFOUNDED)}">(.*?)</tr>', page, re.S).group(1)
    assert '<td class="num" data-v="Infinity">∞</td>' in row
    marker = paired.concept(HOOK, 42)
    row = re.search(rf'<tr id="row-{anchor("concept", HOOK, 42)}">(.*?)</tr>', page, re.S).group(1)
    assert f'data-v="{float(marker["explain_away_lambda"])!r}">{fmt(marker["explain_away_lambda"])}</td>' in row
    assert f'data-v="{float(marker["pair_auroc"])!r}">{fmt(marker["pair_auroc"])}</td>' in row


def test_save_load_round_trips_the_columns_and_older_audits_load_without_them(paired, paper, tmp_path):
    for name, result in (("paired", paired), ("paper", paper[0])):
        out = result.save(tmp_path / name)
        loaded = AuditResult.load(out)
        pd.testing.assert_frame_equal(loaded.concepts, result.concepts)
        pd.testing.assert_frame_equal(loaded.clusters.drop(columns="features"), result.clusters.drop(columns="features"))
        for sid in ("concepts", "clusters"):  # the loaded audit's tables render the same numbers
            assert _section(render_report(loaded), sid) == _section(render_report(result), sid)
    # JSON: ±inf is written as null beside perfectly_confounded: true
    records = {r["feature"]: r for r in json.loads((tmp_path / "paired" / "concepts.json").read_text())}
    assert records[CONFOUNDED]["explain_away_lambda"] is None and records[CONFOUNDED]["perfectly_confounded"] is True
    assert records[42]["explain_away_lambda"] == pytest.approx(float(paired.concept(HOOK, 42)["explain_away_lambda"]))
    assert records[42]["perfectly_confounded"] is False
    # an audit saved before the columns existed: they load as missing, and the report leaves them out
    old = tmp_path / "paired"
    for table in ("concepts", "clusters"):
        frame = pd.read_parquet(old / f"{table}.parquet")
        frame.drop(columns=["explain_away_lambda", "pair_auroc", "perfectly_confounded", "differing_pairs"]).to_parquet(
            old / f"{table}.parquet", index=False)
    loaded = AuditResult.load(old)
    for table in (loaded.concepts, loaded.clusters):
        assert table["explain_away_lambda"].isna().all() and table["pair_auroc"].isna().all()
        assert table["perfectly_confounded"].isna().all() and str(table["perfectly_confounded"].dtype) == "boolean"
        assert table["differing_pairs"].isna().all() and str(table["differing_pairs"].dtype) == "Int64"
    page = render_report(loaded)  # the tables leave the columns out (the summary box reads the features)
    assert "<b>pair AUROC</b>" not in page and "<b>λ</b>" not in page


def test_confounding_columns_edge_cases():
    chosen = sp.csr_matrix(np.array([[1.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0], [3.0, 0.0, 0.0, 1.0]]))
    rejected = sp.csr_matrix(np.array([[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]]))
    got = confounding_columns(chosen, rejected, [0, 1, 2, 3])
    d0 = np.array([1.0, -1.0, 3.0])
    assert got["explain_away_lambda"][0] == pytest.approx(explain_away_lambda(d0), rel=1e-12)
    assert got["pair_auroc"][0] == pytest.approx(2 / 3)
    assert math.isnan(got["explain_away_lambda"][1]) and got["pair_auroc"][1] == 0.5  # never differs
    assert not got["perfectly_confounded"][1]
    assert got["explain_away_lambda"][2] == pytest.approx(explain_away_lambda([2.0, -1.0, -1.0]), rel=1e-12)
    assert math.isnan(got["explain_away_lambda"][3])  # equal everywhere
    assert got["differing_pairs"].tolist() == [3, 0, 3, 0]
    lone = confounding_columns(sp.csr_matrix(np.array([[0.0], [0.0]])), sp.csr_matrix(np.array([[1.0], [0.0]])), [0])
    assert lone["explain_away_lambda"][0] == -math.inf and lone["perfectly_confounded"][0]
    assert lone["pair_auroc"][0] == pytest.approx(0.25)
    assert lone["differing_pairs"][0] == 1  # infinite λ, on one pair: the column says how little it rests on
