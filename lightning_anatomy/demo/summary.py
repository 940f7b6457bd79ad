"""What `anatomy demo` prints and draws from its summary dict: phrases, tables and the picture.

No model here: every function takes the dict `run_demo` writes to `summary.json`, so the output
can be checked (and redrawn) without training.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_anatomy.files import atomic_write_file

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The sycophancy story's shaped run as a reader names it, by `intervention.kind`.
SHAPED_TITLES = {"projection": "projected DPO", "mean_ablation": "mean-ablated DPO", "blocking": "blocked DPO"}
# The three held-out sets of the sycophancy story, in the order the lines and the table show them.
HELDOUT_SETS = (("aligned", "belief right"), ("control", "no belief"), ("conflict", "belief WRONG"))


def shaped_title(kind: str) -> str:
    """The sycophancy story's shaped run by its intervention ("projected DPO")."""
    return SHAPED_TITLES.get(kind, f"shaped DPO ({kind})")


def audit_rank_phrase(rank: int | None, n_tested: int) -> str:
    """Where the audit ranked a feature, in words; `None` (absent from the audit's table) means the
    feature fired too rarely in the pairs to be tested, which is itself a finding, not a blank."""
    if rank is None:
        return f"not among the {n_tested} features the audit tested: it fired too rarely in these pairs"
    return f"audit rank {rank} of {n_tested} tested features"


def scores_phrase(evals: dict[str, dict[str, float]]) -> str:
    """Held-out preference for the correct answer per set, in one line."""
    return "prefers the correct answer: " + ", ".join(f"{title} {evals[key]['pref_correct']:.3f}"
                                                        for key, title in HELDOUT_SETS)


def style_phrase(ev: dict[str, float]) -> str:
    """The style story's held-out measures of one model, in one line."""
    return (f"P(reply opens with the marker) {ev['marker_pct']:.3f} %, coherence reward accuracy "
            f"{ev['reward_accuracy']:.3f}, margin {ev['reward_margin']:+.2f} nats")


def marker_cut(story: dict[str, Any], run: str) -> float | None:
    """Vanilla's change of the marker's probability over this run's (any change counts, overshoot
    below the base included); None when the run did not change it at all."""
    base = story["base"]["marker_pct"]
    change = abs(story["runs"][run]["eval"]["marker_pct"] - base)
    vanilla = abs(story["runs"]["vanilla"]["eval"]["marker_pct"] - base)
    return vanilla / change if change > 0 else None


def style_table(story: dict[str, Any]) -> str:
    """Markdown table of the style story: the marker's rise, its cut, and the coherence learned."""
    lines = ['| model | off-target: P(reply opens with "Sure!") | change | cut vs vanilla | on-target: coherence '
             "reward accuracy | reward margin (nats) | margin kept |", "|---|---|---|---|---|---|---|"]
    base = story["base"]
    lines.append(f"| base | {base['marker_pct']:.3f} % | — | — | — (reward 0 by definition) | — | — |")
    vanilla_margin = story["runs"]["vanilla"]["eval"]["reward_margin"]
    for name, run in story["runs"].items():
        ev = run["eval"]
        cut = "—" if name == "vanilla" else (f"{c:.0f}×" if (c := marker_cut(story, name)) is not None and c >= 10
                                             else f"{c:.1f}×" if c is not None else "∞ (unchanged)")
        kept = f"{ev['reward_margin'] / vanilla_margin:.0%}" if vanilla_margin > 0 else "—"
        lines.append(f"| {run['title']} | {ev['marker_pct']:.3f} % | {ev['marker_pct'] - base['marker_pct']:+.3f} | "
                     f"{cut} | {ev['reward_accuracy']:.3f} | {ev['reward_margin']:+.2f} | {kept} |")
    return "\n".join(lines)


def sycophancy_table(story: dict[str, Any]) -> str:
    """Markdown table of the sycophancy story (every held-out set and the belief feature's drift)."""
    lines = ["| model | on-target: pref. correct, belief right | on-target: no belief | off-target: pref. correct, "
             "belief wrong | margin (nats), belief wrong | belief-feature drift |",
             "|---|---|---|---|---|---|"]
    entries = [("base", story["base"], "— (not trained)")]
    for run in story["runs"].values():
        drift = run.get("drift", {}).get("belief_feature")
        entries.append((run["title"], run["eval"], "not measured" if drift is None else f"{drift:+.4f}"))
    for title, ev, drift in entries:
        lines.append(f"| {title} | {ev['aligned']['pref_correct']:.3f} | {ev['control']['pref_correct']:.3f} | "
                     f"{ev['conflict']['pref_correct']:.3f} | {ev['conflict']['margin']:+.3f} | {drift} |")
    return "\n".join(lines)


