"""The top of the report: "What will DPO learn from this data?" (the passing concepts by direction,
the strongest with their effect size and AUROC for "chosen"), the headline numbers and method note,
and the next-step box (edit the concept set, then train with it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lightning_anatomy.audit.report_html import anchor, esc, fmt
from lightning_anatomy.audit.report_index import ReportIndex
from lightning_anatomy.interventions.explain_away import pair_auroc

if TYPE_CHECKING:  # pragma: no cover
    from lightning_anatomy.audit.result import AuditResult

SUMMARY_CONCEPTS = 4  # concepts per direction in "What DPO will learn from this data"


def preference_auroc(result: AuditResult, hook: str, feature: int, cohens_d: float) -> tuple[float, bool]:
    """(the pair AUROC of ΔA for "chosen", exact), one definition with the tables' `pair_auroc`
    column (`interventions.pair_auroc`: P(ΔA > 0) + ½·P(ΔA = 0)): that column where the audit
    computed it, else from the result's span features, else the normal approximation Φ(d) from
    the paired effect size d = mean ΔA / sd ΔA (exact=False)."""
    try:
        column = result.concept(hook, feature).get("pair_auroc", np.nan)
    except KeyError:  # not a tested concept: the span features below may still have it
        column = np.nan
    if pd.notna(column):
        return float(column), True
    features = result.features
    if features is not None and hook in features.d_sae:
        try:
            chosen = features.get(hook, "chosen", result.stat)[:, int(feature)]
            rejected = features.get(hook, "rejected", result.stat)[:, int(feature)]
        except KeyError:  # the stored features lack this stat
            pass
        else:
            return pair_auroc(np.asarray((chosen - rejected).todense()).ravel()), True
    d = float(cohens_d) if pd.notna(cohens_d) else float("nan")
    return (0.5 * (1.0 + math.erf(d / math.sqrt(2.0))) if np.isfinite(d) else float("nan")), False  # Φ(d)


def _summary_row(index: ReportIndex, r: pd.Series) -> str:
    hook, f = str(r["hook"]), int(r["feature"])
    text, _ = index.label(hook, f)
    delta = float(r.get("delta", np.nan))
    auc, exact = preference_auroc(index.result, hook, f, r.get("cohens_d", np.nan))
    what = '<span class="amplify">↑ amplifies</span>' if delta > 0 else '<span class="suppress">↓ suppresses</span>'
    more = "" if text == f"feature {f}" else f" <small>· feature {f}</small>"
    return (f'<tr><td><a href="#{anchor("concept", hook, f)}">{esc(text)}</a>{more}</td><td>{what}</td>'
            f"<td>{'chosen' if delta > 0 else 'rejected'}</td><td>{fmt(r.get('cohens_d', np.nan))}</td>"
            f"<td>{fmt(delta)}</td><td>{'' if exact else '≈'}{_auc_text(auc)}</td></tr>")


def _auc_text(auc: float) -> str:
    return f"{auc:.3f}" if np.isfinite(auc) else "–"


def _side(n: int, action: str, side: str) -> str:
    return f'<span class="{action}">{action}</span> {n} {side}-leaning concept{"" if n == 1 else "s"}'


def dpo_summary_html(index: ReportIndex) -> str:
    """"What will DPO learn from this data?": the passing concepts' count by direction and the
    strongest of each side with its label, direction, effect size and confounding with the preference."""
    result = index.result
    c = result.concepts
    passing = c[c["passes"].astype(bool)] if "passes" in c.columns else c.head(0)
    n_up = int((passing["delta"] > 0).sum())
    n_down = int((passing["delta"] < 0).sum())
    o = result.options
    n_pairs = o.get("n_pairs", "?")
    if len(passing):
        lead = (f"<p><b>{len(passing)}</b> of {fmt(o.get('n_tested', len(c)))} tested concepts (SAE features) differ "
                f"reliably between the chosen and the rejected responses of these {fmt(n_pairs)} pairs (q &lt; "
                f"{fmt(o.get('alpha', 0.05))}, split halves agree). DPO on this data is predicted to "
                f"{_side(n_up, 'amplify', 'chosen')} and {_side(n_down, 'suppress', 'rejected')}. The strongest:</p>")
        shown = pd.concat([passing[passing["delta"] > 0].head(SUMMARY_CONCEPTS),
                           passing[passing["delta"] < 0].head(SUMMARY_CONCEPTS)]).sort_values("rank", kind="mergesort")
    else:
        lead = (f"<p><b>No concept passes</b> (q &lt; {fmt(o.get('alpha', 0.05))} with split halves agreeing) among "
                f"{fmt(o.get('n_tested', len(c)))} tested in {fmt(n_pairs)} pairs: this data gives DPO no reliable "
                "concept-level signal at this size. The strongest candidates, for what they are worth:</p>")
        shown = c.head(SUMMARY_CONCEPTS)
    rows = "".join(_summary_row(index, r) for _, r in shown.iterrows())
    head = ("<tr><th>concept (what it fires on)</th><th>DPO</th><th>leans to</th>"
            '<th title="Cohen\'s d_z: Δ / sd of the paired differences">effect d</th>'
            '<th title="mean chosen − rejected difference of the span statistic">Δ</th>'
            '<th title="pair AUROC: P(chosen has more of it than its rejected), ties ½">pair AUROC</th></tr>')
    note = ("<p><small>Effect d: 0.2 small, 0.5 medium, 0.8 large. pair AUROC: how often the concept alone "
            "tells which response of a pair was chosen: the share of pairs whose chosen response has more of "
            "it, ties ½ (0.5: unrelated to the preference; near 1 or 0: the preference and the concept go "
            "together, so DPO learns the concept along with whatever the labellers preferred)." + (" ≈: estimated from d (the result carries no per-pair features)."
                                        if "<td>≈" in rows else "")
            + " Each row links to the concept's contexts and pairs.</small></p>")
    return (f'<div class="learn" id="learn"><h2>What will DPO learn from this data?</h2>{lead}'
            f"<table>{head}{rows}</table>{note}</div>")

def summary_rows(result: AuditResult) -> list[tuple[str, Any]]:
    """The audit's headline numbers (the report's summary table; also `scripts/docs_images.py`)."""
    o = result.options
    rows = [("pairs", o.get("n_pairs")), ("hooks", ", ".join(map(str, o.get("hooks", [])))),
            ("span statistic", o.get("stat")), ("features tested", o.get("n_tested")),
            ("passing (q < α and split-half)", o.get("n_passing")), ("α", o.get("alpha")),
            ("bootstrap replicates", o.get("n_bootstrap")),
            ("mean chosen − rejected length (tokens)", o.get("mean_length_diff", float("nan")))]
    if result.method == "paper":
        rows.insert(1, ("method", "paper (feature-conditioned, Bergen et al. App. B.1)"))
        rows.insert(4, ("feature clusters", o.get("n_feature_clusters")))
    else:
        rows.insert(1, ("method", "paired (per-feature paired statistics)"))
        rows.insert(4, ("feature clusters", result.clusters["cluster"].nunique() if len(result.clusters) else 0))
    return rows


def next_steps_html(result: AuditResult, concept_set_dir: str, command: str) -> str:
    """The box that says what to do with this report: mark concepts, then train with them."""
    missing = ("" if result.saes else
               "<p><small>This result carries no SAEs, so saving it writes no concept set; make one with "
               "<code>result.to_concept_set(top=N, saes={hook: sae}).save(dir)</code>.</small></p>")
    return ('<div class="next" id="next"><h2>What to do next</h2><ol>'
            f"<li>Read the concepts below, then edit <code>{esc(concept_set_dir)}/concepts.yaml</code>: set "
            "<code>action: suppress</code>, <code>amplify</code> or <code>allow</code> per concept (each starts as "
            "<code>allow</code>; a concept's name there, <code>hook:feature</code>, is in its section).</li>"
            f"<li>Train with it:<pre><code>{esc(command)}</code></pre></li></ol>{missing}</div>")


def method_note(result: AuditResult) -> str:
    """What the numbers of this method mean (the "Audit settings and method" block)."""
    o = result.options
    if result.method == "paper":
        return ("<p>Method <b>paper</b>: a feature is active in a response when its firing frequency exceeds "
                f"τ = {fmt(o.get('tau', 0.01))}. Per pair and feature cluster, u = mean over members of "
                "1{chosen active} − 1{rejected active}; a cluster's predicted DPO shift is the dataset-wide "
                "mean ū. Split halves by index parity; Δ_min (the smaller half's Δ) ranks. Per-feature rows "
                "below use the same active indicator.</p>")
    return ("<p>Δ is the mean paired chosen − rejected difference of the span statistic; d = Δ/sd of the "
            "paired differences (d<sub>z</sub>); z the paired z, q the Benjamini–Hochberg q-value; "
            "'agree' means both fixed split halves give Δ of the same sign. Δ<sub>len</sub> is Δ at equal "
            "completion lengths. The predicted DPO effect follows the sign of Δ.</p>")
