"""HTML building blocks of the audit report: escaping, cells, sortable tables, the page shell.

Dataset text is hostile input: every string that reaches the page goes through `esc`
(`html.escape`, quotes included), so a pair holding `<script>` shows the tag instead of running
it. The page carries ONE inline script of ours, which sorts a table when its header is clicked
(it reads only our `data-v` attributes and cell text and moves rows, never writes HTML), and a
Content-Security-Policy that admits that script by hash, inline styles and `data:` images only.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    pass


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1360px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:1.05em;margin:.2em 0}
h4{margin:.6em 0 .2em}
.tw{overflow:auto;max-height:72vh;border:1px solid #ddd;margin:.5em 0}
table{border-collapse:separate;border-spacing:0;font-size:.82em}
th,td{border-bottom:1px solid #e6e6e6;border-right:1px solid #eee;padding:3px 6px;vertical-align:top}
.tw thead th{position:sticky;top:0;z-index:1;background:#f1f1f1;white-space:nowrap;text-align:left}
table.sortable thead th{cursor:pointer}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.lbl{min-width:16em;max-width:32em}td.dir,td.nw{white-space:nowrap}td.mem{min-width:14em;max-width:30em}
tr:target>td,section:target{background:#fff6d8}
.badge{display:inline-block;padding:1px 6px;border-radius:8px;font-size:.8em;color:#fff}
.pass{background:#2e7d32}.fail{background:#9e9e9e}.amplify{color:#1565c0}.suppress{color:#c62828}.none{color:#777}
.unl{color:#777;font-style:italic}
.pair{border:1px solid #ddd;border-radius:4px;margin:.5em 0;padding:.4em .6em;font-size:.85em}
.pair pre{white-space:pre-wrap;margin:.2em 0;font-family:ui-monospace,Menlo,Consolas,monospace}
.ch{border-left:3px solid #2e7d32;padding-left:.5em}.rj{border-left:3px solid #c62828;padding-left:.5em}
.pr{border-left:3px solid #999;padding-left:.5em;color:#555}
.tok{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace}
.summary td{border:none;padding:1px 12px 1px 0}img{max-width:100%}
.next{border:2px solid #1565c0;border-radius:6px;padding:.4em 1em;background:#f5f9ff;margin:1em 0}
.next h2{margin-top:.3em;border:none}.next pre{background:#fff;border:1px solid #cfd8e3;padding:.4em .6em;white-space:pre-wrap;word-break:break-all}
nav.toc{font-size:.9em}nav.toc a{margin-right:1em}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:1em;align-items:start}
section.item{border-top:1px solid #eee;padding:.6em .4em;scroll-margin-top:.5em}
.back{font-size:.85em}.legend{font-size:.8em;color:#555;margin:.2em 0 1em}
details.sec{margin-top:1.2em;border-bottom:1px solid #ddd}details.sec>summary{cursor:pointer;padding:.2em 0}
details.sec>summary>h2{display:inline;border:none;margin:0;font-size:1.15em}
details.sec>summary .hint{color:#777;font-size:.85em;margin-left:.6em}
.learn{border:2px solid #2e7d32;border-radius:6px;padding:.4em 1em .6em;background:#f6fbf6;margin:1em 0}
.learn h2{margin-top:.3em;border:none}.learn table td,.learn table th{padding:3px 10px 3px 0;border:none;text-align:left}
.learn table th{font-weight:600;color:#444;border-bottom:1px solid #cfe3cf}.learn p{margin:.4em 0}
.learn small{color:#666}
"""

# Sorts a table.sortable by the clicked column: numbers by data-v (empty = NaN, always last), other
# cells by their text; opens the collapsed <details> a followed link points into. Reads attributes
# and textContent only, sets `open` on details; never writes markup.
SCRIPT = """(function () {
  function key(cell) {
    var v = cell.getAttribute("data-v");
    if (v === null) { return cell.textContent.trim().toLowerCase(); }
    return v === "" ? NaN : Number(v);
  }
  function order(x, y) {
    if (typeof x === "number" && typeof y === "number") { return x - y; }
    return String(x).localeCompare(String(y), undefined, {numeric: true});
  }
  // A link into a collapsed <details> section opens it (and its ancestors) before the jump.
  function reveal(id) {
    for (var el = id ? document.getElementById(id) : null; el; el = el.parentElement) {
      if (el.tagName === "DETAILS") { el.open = true; }
    }
  }
  function hashId(href) { try { return decodeURIComponent(href.slice(1)); } catch (e) { return ""; } }
  if (typeof window !== "undefined" && document.addEventListener) {
    document.addEventListener("click", function (e) {
      var a = e.target && e.target.closest ? e.target.closest("a[href^='#']") : null;
      if (a) { reveal(hashId(a.getAttribute("href"))); }
    });
    window.addEventListener("hashchange", function () { reveal(hashId(window.location.hash)); });
    if (window.location.hash) { reveal(hashId(window.location.hash)); }
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.tabIndex = 0;
      function sort() {
        var asc = th.getAttribute("aria-sort") !== "ascending";
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (r, s) {
          var x = key(r.cells[col]), y = key(s.cells[col]);
          var xn = x !== x, yn = y !== y;
          if (xn || yn) { return xn - yn; }
          return asc ? order(x, y) : order(y, x);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); }
      });
    });
  });
})();"""

