"""The self-contained HTML report of an audit.

One file that opens offline: inline CSS, no scripts at all, plots as base64 PNGs drawn with
matplotlib's Agg canvas (no pyplot, so a user's backend is untouched). Dataset text is hostile
input: every string that reaches the page goes through `html.escape`, so a pair holding
`<script>` shows the tag instead of running it.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.audit.prediction import PredictionCheck
    from lightning_anatomy.audit.result import AuditResult

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}th,td{border:1px solid #ddd;padding:3px 6px;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 6px;border-radius:8px;font-size:.8em;color:#fff}
.pass{background:#2e7d32}.fail{background:#9e9e9e}.amplify{color:#1565c0}.suppress{color:#c62828}.none{color:#777}
.pair{border:1px solid #ddd;border-radius:4px;margin:.5em 0;padding:.4em .6em;font-size:.85em}
.pair pre{white-space:pre-wrap;margin:.2em 0;font-family:ui-monospace,Menlo,Consolas,monospace}
.ch{border-left:3px solid #2e7d32;padding-left:.5em}.rj{border-left:3px solid #c62828;padding-left:.5em}
.pr{border-left:3px solid #999;padding-left:.5em;color:#555}
.tok{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace}
.summary td{border:none;padding:1px 12px 1px 0}img{max-width:100%}
"""

CONCEPT_COLUMNS = ("rank", "hook", "feature", "label", "cluster", "delta", "cohens_d", "z", "welch_z", "ci_low",
                   "ci_high", "q_value", "delta_min", "delta_len_ctrl", "z_len_ctrl", "predicted_direction")


def esc(value: Any) -> str:
    """HTML-escaped text of any value (quotes included: safe in attributes too)."""
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """Compact number formatting; non-numbers are escaped as text."""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.4g}"
    return esc(value)


def png_data_uri(fig: Figure) -> str:
    canvas = FigureCanvasAgg(fig)
    buf = io.BytesIO()
    canvas.print_png(buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def volcano_plot(concepts: pd.DataFrame) -> str:
    """Δ vs −log10 q; passing concepts coloured by direction. Returns a data URI."""
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    if len(concepts):
        q = np.clip(concepts["q_value"].to_numpy(np.float64), 1e-300, 1.0)
        y = -np.log10(q)
        x = concepts["delta"].to_numpy(np.float64)
        passes = concepts["passes"].to_numpy(bool)
        ax.scatter(x[~passes], y[~passes], s=6, c="#9e9e9e", alpha=0.5, label="not passing", linewidths=0)
        for sign, colour, name in ((1, "#1565c0", "chosen-leaning"), (-1, "#c62828", "rejected-leaning")):
            sel = passes & (np.sign(x) == sign)
            ax.scatter(x[sel], y[sel], s=10, c=colour, label=name, linewidths=0)
        alpha = 0.05
        ax.axhline(-math.log10(alpha), color="#555", lw=0.8, ls="--")
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_xlabel("Δ (chosen − rejected)")
    ax.set_ylabel("−log10 q")
    ax.set_title("Volcano: disparity vs. evidence", fontsize=10)
    fig.tight_layout()
    return png_data_uri(fig)


def heatmap(matrix: np.ndarray, *, rows: Sequence[str], cols: Sequence[str], title: str, label: str,
            diverging: bool) -> str:
    """A labelled heatmap as a data URI (diverging colours centred on 0 for signed values)."""
    m = np.asarray(matrix, dtype=np.float64)
    h = min(9.0, 1.5 + 0.25 * max(len(rows), 1))
    w = min(12.0, 2.5 + 0.3 * max(len(cols), 1))
    fig = Figure(figsize=(w, h), dpi=100)
    ax = fig.add_subplot()
    finite = m[np.isfinite(m)]
    if diverging:
        lim = float(np.max(np.abs(finite))) if finite.size else 1.0
        image = ax.imshow(np.nan_to_num(m, nan=0.0, posinf=lim, neginf=-lim), cmap="RdBu_r",
                          vmin=-(lim or 1.0), vmax=lim or 1.0, aspect="auto")
    else:
        image = ax.imshow(np.nan_to_num(m), cmap="viridis", aspect="auto")
    if len(rows) <= 40:
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
    if len(cols) <= 40:
        ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=90)
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return png_data_uri(fig)


