"""Audit outputs: the HTML report (escaping, offline), save/load, tracing and the data filters."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from lightning_anatomy.audit import (
    AuditResult,
    audit_features,
    filter_pairs,
    pair_scores,
    weight_pairs,
    write_rows,
)
from lightning_anatomy.audit.report import SCRIPT, SCRIPT_TAG, anchor, fmt, render_report, train_command
from lightning_anatomy.data.rows import PreferenceRow, read_preferences
from tests.helpers.audit_synthetic import HOOK, make_span_features
from tests.helpers.paper_synthetic import blocks_of, planted_spans

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


class PageParts(HTMLParser):
    """What the safety and navigation tests read: ids, links, image sources, scripts, handlers."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: list[str] = []
        self.hrefs: list[str] = []
        self.srcs: list[str] = []
        self.scripts: list[str] = []
        self.handlers: list[str] = []
        self.csp: list[str] = []
        self._in_script = False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name == "id":
                self.ids.append(value)
            elif name == "href":
                self.hrefs.append(value)
            elif name == "src":
                self.srcs.append(value)
            elif name.startswith("on"):
                self.handlers.append(f"{tag} {name}")
        if tag == "meta" and dict(attrs).get("http-equiv") == "Content-Security-Policy":
            self.csp.append(dict(attrs)["content"])
        if tag == "script":
            self._in_script = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def assert_safe(page: str, evil: str) -> PageParts:
    """Dataset strings escaped; one script (ours); nothing loaded from outside the page."""
    parts = PageParts(page)
    assert evil not in page and "<img src=x" not in page
    assert parts.scripts == [SCRIPT] and len(re.findall(r"<script", page, re.I)) == 1 and SCRIPT_TAG in page
    assert parts.handlers == [] and re.search(r"<[a-z][^>]*\son[a-z]+\s*=", page, re.I) is None
    assert all(h.startswith("#") for h in parts.hrefs)
    assert parts.srcs and all(s.startswith("data:image/png;base64,") for s in parts.srcs)
    assert "http://" not in page and "https://" not in page
    return parts


def section(page: str, sid: str) -> str:
    found = re.search(rf'<section class="item" id="{re.escape(sid)}">(.*?)</section>', page, re.S)
    assert found, f"no section {sid}"
    return found.group(1)


def members_listed(body: str) -> list[int]:
    listed = re.search(r"<h4>Members \(best-ranked first\)</h4><p>(.*?)</p>", body, re.S).group(1)
    text = re.sub(r"<[^>]+>", "", re.sub(r"<small>.*?</small>", "", listed, flags=re.S))
    return [int(x) for x in text.split(", ") if x.strip()]


def assert_navigable(page: str, result: AuditResult, max_concepts: int = 100) -> None:
    """Every link resolves; every listed concept and every cluster of two or more features has its
    section, linked from its table row and back (a cluster of one has neither); every cluster lists
    all its members; every listed concept has a label."""
    parts = PageParts(page)
    ids = set(parts.ids)
    assert len(parts.ids) == len(ids), "duplicate ids"
    assert {h[1:] for h in parts.hrefs} <= ids
    for hook, feature in result.concepts[["hook", "feature"]].head(max_concepts).itertuples(index=False):
        sid = anchor("concept", hook, feature)
        assert sid in ids and f"row-{sid}" in ids and f'href="#{sid}"' in page
        assert f'href="#row-{sid}"' in section(page, sid)
        row = re.search(rf'<tr id="row-{sid}">.*?<td class="lbl">(.*?)</td>', page, re.S).group(1)
        assert re.sub(r"<[^>]+>", "", row).strip()
    for (hook, cluster), part in result.feature_clusters.groupby(["hook", "cluster"]):
        sid = anchor("cluster", hook, cluster)
        if len(part) < 2:
            assert f"row-{sid}" not in ids and sid not in ids
            continue
        assert f"row-{sid}" in ids and f'href="#{sid}"' in page
        body = section(page, sid)
        assert f'href="#row-{sid}"' in body
        assert sorted(members_listed(body)) == sorted(int(f) for f in part["feature"])
        assert re.sub(r"<[^>]+>", "", body.split("</h3>")[0]).split("—", 1)[1].strip()  # a label or "unlabelled"


