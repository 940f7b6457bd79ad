"""Audit outputs: the HTML report (escaping, offline), save/load, tracing and the data filters."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from audit_synthetic import HOOK, make_span_features

from lightning_anatomy.audit import (
    AuditResult,
    audit_features,
    filter_pairs,
    pair_scores,
    weight_pairs,
    write_rows,
)
from lightning_anatomy.audit.report import render_report
from lightning_anatomy.data.rows import PreferenceRow, read_preferences

MARKERS = (7, 42)
EVIL = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'


def rows_for(features) -> list[PreferenceRow]:
    return [PreferenceRow(prompt=f"Q{i}? {EVIL}", chosen=f"chosen {i} & <b>bold</b>", rejected=f"rejected {i} {EVIL}",
                          row_id=int(rid)) for i, rid in enumerate(features.row_ids)]


@pytest.fixture(scope="module")
def audited():
    features, _ = make_span_features(n_pairs=160, planted=MARKERS, local=(60, 61), seed=5)
    rows = rows_for(features)
    labels = {(HOOK, 7): "marker <script>x</script>", (HOOK, 42): "marker two"}
    # the shape concepts.labels' contexts take in an audit: firing tokens marked «token»(activation)
    contexts = [{"hook": HOOK, "feature": 7, "source": "row 1000 chosen", "token": "<script>", "activation": 2.0,
                 "text": "Sure «<script>»(2.00)«evil()»(1.00)</script>"}]
    result = audit_features(features, rows=rows, labels=labels, contexts=contexts, n_bootstrap=100,
                            n_data_clusters=2, min_cluster_pairs=20, top_k_trace=4, trace_pairs=3)
    return result, rows


def test_report_escapes_dataset_text_and_is_self_contained(audited):
    result, _ = audited
    page = render_report(result)
    # no executable markup at all: no script tag, no event-handler attribute, no external resource
    assert re.search(r"<script", page, re.I) is None
    assert re.search(r"<[a-z][^>]*\son[a-z]+\s*=", page, re.I) is None
    assert re.search(r"(src|href)\s*=\s*\"(https?:)?//", page, re.I) is None
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in page
    assert "marker &lt;script&gt;x&lt;/script&gt;" in page            # labels escaped too
    assert "&lt;b&gt;bold&lt;/b&gt;" in page
    assert page.count("data:image/png;base64,") >= 2                # volcano + heatmaps inline
    # the firing tokens highlighted by activation relative to the peak, their text escaped
    assert 'style="background:rgba(255,140,0,1.00)">&lt;script&gt;</span>' in page
    assert 'style="background:rgba(255,140,0,0.50)">evil()</span>&lt;/script&gt;' in page
    assert '<span class="badge pass">agree</span>' in page


def test_concepts_table_contract_and_traces(audited):
    result, rows = audited
    top = result.concepts.head(2)
    assert set(top["feature"]) == set(MARKERS) and top["label"].tolist()[0].startswith("marker")
    trace = result.trace(HOOK, 7, k=3)
    assert len(trace) == 3 and (trace["contribution"] > 0).all()
    assert trace["contribution"].is_monotonic_decreasing
    by_id = {r.row_id: r for r in rows}
    first = trace.iloc[0]
    assert first["chosen"] == by_id[first["row_id"]].chosen
    f = result.features
    i = int(np.flatnonzero(f.row_ids == first["row_id"])[0])
    c = f.get(HOOK, "chosen", "max")[i, 7]
    r = f.get(HOOK, "rejected", "max")[i, 7]
    assert first["contribution"] == pytest.approx(c - r)
    total = (f.get(HOOK, "chosen", "max")[:, 7] - f.get(HOOK, "rejected", "max")[:, 7]).sum()
    assert first["share"] == pytest.approx((c - r) / total)
    with pytest.raises(KeyError, match="feature=9999"):
        result.trace(HOOK, 9999)


def test_save_load_round_trip_is_atomic_and_complete(audited, tmp_path):
    result, _ = audited
    out = result.save(tmp_path / "audit")
    names = {p.name for p in out.iterdir()}
    assert {"concepts.parquet", "concepts.json", "clusters.parquet", "local.json", "traces.parquet",
            "report.html", "audit.json", "features"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    loaded = AuditResult.load(out)
    pd.testing.assert_frame_equal(loaded.concepts, result.concepts)
    pd.testing.assert_frame_equal(loaded.local, result.local)
    assert loaded.clusters["features"].map(list).tolist() == result.clusters["features"].map(list).tolist()
    pd.testing.assert_frame_equal(loaded.trace(HOOK, 42, k=2), result.trace(HOOK, 42, k=2))  # texts kept
    deeper = loaded.trace(HOOK, 42, k=6)  # beyond the stored traces: recomputed from the saved features
    pd.testing.assert_frame_equal(deeper.drop(columns=["prompt", "chosen", "rejected"]),
                                  result.trace(HOOK, 42, k=6).drop(columns=["prompt", "chosen", "rejected"]))
    assert json.loads((out / "concepts.json").read_text())[0]["feature"] == int(result.concepts["feature"].iloc[0])
    # saving again replaces the audit; a directory of other files is never replaced
    result.save(out)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not an audit directory"):
        result.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(FileNotFoundError, match="not an audit directory"):
        AuditResult.load(tmp_path / "mine")
    # without features a loaded audit still traces its stored top concepts, and says what it cannot do
    slim = AuditResult.load(result.save(tmp_path / "slim", with_features=False))
    assert len(slim.trace(HOOK, 7, k=2)) == 2
    with pytest.raises(ValueError, match="carries no span features"):
        filter_pairs([], slim, concepts=[(HOOK, 7)], drop_fraction=0.1)


def test_concept_set_export_selects_passing_concepts(audited):
    result, _ = audited
    w_dec = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    saes = {HOOK: SimpleNamespace(W_dec=w_dec)}  # all from_sae_features reads of an SAE
    chosen = result.to_concept_set(top=50, saes=saes, action="amplify")
    passing = result.concepts[result.concepts["passes"]]
    assert chosen.names == [f"{HOOK}:{f}" for f in passing["feature"].head(50)]
    assert {f"{HOOK}:{f}" for f in MARKERS} <= set(chosen.names) and {c.action for c in chosen} == {"amplify"}
    torch.testing.assert_close(chosen[f"{HOOK}:7"].vector, w_dec[7])
    assert chosen[f"{HOOK}:7"].label.startswith("marker") and chosen[f"{HOOK}:7"].source["audit"]["passes"] is True
    some = result.to_concept_set(features=[(HOOK, 3)], saes=saes)
    assert some.names == [f"{HOOK}:3"]
    with pytest.raises(ValueError, match="exactly one of top"):
        result.to_concept_set(top=2, features=[(HOOK, 3)], saes=saes)
    with pytest.raises(KeyError, match="no SAE for hook"):
        result.to_concept_set(top=2, saes={"other.hook": saes[HOOK]})
    null = audit_features(make_span_features(n_pairs=60, d_sae=40, seed=3, swap=True)[0], n_bootstrap=0,
                          n_data_clusters=1)
    assert not null.concepts["passes"].any()
    with pytest.raises(ValueError, match="no concept passes"):
        null.to_concept_set(top=3, saes={HOOK: SimpleNamespace(W_dec=torch.randn(40, 8))})


@dataclass
class _Tiny:
    """A hand-built audit of 6 pairs and 2 features with known scores."""

    result: AuditResult
    rows: list[PreferenceRow]


def _tiny_audit() -> _Tiny:
    import scipy.sparse as sp

    from lightning_anatomy.concepts.span_features import SpanFeatures

    c = np.array([[3.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [0.0, 0.0], [3.0, 0.0]])
    r = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 2.0], [0.0, 0.0], [0.5, 0.0], [0.0, 3.0]])
    features = SpanFeatures(row_ids=np.array([10, 11, 12, 13, 14, 15]),
                            lengths={"chosen": np.full(6, 5), "rejected": np.arange(6) + 3, "prompt": np.full(6, 4)},
                            matrices={(HOOK, s, "max"): sp.csr_matrix(m) for s, m in
                                      (("chosen", c), ("rejected", r), ("prompt", np.eye(6, 2)))},
                            d_sae={HOOK: 2})
    rows = [PreferenceRow(f"p{i}", f"c{i}", f"r{i}", row_id=10 + i) for i in range(6)]
    rows.append(PreferenceRow("p-extra", "c", "r", row_id=99))  # not in the audit: scores 0
    result = audit_features(features, rows=rows, min_fire_count=1, n_bootstrap=0, n_data_clusters=1)
    return _Tiny(result, rows)


def test_filters_drop_exactly_the_expected_pairs(tmp_path):
    tiny = _tiny_audit()
    d = np.array([[3, -1], [-1, 1], [0, -2], [2, 2], [-0.5, 0], [3, -3]], dtype=float)
    sd = d.std(0, ddof=1)
    sign = np.sign(d.mean(0))  # feature 0 leans chosen, feature 1 rejected
    expected = (d * sign / sd).sum(1)
    scores = pair_scores(tiny.result, [(HOOK, 0), (HOOK, 1)])
    assert [scores[10 + i] for i in range(6)] == pytest.approx(expected.tolist())
    order = np.argsort(-expected, kind="stable")
    kept, report = filter_pairs(tiny.rows, tiny.result, concepts=[(HOOK, 0), (HOOK, 1)], drop_fraction=2 / 7,
                                out_path=tmp_path / "filtered.jsonl")
    dropped = {10 + int(i) for i in order[:2]}
    assert {r["row_id"] for r in report["dropped"]} == dropped and report["n_dropped"] == 2
    assert [r.row_id for r in kept] == [r.row_id for r in tiny.rows if r.row_id not in dropped]
    back = read_preferences(tmp_path / "filtered.jsonl")
    assert [r.chosen for r in back] == [r.chosen for r in kept]
    saved = json.loads((tmp_path / "filtered.jsonl.report.json").read_text())
    assert saved["n_kept"] == 5 and saved["concepts"][0]["hook"] == HOOK
    # only pairs leaning towards the concepts are ever dropped, however large the fraction
    kept_all, report_all = filter_pairs(tiny.rows, tiny.result, concepts=[(HOOK, 0)], drop_fraction=1.0)
    d0 = d[:, 0]
    assert {r["row_id"] for r in report_all["dropped"]} == {10 + i for i in range(6) if d0[i] > 0}
    assert 99 in {r.row_id for r in kept_all}
    _, none = filter_pairs(tiny.rows, tiny.result, concepts=[(HOOK, 0)], drop_fraction=0.0)
    assert none["n_dropped"] == 0
    with pytest.raises(ValueError, match="drop_fraction"):
        filter_pairs(tiny.rows, tiny.result, concepts=[(HOOK, 0)], drop_fraction=1.5)
    with pytest.raises(KeyError, match="feature=5"):
        filter_pairs(tiny.rows, tiny.result, concepts=[(HOOK, 5)], drop_fraction=0.1)
    with pytest.raises(ValueError, match="repeats row_id 10"):
        filter_pairs(tiny.rows + tiny.rows[:1], tiny.result, concepts=[(HOOK, 0)], drop_fraction=0.1)


def test_weight_pairs_downweights_by_score(tmp_path):
    tiny = _tiny_audit()
    scores = pair_scores(tiny.result, [(HOOK, 0)])
    weighted, report = weight_pairs(tiny.rows, tiny.result, concepts=[(HOOK, 0)], strength=2.0, min_weight=0.2,
                                    out_path=tmp_path / "weighted.jsonl")
    for row in weighted:
        s = scores.get(row.row_id, 0.0)
        assert row.weight == pytest.approx(max(0.2, 1 / (1 + 2 * max(s, 0.0))))
    assert report["n_reweighted"] == sum(s > 0 for s in scores.values())
    back = read_preferences(tmp_path / "weighted.jsonl")
    assert [r.weight for r in back] == pytest.approx([r.weight for r in weighted])
    with pytest.raises(ValueError, match="strength"):
        weight_pairs(tiny.rows, tiny.result, concepts=[(HOOK, 0)], strength=-1)


def test_write_rows_is_atomic(tmp_path, monkeypatch):
    rows = [PreferenceRow("p", "c", "r", row_id=0)]
    path = write_rows(rows, tmp_path / "a.jsonl")
    assert json.loads(path.read_text()) == {"prompt": "p", "chosen": "c", "rejected": "r", "row_id": 0, "weight": 1.0}

    class Boom:
        prompt = chosen = rejected = "x"
        row_id = 1

        @property
        def weight(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_rows([rows[0], Boom()], path)
    assert json.loads(path.read_text())["row_id"] == 0  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]