SCRIPT_TAG = '<script id="report-sort">'  # the page's only script block (tests look for it)
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       f"script-src 'sha256-{base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()}'")

# short header -> what it means (the tables' legends and header tooltips)
LEGEND = {
    "Δ": "mean paired chosen − rejected difference of the span statistic",
    "CI": "bootstrap confidence interval of Δ",
    "d": "Cohen's d_z: Δ / sd of the paired differences",
    "z": "paired z",
    "Welch z": "Welch z of chosen vs rejected",
    "q": "Benjamini–Hochberg q-value",
    "Δmin": "the split half with the smaller |Δ| (0 when the halves disagree in sign)",
    "Δlen": "Δ at equal completion lengths (length control)",
    "zlen": "z of Δlen",
    "ū": "predicted DPO shift: mean over pairs of u (members active in chosen − in rejected)",
    "split-half": "both split halves give Δ of the same sign",
    "direction": "predicted DPO effect where the row passes (q < α and split halves agree); none otherwise",
    "λ": ("how much of the preference the concept alone explains (Bradley–Terry MLE of ΔA on the preferences; "
          "∞: it orders every differing pair — perfect confounding, per-pair methods cannot separate it)"),
    "pair AUROC": "P(chosen has more of it than its rejected), ties ½",
    "pairs ≠": "pairs whose chosen and rejected differ in it: what λ and the pair AUROC rest on",
}

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


def anchor(kind: str, hook: str, key: Any) -> str:
    """A valid, CSS-safe element id for (kind, hook, key): anything but [A-Za-z0-9_-] becomes '-'."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"{kind}-{hook}-{key}")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_)


def _sort_value(v: Any) -> str:
    """The `data-v` a numeric cell sorts by (JavaScript `Number` syntax; '' for NaN)."""
    v = float(v)
    if math.isnan(v):
        return ""
    return ("Infinity" if v > 0 else "-Infinity") if math.isinf(v) else repr(v)


def num_td(v: Any) -> str:
    return f'<td class="num" data-v="{_sort_value(v)}">{fmt(v)}</td>' if _is_number(v) else f"<td>{fmt(v)}</td>"


def badge_td(ok: Any) -> str:
    ok = bool(ok)
    return (f'<td data-v="{int(ok)}"><span class="badge {"pass" if ok else "fail"}">'
            f'{"agree" if ok else "disagree"}</span></td>')


def direction_td(direction: Any) -> str:
    return f'<td class="dir {esc(direction)}">{esc(direction)}</td>'


def ci_td(low: Any, high: Any) -> str:
    return f'<td class="num" data-v="{_sort_value(low)}">[{fmt(low)}, {fmt(high)}]</td>'


def wrap_table(head: Sequence[str], rows: Iterable[str], *, sortable: bool = True) -> str:
    """A table in its own scroll container (the page never scrolls sideways), sticky header; `head`
    are short names, explained by `LEGEND` in their tooltips."""
    cells = "".join(f'<th title="{esc(LEGEND[h])}">{esc(h)}</th>' if h in LEGEND else f"<th>{esc(h)}</th>"
                    for h in head)
    cls = ' class="sortable"' if sortable else ""
    return f'<div class="tw"><table{cls}><thead><tr>{cells}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def legend_html(heads: Iterable[str]) -> str:
    used = [h for h in dict.fromkeys(heads) if h in LEGEND]
    if not used:
        return ""
    return ('<p class="legend">' + " · ".join(f"<b>{esc(h)}</b>: {esc(LEGEND[h])}" for h in used)
            + ". Click a header to sort.</p>")


def table_html(frame: pd.DataFrame, columns: Iterable[str], *, badge: bool = False) -> str:
    """Any table's `columns` (those present), sortable, numbers right-aligned; `badge`: split-half column."""
    cols = [c for c in columns if c in frame.columns]
    rows = []
    for _, row in frame.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if c == "predicted_direction":
                cells.append(direction_td(v))
            elif isinstance(v, list | np.ndarray):
                items = list(v)
                cells.append(f"<td>{esc(', '.join(map(str, items[:12])) + (' …' if len(items) > 12 else ''))}</td>")
            else:
                cells.append(num_td(v))
        if badge:
            cells.append(badge_td(row["split_half_agree"]))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return wrap_table(cols + (["split-half"] if badge else []), rows)



def details_html(sid: str, title: str, body: str, hint: str = "", *, open_: bool = False) -> str:
    """A collapsible section `sid` titled `title` (an h2 in its summary line); `hint` says what it holds
    while closed. Links into it open it (the page's script)."""
    note = f'<span class="hint">{esc(hint)}</span>' if hint else ""
    return (f'<details class="sec" id="{sid}"{" open" if open_ else ""}><summary><h2>{esc(title)}</h2>{note}'
            f"</summary>{body}</details>")


def html_page(title: str, body: str) -> str:
    """An offline page: our CSS, `body`, our one sorting script, a CSP that admits nothing else."""
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{body}"
            f"{SCRIPT_TAG}{SCRIPT}</script></body></html>")