@pytest.fixture(scope="module")
def page(audited):
    return render_report(audited[0])


@pytest.mark.slow
def test_report_escapes_dataset_text_and_is_self_contained(page):
    assert_safe(page, EVIL)
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in page
    assert "marker &lt;script&gt;x&lt;/script&gt;" in page            # labels escaped too
    assert "&lt;b&gt;bold&lt;/b&gt;" in page
    assert page.count("data:image/png;base64,") >= 4                # volcano, Δ histogram, length, heatmaps
    # the firing tokens highlighted by activation relative to the peak, their text escaped
    assert 'style="background:rgba(255,140,0,1.00)">&lt;script&gt;</span>' in page
    assert 'style="background:rgba(255,140,0,0.50)">evil()</span>&lt;/script&gt;' in page
    assert '<span class="badge pass">agree</span>' in page
    # the script only sorts: it never writes markup, and a CSP admits it alone
    assert not re.search(r"innerHTML|outerHTML|insertAdjacent|document\.write|eval\(", SCRIPT)
    csp = PageParts(page).csp
    assert len(csp) == 1 and csp[0].startswith("default-src 'none'; img-src data:;") and "script-src 'sha256-" in csp[0]


@pytest.mark.slow
def test_report_navigation_every_concept_and_cluster(audited):
    result, _ = audited
    page = render_report(result, max_concepts=40)
    assert_navigable(page, result, max_concepts=40)
    assert result.feature_clusters["cluster"].nunique() > 1
    # every listed concept's section has its pairs (traced beyond the stored top ones) or says why not
    for hook, feature in result.concepts[["hook", "feature"]].head(40).itertuples(index=False):
        body = section(page, anchor("concept", hook, feature))
        assert "<h4>Pairs contributing most</h4>" in body and "<h4>Where it fires" in body
    untraced = result.concepts.iloc[30]
    body = section(page, anchor("concept", untraced["hook"], untraced["feature"]))
    assert "No token contexts stored" in body and ('class="pair"' in body or "No pairs:" in body)
    # the co-firing matrix holds every cluster; sortable tables in scroll containers
    assert 'alt="co-firing matrix blocks.0.hook_resid_post"' in page
    assert page.count('<div class="tw"><table class="sortable">') >= 3


def test_report_labels_every_listed_concept_with_fallbacks(audited, page):
    result, _ = audited
    unlabelled = result.concepts[result.concepts["label"].fillna("") == ""].iloc[0]
    sid = anchor("concept", unlabelled["hook"], unlabelled["feature"])
    cell = re.search(rf'<tr id="row-{sid}">.*?<td class="lbl">(.*?)</td>', page, re.S).group(1)
    assert 'class="unl"' in cell and f"feature {int(unlabelled['feature'])}" in cell
    for f in MARKERS:  # real labels stay as they are
        sid = anchor("concept", HOOK, f)
        cell = re.search(rf'<tr id="row-{sid}">.*?<td class="lbl">(.*?)</td>', page, re.S).group(1)
        assert cell.startswith("marker")
    shown = re.findall(r'<td class="dir ([a-z]+)">([a-z]+)</td>', page)  # the direction in full words
    assert shown and {w for _, w in shown} <= {"amplify", "suppress", "none"} and all(a == b for a, b in shown)