def table_html(frame: pd.DataFrame, columns: Iterable[str], *, badge: bool = False) -> str:
    cols = [c for c in columns if c in frame.columns]
    head = "".join(f"<th>{esc(c)}</th>" for c in cols) + ("<th>split-half</th>" if badge else "")
    body = []
    for _, row in frame.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            cls = ' class="num"' if isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) else ""
            if c == "predicted_direction":
                cells.append(f'<td class="{esc(v)}">{esc(v)}</td>')
            elif isinstance(v, list | np.ndarray):
                cells.append(f"<td>{esc(', '.join(map(str, list(v)[:12])) + (' …' if len(v) > 12 else ''))}</td>")
            else:
                cells.append(f"<td{cls}>{fmt(v)}</td>")
        if badge:
            ok = bool(row["split_half_agree"])
            cells.append(f'<td><span class="badge {"pass" if ok else "fail"}">{"agree" if ok else "disagree"}</span></td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_MARKED = re.compile(r"«(.+?)»\((-?\d+(?:\.\d+)?)\)", re.S)


def highlighted_context(text: str, peak: float) -> str:
    """A `concepts.labels` context (`«token»(activation)` marks the firing tokens) as escaped HTML,
    each marked token on a background whose opacity is its activation relative to the peak."""
    parts, last = [], 0
    top = peak if peak > 0 else 1.0
    for m in _MARKED.finditer(text):
        parts.append(esc(text[last:m.start()]))
        act = float(m.group(2))
        alpha = max(0.05, min(1.0, act / top))
        parts.append(f'<span title="{act:.3g}" style="background:rgba(255,140,0,{alpha:.2f})">{esc(m.group(1))}</span>')
        last = m.end()
    parts.append(esc(text[last:]))
    return '<div class="tok">' + "".join(parts) + "</div>"


def _contexts_html(contexts: Sequence[dict[str, Any]], hook: str, feature: int, limit: int = 5) -> str:
    mine = [c for c in contexts if c.get("hook") == hook and int(c.get("feature", -1)) == feature][:limit]
    if not mine:
        return ""
    blocks = [f'<div class="pair"><small>{esc(c.get("source", ""))} · peak {fmt(float(c.get("activation", 0.0)))}'
              f"</small>{highlighted_context(str(c.get('text', '')), float(c.get('activation', 0.0)))}</div>"
              for c in mine]
    return "<h4>Where it fires (firing tokens highlighted)</h4>" + "".join(blocks)


def _pair_html(tr: pd.Series) -> str:
    return (
        f'<div class="pair"><small>row {esc(tr["row_id"])} · contribution {fmt(tr["contribution"])} '
        f'(chosen {fmt(tr["chosen_value"])}, rejected {fmt(tr["rejected_value"])}) · share {fmt(tr["share"])}</small>'
        f'<pre class="pr">{esc(tr["prompt"])}</pre><pre class="ch">{esc(tr["chosen"])}</pre>'
        f'<pre class="rj">{esc(tr["rejected"])}</pre></div>'
    )


def _traces_html(result: AuditResult) -> str:
    if result.traces.empty:
        return "<p>No concept was traced.</p>"
    out = []
    for (hook, feature), part in result.traces.groupby(["hook", "feature"], sort=False):
        row = result.concepts[(result.concepts["hook"] == hook) & (result.concepts["feature"] == feature)]
        label = f" — {esc(row['label'].iloc[0])}" if len(row) and row["label"].iloc[0] else ""
        head = f"<h3>{esc(hook)} · feature {esc(feature)}{label}</h3>"
        if len(row):
            r = row.iloc[0]
            head += (f"<p>Δ {fmt(r['delta'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}], d {fmt(r['cohens_d'])}, "
                     f"q {fmt(r['q_value'])}, predicted <span class=\"{esc(r['predicted_direction'])}\">"
                     f"{esc(r['predicted_direction'])}</span></p>")
        ctx = _contexts_html(result.contexts, str(hook), int(feature))
        pairs = "".join(_pair_html(tr) for _, tr in part.iterrows())
        out.append(head + ctx + "<h4>Pairs contributing most</h4>" + pairs)
    return "".join(out)


def _heatmaps_html(result: AuditResult) -> str:
    parts = []
    local = result.local
    if len(local):
        dcs = sorted(local["data_cluster"].unique())
        # the 40 feature clusters with the strongest local evidence anywhere (local-only ones included)
        strength = local.assign(_a=local["z"].abs()).groupby("cluster")["_a"].max()
        fcs = [int(c) for c in strength.sort_values(ascending=False, kind="mergesort").index[:40]]
        if dcs and fcs:
            grid = np.full((len(dcs), len(fcs)), np.nan)
            pos_d = {d: i for i, d in enumerate(dcs)}
            pos_f = {f: j for j, f in enumerate(fcs)}
            for d, f, z in local[["data_cluster", "cluster", "z"]].itertuples(index=False):
                if int(f) in pos_f:
                    grid[pos_d[d], pos_f[int(f)]] = z
            uri = heatmap(grid, rows=[f"data {d}" for d in dcs], cols=[f"fc {f}" for f in fcs],
                          title="Local paired z: data cluster × feature cluster", label="z", diverging=True)
            parts.append(f'<img alt="local z heatmap" src="{uri}">')
    for hook, mi in result.cofiring.items():
        assign = result.feature_clusters[result.feature_clusters["hook"] == hook].head(40)
        k = min(len(assign), mi.shape[0])
        if k > 1:  # the best-ranked clusters come first in the stored order
            names = [f"{f} (c{c})" for f, c in zip(assign["feature"][:k], assign["cluster"][:k])]
            uri = heatmap(mi[:k, :k], rows=names, cols=names, label="MI (nats)", diverging=False,
                          title=f"Co-firing MI of the top features, ordered by cluster ({hook})")
            parts.append(f'<img alt="co-firing heatmap {esc(hook)}" src="{uri}">')
    return "".join(parts) or "<p>No clusters to show.</p>"


# ---- the paper method's views (feature clusters with members, labels, examples; local table) -------------


def _member_list(result: AuditResult, hook: str, members: Sequence[int], limit: int = 12) -> str:
    labels = {int(f): str(lbl) for h, f, lbl in result.concepts[["hook", "feature", "label"]].itertuples(index=False)
              if h == hook and isinstance(lbl, str) and lbl} if len(result.concepts) else {}
    items = [f"{int(f)}" + (f" <small>({esc(labels[int(f)])})</small>" if int(f) in labels else "")
             for f in list(members)[:limit]]
    more = f" … (+{len(members) - limit})" if len(members) > limit else ""
    return ", ".join(items) + more


def _examples_html(result: AuditResult, cluster: int, limit: int = 2) -> str:
    ex = result.cluster_examples
    if ex is None or ex.empty:
        return ""
    mine = ex[ex["cluster"] == cluster].head(limit)
    out = []
    for _, e in mine.iterrows():
        out.append(f'<div class="pair"><small>row {esc(e["row_id"])} · u {fmt(float(e["u"]))}</small>'
                   f'<pre class="pr">{esc(e.get("prompt", ""))}</pre><pre class="ch">{esc(e.get("chosen", ""))}</pre>'
                   f'<pre class="rj">{esc(e.get("rejected", ""))}</pre></div>')
    return "".join(out)


def paper_cluster_table(result: AuditResult, limit: int = 50) -> str:
    """Feature clusters: members (with labels), prediction ū, split-half Δ_min, evidence, example pairs."""
    clusters = result.clusters.head(limit)
    if clusters.empty:
        return "<p>No feature clusters (too few co-firing features; see cofire_min_tokens, min_cluster_size).</p>"
    head = "".join(f"<th>{esc(c)}</th>" for c in ("rank", "hook", "cluster", "size", "members (labels)",
                                                   "predicted ū", "Δ_min", "Welch z", "d", "q", "direction", "examples"))
    body = []
    for _, r in clusters.iterrows():
        body.append(
            f"<tr><td class=\"num\">{fmt(r['rank'])}</td><td>{esc(r['hook'])}</td><td class=\"num\">{fmt(r['cluster'])}</td>"
            f"<td class=\"num\">{fmt(r['size'])}</td><td>{_member_list(result, str(r['hook']), list(r['features']))}</td>"
            f"<td class=\"num\">{fmt(r['predicted_shift'])}</td><td class=\"num\">{fmt(r['delta_min'])}</td>"
            f"<td class=\"num\">{fmt(r['welch_z'])}</td><td class=\"num\">{fmt(r['cohens_d'])}</td>"
            f"<td class=\"num\">{fmt(r['q_value'])}</td>"
            f"<td class=\"{esc(r['predicted_direction'])}\">{esc(r['predicted_direction'])}</td>"
            f"<td>{_examples_html(result, int(r['cluster']))}</td></tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def paper_local_views(result: AuditResult, limit: int = 50) -> str:
    """The data cluster × feature cluster grid (Δ heatmap) and the ranked inside-vs-outside table."""
    local = result.local
    if local is None or local.empty:
        return "<p>No data cluster × feature cluster table (fewer than two data clusters).</p>"
    dcs = sorted(int(d) for d in local["data_cluster"].unique())
    fcs = [int(c) for c in result.clusters["cluster"].head(40)] if len(result.clusters) else []
    parts = []
    if dcs and fcs:
        grid = np.full((len(dcs), len(fcs)), np.nan)
        pos_d = {d: i for i, d in enumerate(dcs)}
        pos_f = {f: j for j, f in enumerate(fcs)}
        for d, f, v in local[["data_cluster", "cluster", "delta"]].itertuples(index=False):
            if int(f) in pos_f:
                grid[pos_d[int(d)], pos_f[int(f)]] = v
        sizes = local.groupby("data_cluster")["n_pairs"].first()
        uri = heatmap(grid, rows=[f"data {d} (n={int(sizes.loc[d])})" for d in dcs], cols=[f"fc {f}" for f in fcs],
                      title="Inside − outside disparity Δ: data cluster × feature cluster", label="Δ", diverging=True)
        parts.append(f'<img alt="data cluster x feature cluster heatmap" src="{uri}">')
    silent = int((result.data_clusters["data_cluster"] < 0).sum()) if len(result.data_clusters) else 0
    parts.append(f"<p>{silent} silent pairs (symmetric activity below the "
                 f"{fmt(result.options.get('silent_percentile', 5.0))}th percentile) are set aside. Filters: |T_m| ≥ "
                 f"{fmt(result.options.get('local_min_features', 10))}, n_k ≥ {fmt(result.options.get('local_min_pairs', 25))}"
                 ", split halves (index parity) agree; ranked by |Δ_min|.</p>")
    parts.append(table_html(local.head(limit), ("rank", "data_cluster", "n_pairs", "hook", "cluster", "size",
                                                "mean_inside", "mean_outside", "delta", "welch_z", "cohens_d",
                                                "delta_min", "passes", "global_delta"), badge=True))
    return "".join(parts)


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
    return ("<h2>Prediction check: predicted vs observed cluster shifts on rollouts</h2>"
            f'<table class="summary">{summary}</table><img alt="prediction scatter" src="{uri}">'
            + table_html(table, ("hook", "cluster", "n_features", "label", "predicted", "observed", "before", "after"))
            + (f"<h3>Example rollouts</h3>{examples}" if examples else ""))


def prediction_page(check: PredictionCheck, *, title: str = "Prediction check") -> str:
    """`prediction_section` as one offline HTML page."""
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{prediction_section(check)}</body></html>")


def render_report(result: AuditResult, *, max_concepts: int = 100, title: str = "Dataset anatomy",
                  prediction: PredictionCheck | None = None) -> str:
    """The full HTML page of `result` (a string; `AuditResult.save` writes it as report.html), with
    the section of a `check_prediction` result when `prediction` is given."""
    o = result.options
    concepts = result.concepts
    summary = [("pairs", o.get("n_pairs")), ("hooks", ", ".join(map(str, o.get("hooks", [])))),
               ("span statistic", o.get("stat")), ("features tested", o.get("n_tested")),
               ("passing (q < α and split-half)", o.get("n_passing")), ("α", o.get("alpha")),
               ("bootstrap replicates", o.get("n_bootstrap")),
               ("mean chosen − rejected length (tokens)", o.get("mean_length_diff", float("nan")))]
    summary_html = "".join(f"<tr><td>{esc(k)}</td><td>{fmt(v)}</td></tr>" for k, v in summary)
    if o.get("method") == "paper":
        summary.insert(1, ("method", "paper (feature-conditioned, Bergen et al. App. B.1)"))
        summary.insert(4, ("feature clusters", o.get("n_feature_clusters")))
    local_only = (result.local[result.local.get("local_only", pd.Series(dtype=bool)).astype(bool)]
                  if len(result.local) and "local_only" in result.local.columns else result.local.head(0))
    sections = [
        f"<h1>{esc(title)}</h1><table class=\"summary\">{summary_html}</table>",
        "<p>Δ is the mean paired chosen − rejected difference of the span statistic; d = Δ/sd of the "
        "paired differences (d<sub>z</sub>); z the paired z, q the Benjamini–Hochberg q-value; "
        "'agree' means both fixed split halves give Δ of the same sign. Δ<sub>len</sub> is Δ at equal "
        "completion lengths. The predicted DPO effect follows the sign of Δ.</p>",
        f'<h2>Volcano plot</h2><img alt="volcano plot" src="{volcano_plot(concepts)}">',
        f"<h2>Ranked concepts (top {min(max_concepts, len(concepts))} of {len(concepts)})</h2>",
        table_html(concepts.head(max_concepts), CONCEPT_COLUMNS, badge=True),
        "<h2>Example pairs of the top concepts</h2>", _traces_html(result),
    ]
    if o.get("method") == "paper":
        sections[1] = ("<p>Method <b>paper</b>: a feature is active in a response when its firing frequency exceeds "
                       f"τ = {fmt(o.get('tau', 0.01))}. Per pair and feature cluster, u = mean over members of "
                       "1{chosen active} − 1{rejected active}; a cluster's predicted DPO shift is the dataset-wide "
                       "mean ū. Split halves by index parity; Δ_min (the smaller half's Δ) ranks. Per-feature rows "
                       "below use the same active indicator.</p>")
        sections += ["<h2>Feature clusters (co-firing, Leiden)</h2>", paper_cluster_table(result),
                     "<h2>Data cluster × feature cluster (inside vs outside)</h2>", paper_local_views(result)]
    else:
        sections += [
            "<h2>Feature clusters</h2>",
            table_html(result.clusters.head(50), ("rank", "hook", "cluster", "size", "features", "delta", "cohens_d",
                                                  "z", "ci_low", "ci_high", "q_value", "predicted_direction"), badge=True)
            if len(result.clusters) else "<p>No feature clusters.</p>",
            "<h2>Cluster heatmaps</h2>", _heatmaps_html(result),
            "<h2>Local signals (data cluster × feature cluster, passing only locally)</h2>",
            table_html(local_only.head(50), ("data_cluster", "n_pairs", "hook", "cluster", "delta", "z", "q_value",
                                             "global_delta", "global_z"), badge=True)
            if len(local_only) else "<p>No local-only signal.</p>",
        ]
    if prediction is not None:
        sections.append(prediction_section(prediction))
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{''.join(sections)}</body></html>")
