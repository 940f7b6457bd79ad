"""The self-contained HTML report of an audit, laid out to be navigated.

One file that opens offline: inline CSS, plots as base64 PNGs drawn with matplotlib's Agg canvas
(no pyplot, so a user's backend is untouched) and ONE inline script of our own, which sorts a
table when its header is clicked; it reads only our `data-v` attributes and cell text and moves
rows, it never writes HTML. A Content-Security-Policy admits that script (by hash), inline styles
and `data:` images, nothing else: no network, no other script. Dataset text is hostile input:
every string that reaches the page goes through `html.escape`, so a pair holding `<script>` shows
the tag instead of running it.

Navigation: each ranked-concept row links to its section `concept-<hook>-<feature>` and each
feature-cluster row to `cluster-<hook>-<id>` (`anchor` makes them valid ids); each section links
back to its row, `row-<section id>`.

The page is assembled here (`render_report`, `prediction_page`) from its parts: `report_index`
(what it knows per concept and cluster), `report_summary` (what DPO will learn, the next step),
`report_tables` (ranked concepts, feature clusters), `report_sections` (a section per concept and
cluster), `report_cluster_views` (heatmaps, data clusters), `report_html` (building blocks) and
`report_plots` (plots). Their public names are importable from here too.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.audit.prediction import PredictionCheck
    from lightning_anatomy.audit.result import AuditResult

from lightning_anatomy.audit.report_cluster_views import (  # noqa: F401  (re-exported)
    GRID_COLUMNS,
    MAX_HEATMAP_SIDE,
    data_cluster_table,
    data_cluster_views,
    heatmaps_html,
    paper_local_views,
)
from lightning_anatomy.audit.report_html import (  # noqa: F401  (SCRIPT, SCRIPT_TAG, anchor, fmt: re-exported)
    SCRIPT,
    SCRIPT_TAG,
    anchor,
    details_html,
    esc,
    fmt,
    html_page,
    table_html,
)
from lightning_anatomy.audit.report_index import ReportIndex, build_index  # noqa: F401  (ReportIndex: re-exported)
from lightning_anatomy.audit.report_plots import (  # noqa: F401  (draw_*, plots: re-exported)
    _figure,
    _img,
    clustered_matrix_plot,
    data_cluster_plot,
    draw_delta_histogram,
    draw_volcano,
    heatmap,
    length_control_plot,
    volcano_plot,
)
from lightning_anatomy.audit.report_sections import (  # noqa: F401  (re-exported)
    MAX_CLUSTER_HEATMAPS,
    cluster_section,
    cluster_sections,
    concept_section,
    highlighted_context,
)
from lightning_anatomy.audit.report_summary import (  # noqa: F401  (re-exported)
    SUMMARY_CONCEPTS,
    dpo_summary_html,
    method_note,
    next_steps_html,
    pair_auroc,
    preference_auroc,
    summary_rows,
)
from lightning_anatomy.audit.report_tables import (  # noqa: F401  (re-exported)
    STAT_KEYS,
    clusters_table,
    concepts_table,
    paper_cluster_table,
)

CONCEPT_COLUMNS = ("rank", "hook", "feature", "label", "cluster", "delta", "cohens_d", "z", "welch_z", "ci_low",
                   "ci_high", "q_value", "delta_min", "delta_len_ctrl", "z_len_ctrl", "predicted_direction")


def train_command(concept_set_dir: str, *, policy: str | None = None, source: str | None = None) -> str:
    """The command that trains with an edited concept set (the one place that spells it): the tiny
    fit config with the audited model and data, plus a gradient projection of the suppressed concepts."""
    parts = ["anatomy fit --config configs/tiny.yaml"]
    parts += [f"--model.policy={policy}"] if policy else []
    parts += [f"--data.source={source}"] if source else []
    parts += ["--trainer.callbacks+=lightning_anatomy.ConceptProjection",
              f"--trainer.callbacks.concepts={concept_set_dir}", "--trainer.callbacks.layers=all_later"]
    return " ".join(parts)


# ---- prediction check --------------------------------------------------------------------------------------


def prediction_section(check: PredictionCheck) -> str:
    """The report section of a `check_prediction` result: numbers, scatter, per-cluster table."""
    st = check.settings
    uri = "data:image/png;base64," + base64.b64encode(check.scatter_png()).decode("ascii")
    lo, hi = check.r2_ci
    rows = [("R² (squared Pearson)", check.r2), (f"{fmt(100 * st.get('confidence', 0.95))}% bootstrap CI over clusters",
                                                 f"[{fmt(lo)}, {fmt(hi)}]"),
            ("R² (OLS through the origin)", check.r2_ols), ("sign agreement", check.sign_agreement),
            ("clusters", check.n_clusters), ("prompts × samples", f"{st.get('n_prompts')} × {st.get('samples_per_prompt')}"),
            ("temperature / max new tokens", f"{st.get('temperature')} / {st.get('max_new_tokens')}"),
            ("measure (τ)", f"{st.get('measure')} ({st.get('tau')})"), ("encoded with", st.get("encode_with"))]
    summary = "".join(f"<tr><td>{esc(k)}</td><td>{fmt(v) if not isinstance(v, str) else esc(v)}</td></tr>" for k, v in rows)
    examples = "".join(f'<div class="pair"><pre class="pr">{esc(e["prompt"])}</pre><small>before</small>'
                       f'<pre class="rj">{esc(e["before"])}</pre><small>after</small><pre class="ch">{esc(e["after"])}</pre></div>'
                       for e in check.examples)
    table = check.table.reindex(check.table["observed"].abs().sort_values(ascending=False).index).head(50)
    return ('<h2 id="prediction">Prediction check: predicted vs observed cluster shifts on rollouts</h2>'
            f'<table class="summary">{summary}</table><img alt="prediction scatter" src="{uri}">'
            + table_html(table, ("hook", "cluster", "n_features", "label", "predicted", "observed", "before", "after"))
            + (f"<h3>Example rollouts</h3>{examples}" if examples else ""))


def prediction_page(check: PredictionCheck, *, title: str = "Prediction check") -> str:
    """`prediction_section` as one offline HTML page."""
    return html_page(title, prediction_section(check))


# ---- the page ------------------------------------------------------------------------------------------


def _plots_html(result: AuditResult) -> str:
    concepts = result.concepts
    uris = [(volcano_plot(concepts), "volcano plot"), (_figure(draw_delta_histogram, concepts), "histogram of delta"),
            (length_control_plot(concepts), "length control scatter"),
            (data_cluster_plot(result), "per data cluster signals")]
    return '<div class="plots">' + "".join(_img(u, alt) for u, alt in uris if u) + "</div>"


def render_report(result: AuditResult, *, max_concepts: int = 100, title: str = "Dataset anatomy",
                  prediction: PredictionCheck | None = None, next_command: str | None = None,
                  concept_set_dir: str | None = None) -> str:
    """The full HTML page of `result` (a string; `AuditResult.save` writes it as report.html), with
    the section of a `check_prediction` result when `prediction` is given.

    On top, what DPO will learn from this data (`dpo_summary_html`) and what to do next; below, the
    ranked concepts and the detail sections, collapsed (`<details>`: a link into one opens it), the
    views with nothing to show left out.

    `concept_set_dir` is where the ConceptSet export lies (`AuditResult.save` passes
    `<audit dir>/concept_set`); `next_command` the training command the page suggests (None:
    `train_command(concept_set_dir)`).
    """
    summary = "".join(f"<tr><td>{esc(k)}</td><td>{fmt(v)}</td></tr>" for k, v in summary_rows(result))
    if result.concepts.empty or not {"hook", "feature", "rank"} <= set(result.concepts.columns):
        return html_page(title, f'<h1>{esc(title)}</h1><table class="summary">{summary}</table>'
                                "<p>No feature was tested (none fired often enough): nothing to rank.</p>")
    index = build_index(result, max_concepts)
    concept_set_dir = concept_set_dir or "<audit dir>/concept_set"
    command = next_command if next_command is not None else train_command(concept_set_dir)
    n = len(result.concepts)
    n_clusters = len(index.clusters)
    # (id, title, hint shown while closed, body, open)
    blocks: list[tuple[str, str, str, str, bool]] = [
        ("about", "Audit settings and method", f"{fmt(result.options.get('n_pairs'))} pairs, "
         f"{fmt(result.options.get('n_tested'))} features tested, method {result.method}",
         f'<table class="summary">{summary}</table>{method_note(result)}', False),
        ("plots", "Plots", "volcano, Δ distribution, length control, data clusters", _plots_html(result), False),
        ("concepts", f"Ranked concepts (top {min(max_concepts, n)} of {n})", "click a header to sort",
         "<p>Click a feature for its contexts and pairs, a cluster for its members.</p>" + concepts_table(index), True),
    ]
    if n_clusters:
        body = clusters_table(index)
        if result.method != "paper":
            heat = heatmaps_html(result, index)
            body += f"<h3>Cluster heatmaps</h3>{heat}" if "<img" in heat else ""
        name = "Feature clusters (co-firing, Leiden)" if result.method == "paper" else "Feature clusters"
        blocks.append(("clusters", name, f"{n_clusters} clusters of two or more co-firing features", body, False))
    data_views = data_cluster_views(result, index)
    if data_views:
        name = ("Data cluster × feature cluster (inside vs outside)" if result.method == "paper"
                else "Data clusters")
        blocks.append(("data-clusters", name, "signals inside groups of similar prompts", data_views, False))
    blocks.append(("concept-details", "Concept details", f"{len(index.listed)} concepts: where each fires, its pairs",
                   "".join(concept_section(index, r) for _, r in index.listed.iterrows()), False))
    if n_clusters:
        blocks.append(("cluster-details", "Cluster details", "members, co-firing, examples", cluster_sections(index),
                       False))
    toc = [("learn", "What DPO will learn"), ("next", "What to do next"), *((b[0], b[1].split(" (")[0]) for b in blocks)]
    toc += [("prediction", "Prediction check")] if prediction is not None else []
    sections = [
        f"<h1>{esc(title)}</h1>", dpo_summary_html(index), next_steps_html(result, concept_set_dir, command),
        '<nav class="toc">' + "".join(f'<a href="#{k}">{esc(v)}</a>' for k, v in toc) + "</nav>",
        *(details_html(sid, name, body, hint, open_=is_open) for sid, name, hint, body, is_open in blocks),
    ]
    if prediction is not None:
        sections.append(prediction_section(prediction))
    return html_page(title, "".join(sections))