@pytest.mark.slow
def test_next_step_box_names_the_concept_set_and_the_train_command(audited, tmp_path, monkeypatch, capsys):
    import shlex
    from pathlib import Path

    import yaml

    from lightning_anatomy.cli import main

    result, _ = audited
    out = result.save(tmp_path / "audit", with_features=False)
    # the suggested command is a valid fit of the CLI with a projection of this concept set
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    command = shlex.split(train_command(str(out / "concept_set"), policy="tiny:llama"))
    assert command[:2] == ["anatomy", "fit"] and main([*command[1:], "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    (callback,) = printed["trainer"]["callbacks"]
    assert callback["class_path"] == "lightning_anatomy.ConceptProjection"
    assert callback["init_args"]["concepts"] == str(out / "concept_set")
    assert printed["model"]["init_args"]["policy"] == "tiny:llama"
    page = (out / "report.html").read_text(encoding="utf-8")
    box = re.search(r'<div class="next" id="next">(.*?)</div>', page, re.S).group(1)
    where = str(tmp_path / "audit" / "concept_set")
    assert f"<code>{where}/concepts.yaml</code>" in box and f"<code>{train_command(where)}</code>" in box
    assert "action: suppress" in box
    assert page.index('id="next"') < page.index('id="concepts"')  # near the top
    custom = render_report(result, next_command="make train CONCEPTS=<x>")
    assert "make train CONCEPTS=&lt;x&gt;" in custom
    # a loaded audit (no rows, no features) still renders a navigable page
    loaded = AuditResult.load(out)
    assert_navigable(render_report(loaded, max_concepts=20), loaded, max_concepts=20)


def _auroc_by_hand(d: np.ndarray) -> float:
    """The share of pairs with ΔA > 0, ties ½: the pair AUROC of ΔA for "chosen"."""
    return float(sum(1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in d) / d.size)


@pytest.mark.slow
def test_summary_says_what_dpo_learns_with_direction_effect_and_confounding(audited, tmp_path):
    from scipy.stats import norm

    from lightning_anatomy.audit.report import pair_auroc, preference_auroc

    result, _ = audited
    page = render_report(result)
    box = re.search(r'<div class="learn" id="learn">(.*?)</div>', page, re.S).group(1)
    assert page.index('id="learn"') < page.index('id="next"') < page.index('id="concepts"')
    passing = result.concepts[result.concepts["passes"]]
    up, down = int((passing["delta"] > 0).sum()), int((passing["delta"] < 0).sum())
    assert f"<b>{len(passing)}</b> of {int(result.options['n_tested'])} tested" in box
    assert f"amplify</span> {up} chosen-leaning" in box and f"suppress</span> {down} rejected-leaning" in box
    shown = re.findall(r'<tr><td><a href="#([^"]+)">', box)
    assert anchor("concept", HOOK, 7) in shown and anchor("concept", HOOK, 42) in shown
    f = result.features
    for feature in MARKERS:
        d = np.asarray((f.get(HOOK, "chosen", "max")[:, feature] - f.get(HOOK, "rejected", "max")[:, feature])
                       .todense()).ravel()
        assert pair_auroc(d) == pytest.approx(_auroc_by_hand(d))
        row = result.concept(HOOK, feature)
        cells = re.search(rf'href="#{anchor("concept", HOOK, feature)}">.*?</td><td>(.*?)</td><td>(.*?)</td>'
                          r"<td>(.*?)</td><td>(.*?)</td><td>(.*?)</td></tr>", box, re.S).groups()
        assert "amplifies" in cells[0] and cells[1] == "chosen" and cells[2] == fmt(row["cohens_d"])
        assert cells[4] == f"{_auroc_by_hand(d):.3f}" and _auroc_by_hand(d) > 0.75  # planted: confounded
    assert pair_auroc(np.array([1.0, -1.0, 0.0])) == pytest.approx(0.5)
    # without per-pair features: the normal approximation from d, marked ≈
    loaded = AuditResult.load(result.save(tmp_path / "slim", with_features=False))
    d7 = float(result.concept(HOOK, 7)["cohens_d"])
    assert preference_auroc(loaded, HOOK, 7, d7) == (pytest.approx(float(result.concept(HOOK, 7)["pair_auroc"])),
                                                      True)  # the audit's own column, one definition
    slim = loaded.concepts.drop(columns=["pair_auroc"])
    loaded.concepts = slim
    assert preference_auroc(loaded, HOOK, 7, d7) == (pytest.approx(norm.cdf(d7)), False)
    assert f"≈{norm.cdf(d7):.3f}" in render_report(loaded) and "≈" not in box
    # nothing passes: the box says so and still names the strongest candidates
    null = audit_features(make_span_features(n_pairs=60, d_sae=40, seed=3, swap=True)[0], n_bootstrap=0,
                          n_data_clusters=1)
    assert "<b>No concept passes</b>" in render_report(null)


@pytest.mark.slow
def test_details_are_collapsed_and_empty_views_left_out(audited, page):
    result, _ = audited
    sections = re.findall(r'<details class="sec" id="([^"]+)"( open)?>', page)
    assert dict(sections) == {"about": "", "plots": "", "concepts": " open", "clusters": "", "data-clusters": "",
                              "concept-details": "", "cluster-details": ""}
    # every section of a concept or cluster is inside a collapsed block, which the page's script opens
    assert page.index('<details class="sec" id="concept-details">') < page.index(
        f'<section class="item" id="{anchor("concept", HOOK, 7)}">')
    assert "function reveal(id)" in SCRIPT and 'el.tagName === "DETAILS"' in SCRIPT
    assert "not tested" not in page  # data clusters with no test and clusters of one are left out
    toc = re.search(r'<nav class="toc">(.*?)</nav>', page, re.S).group(1)
    assert {h[1:] for h in re.findall(r'href="(#[^"]+)"', toc)} == {"learn", "next"} | set(dict(sections))
    one = audit_features(make_span_features(n_pairs=60, d_sae=40, planted=(3,), seed=2)[0], n_bootstrap=0,
                         n_data_clusters=1)
    assert 'id="data-clusters"' not in render_report(one)  # one data cluster: no data-cluster views


@pytest.mark.slow
def test_labels_fall_back_to_the_tokens_a_concept_fires_on(audited):
    import dataclasses

    result, _ = audited
    plain = result.concepts[result.concepts["label"].fillna("") == ""].iloc[0]
    hook, feature = str(plain["hook"]), int(plain["feature"])
    contexts = [{"hook": hook, "feature": feature, "source": "row 1", "token": t, "activation": 1.0, "text": "x"}
                for t in (" sorry", "cannot", " sorry", "<b>", "apolog")]
    page = render_report(dataclasses.replace(result, contexts=contexts))
    sid = anchor("concept", hook, feature)
    cell = re.search(rf'<tr id="row-{sid}">.*?<td class="lbl">(.*?)</td>', page, re.S).group(1)
    assert cell == "fires on “sorry”, “cannot”, “&lt;b&gt;”"  # distinct tokens, best first, escaped


@pytest.mark.slow
def test_cofiring_heatmap_shows_only_the_top_clusters(audited, monkeypatch):
    import lightning_anatomy.audit.report as report
    import lightning_anatomy.audit.report_cluster_views as views

    result, _ = audited
    drawn = []
    monkeypatch.setattr(views, "clustered_matrix_plot",
                        lambda mi, blocks, hook, names=None, title=None: drawn.append((mi.shape, blocks, names)) or "")
    monkeypatch.setattr(views, "MAX_HEATMAP_SIDE", 3)
    render_report(result)
    ((shape, blocks, names),) = drawn
    assert shape[0] == shape[1] == len(names) <= 3 and sum(n for _, n in blocks) == len(names)
    best = report.build_index(result).clusters.iloc[0]
    assert blocks[0][0] == int(best["cluster"]) and names[0].endswith(f"(c{int(best['cluster'])})")


@pytest.mark.slow
def test_plots_skip_what_the_result_lacks():
    features, _ = make_span_features(n_pairs=60, d_sae=40, planted=(3,), seed=2)
    result = audit_features(features, n_bootstrap=0, n_data_clusters=1, length_control=False)
    page = render_report(result)
    assert 'alt="histogram of delta"' in page and 'alt="volcano plot"' in page
    assert 'alt="length control scatter"' not in page and 'alt="per data cluster signals"' not in page
    assert_navigable(page, result)


@pytest.fixture(scope="module")
def paper_result():
    blocks = blocks_of(6, 10)
    chosen, rejected = np.array([0.1, 0.3, 0.5, 0.5, 0.6, 0.8]), np.array([0.8, 0.5, 0.5, 0.3, 0.4, 0.1])
    features = planted_spans(blocks, 80, chosen, rejected, n_pairs=240)
    rows = [PreferenceRow(f"Q{i} {EVIL}", f"chosen {i} & <b>", f"rejected {i}", int(rid))
            for i, rid in enumerate(features.row_ids)]
    assign = pd.DataFrame([(HOOK, m, f) for m, b in enumerate(blocks) for f in b], columns=["hook", "cluster", "feature"])
    return audit_features(features, rows=rows, method="paper", feature_clusters=assign, n_bootstrap=0,
                          labels={(HOOK, 3): f"label {EVIL}"})


@pytest.mark.slow
def test_paper_report_has_the_same_navigation(paper_result):
    result = paper_result
    page = render_report(result, max_concepts=30)
    assert_safe(page, EVIL)
    assert_navigable(page, result, max_concepts=30)
    assert "label &lt;script&gt;" in page and "Feature clusters (co-firing, Leiden)" in page
    assert 'alt="per data cluster signals"' in page and "Pairs leaning most with the cluster" in page
    labelled = section(page, anchor("cluster", HOOK, int(result.feature_clusters.set_index("feature").loc[3, "cluster"])))
    assert "label &lt;script&gt;" in labelled.split("</h3>")[0]  # a cluster is named by its members' labels


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


@pytest.mark.slow
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


FAKE_DOM = r"""
const script = require("fs").readFileSync(0, "utf8");
function el(attrs) {
  return {attrs: attrs || {}, handlers: {}, getAttribute(k) { return k in this.attrs ? this.attrs[k] : null; },
          setAttribute(k, v) { this.attrs[k] = String(v); }, removeAttribute(k) { delete this.attrs[k]; },
          addEventListener(t, f) { this.handlers[t] = f; }};
}
function cell(text, v) { const c = el(v === undefined ? {} : {"data-v": v}); c.textContent = text; return c; }
const heads = [el(), el()];
let rows = [["a", "10", "2.5"], ["b", "", "x"], ["c", "-3", "Infinity"], ["d", "2", "1"]]
  .map(([id, v, w]) => ({id, cells: [cell(v || "–", v), cell(w, w === "x" ? undefined : w)]}));
const body = {get rows() { return rows; }, appendChild(r) { rows = rows.filter(x => x !== r).concat([r]); }};
const table = {tHead: {rows: [{cells: heads}]}, tBodies: [body]};
global.document = {querySelectorAll: (s) => (s === "table.sortable" ? [table] : [])};
eval(script);
const order = () => rows.map(r => r.id).join("");
const out = [];
heads[0].handlers.click(); out.push(order(), heads[0].getAttribute("aria-sort"));
heads[0].handlers.click(); out.push(order(), heads[0].getAttribute("aria-sort"));
heads[1].handlers.keydown({key: "Enter", preventDefault() {}}); out.push(order(), heads[0].getAttribute("aria-sort"));
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_sort_script_orders_numbers_text_and_keeps_missing_last():
    done = subprocess.run(["node", "-e", FAKE_DOM], input=SCRIPT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # numbers by data-v, empty (NaN) last both ways; a cell without data-v sorts as text
    assert json.loads(done.stdout) == ["cdab", "ascending", "adcb", "descending", "dacb", None]