def summary_lines(summary: dict[str, Any], out: Path) -> list[str]:
    """The closing lines: each story's table and findings, and where every output is."""
    lines: list[str] = []
    runs: list[str] = []
    if "style" in summary:
        story = summary["style"]
        feats = ", ".join(f"{f['feature']} (audit rank {f['audit_rank']})" for f in story["features"])
        lines += ['Story 1 — a "Sure!" opener in real replies (what works):', style_table(story), "",
                  f"marker features the audit found: {feats}", f"report: {story['report']}", ""]
        runs += [str(r["run_dir"]) for r in story["runs"].values()]
    if "sycophancy" in summary:
        story = summary["sycophancy"]
        rank = audit_rank_phrase(story.get("belief_feature_audit_rank"), story.get("audit_features_tested", 0))
        lines += ["Story 2 — agreeing with the user (the limit: perfect confounding):", sycophancy_table(story), "",
                  f"belief-aligned SAE feature {story['belief_feature']}: {rank}",
                  f"report: {story['report']}", f"concept set: {story['concept_set']}", ""]
        runs += [str(r["run_dir"]) for r in story["runs"].values()]
    lines += [f"plot: {out / 'summary.png'}", "W&B runs (offline): " + " , ".join(runs),
              f"summary: {out / 'summary.json'}  ({summary['seconds']} s, peak resident memory "
              f"{summary.get('peak_rss_gb', float('nan')):.1f} GB)"]
    return lines


def summary_figure(summary: dict[str, Any]) -> Figure:
    """The summary picture: one row per story that ran.

    Style: the marker's held-out probability per model and the coherence margin learned.
    Sycophancy: held-out preference per set and the margin when the user's belief is wrong. The
    legend sits above its panel, outside the axes, so it covers no bar whatever the scores.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stories = [s for s in ("style", "sycophancy") if s in summary]
    fig, grid = plt.subplots(len(stories), 2, figsize=(11, 3.9 * len(stories)), layout="constrained", squeeze=False)
    for axes, story in zip(grid, stories):
        (_style_row if story == "style" else _sycophancy_row)(axes, summary[story])
    fig.suptitle("Demo on SmolLM2-135M-Instruct: what DPO learned besides the intended preference")
    return fig


def _style_row(axes: Any, story: dict[str, Any]) -> None:
    names = ["base", *(r["title"] for r in story["runs"].values())]
    evals = [story["base"], *(r["eval"] for r in story["runs"].values())]
    colors = ["0.6", "tab:red", "tab:green", "tab:blue"][: len(names)]
    bars = axes[0].bar(names, [e["marker_pct"] for e in evals], color=colors)
    axes[0].bar_label(bars, labels=[f"{e['marker_pct']:.3g} %" for e in evals], fontsize=8)
    axes[0].set_ylabel('held-out P(reply opens with "Sure!"), %')
    axes[0].set_title('1. a "Sure!" opener on 90 % of chosen replies: off-target', fontsize=9)
    bars = axes[1].bar(names[1:], [e["reward_margin"] for e in evals[1:]], color=colors[1:])
    axes[1].bar_label(bars, fmt="%+.2f", fontsize=8)
    axes[1].set_ylabel("held-out coherence: implicit reward margin (nats)")
    axes[1].set_title("on-target: the coherence preference learned", fontsize=9)
    axes[1].axhline(0, color="k", lw=0.5)


def _sycophancy_row(axes: Any, story: dict[str, Any]) -> None:
    names = ["base", *(r["title"] for r in story["runs"].values())]
    evals = [story["base"], *(r["eval"] for r in story["runs"].values())]
    width = 0.25
    for i, (key, title) in enumerate((("aligned", "belief right"), ("control", "no belief"),
                                      ("conflict", "belief WRONG (sycophancy test)"))):
        axes[0].bar([j + i * width for j in range(len(names))], [e[key]["pref_correct"] for e in evals], width,
                    label=title)
    axes[0].set_xticks([j + width for j in range(len(names))], names)
    axes[0].set_ylabel("held-out: prefers the correct answer")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False,
                   handlelength=1.2, columnspacing=1.0,
                   title="2. the user's belief, always right in training (perfectly confounded)",
                   title_fontsize=9)
    axes[1].bar(names, [e["conflict"]["margin"] for e in evals], color="tab:red")
    axes[1].set_ylabel("log p(correct) − log p(user's wrong belief)")
    axes[1].set_title("margin when the belief is WRONG", fontsize=9)
    axes[1].axhline(0, color="k", lw=0.5)


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """Write `summary_figure` as a PNG, atomically."""
    import matplotlib.pyplot as plt

    fig = summary_figure(summary)
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
