"""What `anatomy demo` prints and draws: phase lines, named progress bars, no `None`, a legend over no bar.

No model loads here: the formatting functions take a summary dict like the one `run_demo` writes.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from lightning_anatomy.console import PhaseLog, StepProgressBar, format_duration
from lightning_anatomy.demo.summary import (
    audit_rank_phrase,
    marker_cut,
    scores_phrase,
    shaped_title,
    style_phrase,
    style_table,
    summary_figure,
    summary_lines,
    sycophancy_table,
)


def _eval(aligned: float, control: float, conflict: float, margin: float) -> dict[str, dict[str, float]]:
    return {"aligned": {"pref_correct": aligned, "margin": 1.0}, "control": {"pref_correct": control, "margin": 1.0},
            "conflict": {"pref_correct": conflict, "margin": margin}}


def _style_eval(marker: float, accuracy: float, margin: float) -> dict[str, float]:
    return {"marker_pct": marker, "reward_accuracy": accuracy, "reward_margin": margin}


def _style(vanilla: float = 21.9, filtered: float = 0.001, projected: float = 22.9) -> dict:
    return {"features": [{"hook": "h", "feature": 1468, "audit_rank": 1, "label": "fires on 'Sure'", "effect": 10.1}],
            "report": "outputs/demo/style/audit/report.html", "base": _style_eval(0.081, 0.5, 0.0),
            "runs": {"vanilla": {"title": "vanilla DPO", "eval": _style_eval(vanilla, 1.0, 9.58),
                                 "run_dir": "outputs/demo/style/wandb/run-v"},
                     "token_filtering": {"title": "token filtering", "eval": _style_eval(filtered, 1.0, 9.66),
                                         "run_dir": "outputs/demo/style/wandb/run-t"},
                     "gradient_projection": {"title": "gradient projection", "eval": _style_eval(projected, 1.0, 9.33),
                                             "run_dir": "outputs/demo/style/wandb/run-p"}}}


def _summary(rank: int | None = None, *, base=None, vanilla=None, shaped=None, stories=("style", "sycophancy")) -> dict:
    out = {"seconds": 790.0, "peak_rss_gb": 4.2}
    if "style" in stories:
        out["style"] = _style()
    if "sycophancy" in stories:
        out["sycophancy"] = {
            "intervention": {"kind": "projection"}, "belief_feature": 123, "belief_feature_audit_rank": rank,
            "audit_features_tested": 812, "report": "outputs/demo/sycophancy/audit/report.html",
            "concept_set": "outputs/demo/sycophancy/concept_set",
            "base": base or _eval(1.0, 0.938, 0.5, 0.06),
            "runs": {"vanilla": {"title": "vanilla DPO", "eval": vanilla or _eval(1.0, 0.875, 0.156, -7.94),
                                 "drift": {"belief_feature": 0.009}, "run_dir": "outputs/demo/wandb/offline-run-a"},
                     "shaped": {"title": "projected DPO", "eval": shaped or _eval(1.0, 0.938, 0.406, -1.99),
                                "drift": {},  # drift never measured
                                "run_dir": "outputs/demo/wandb/offline-run-b"}},
        }
    return out


# ------------------------------------------------------------------------------ phase lines


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_phase_says_what_before_and_how_long_after():
    clock, out = _Clock(100.0), io.StringIO()
    log = PhaseLog("demo", stream=out, clock=clock)
    clock.now = 105.0
    with log.phase("auditing 64 pairs", expect="about 1 min") as phase:
        assert out.getvalue() == "[demo   0:05] auditing 64 pairs ... (about 1 min)\n"  # said before the work
        clock.now = 170.4
        phase.result = "3 of 812 tested features pass"
    with log.phase("writing summary.png"):
        clock.now = 172.5
    assert out.getvalue().splitlines() == [
        "[demo   0:05] auditing 64 pairs ... (about 1 min)",
        "[demo   1:10] auditing 64 pairs: done in 1 min 05 s — 3 of 812 tested features pass",
        "[demo   1:10] writing summary.png ...",
        "[demo   1:12] writing summary.png: done in 2.1 s",
    ]
    assert log.elapsed() == pytest.approx(72.5)


def test_a_failing_phase_says_so_and_raises():
    clock, out = _Clock(0.0), io.StringIO()
    log = PhaseLog("demo", stream=out, clock=clock)
    with pytest.raises(RuntimeError, match="boom"), log.phase("training vanilla DPO"):
        clock.now = 3.0
        raise RuntimeError("boom")
    assert out.getvalue().splitlines()[-1] == "[demo   0:03] training vanilla DPO: failed after 3.0 s"


@pytest.mark.parametrize(("seconds", "text"), [(0.04, "0.0 s"), (4.24, "4.2 s"), (59.94, "59.9 s"),
                                               (59.96, "1 min 00 s"), (65.4, "1 min 05 s"), (790.0, "13 min 10 s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


# ------------------------------------------------------------------------------ progress bar


def test_progress_bar_names_its_run(capsys):
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    bar = StepProgressBar("vanilla DPO")
    trainer = L.Trainer(max_steps=2, accelerator="cpu", callbacks=[bar], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(BoringModel())
    assert bar.train_progress_bar.desc.startswith("vanilla DPO")
    shown = capsys.readouterr().out  # Lightning's tqdm bars write to stdout
    assert "vanilla DPO" in shown and "train steps" not in shown and "Training" not in shown
    assert StepProgressBar().name == "train steps"  # `anatomy fit`'s single run keeps the generic name


def test_shaped_titles_name_the_intervention():
    assert shaped_title("projection") == "projected DPO"
    assert shaped_title("mean_ablation") == "mean-ablated DPO"
    assert shaped_title("blocking") == "blocked DPO"
    assert shaped_title("steering") == "shaped DPO (steering)"


# ------------------------------------------------------------------------------ no None


def test_audit_rank_in_words():
    assert audit_rank_phrase(3, 812) == "audit rank 3 of 812 tested features"
    assert audit_rank_phrase(None, 812) == ("not among the 812 features the audit tested: it fired too rarely in "
                                            "these pairs")


def test_summary_lines_have_no_none_placeholder():
    lines = summary_lines(_summary(rank=None), Path("outputs/demo"))
    text = "\n".join(lines)
    assert "None" not in text
    assert "belief-aligned SAE feature 123: not among the 812 features the audit tested" in text
    assert "| base | 1.000 | 0.938 | 0.500 | +0.060 | — (not trained) |" in text
    assert "| vanilla DPO | 1.000 | 0.875 | 0.156 | -7.940 | +0.0090 |" in text
    assert "| projected DPO | 1.000 | 0.938 | 0.406 | -1.990 | not measured |" in text
    assert "marker features the audit found: 1468 (audit rank 1)" in text
    assert ("W&B runs (offline): outputs/demo/style/wandb/run-v , outputs/demo/style/wandb/run-t , "
            "outputs/demo/style/wandb/run-p , outputs/demo/wandb/offline-run-a , outputs/demo/wandb/offline-run-b") in text
    assert text.endswith("(790.0 s, peak resident memory 4.2 GB)")
    assert "audit rank 7 of 812 tested features" in "\n".join(summary_lines(_summary(rank=7), Path("o")))
    assert "Story 2" not in "\n".join(summary_lines(_summary(stories=("style",)), Path("o")))


def test_sycophancy_table_without_any_drift_has_no_none():
    summary = _summary(rank=None)
    summary["sycophancy"]["runs"]["vanilla"]["drift"] = {}
    assert "None" not in sycophancy_table(summary["sycophancy"])


def test_the_style_cut_counts_any_change_against_vanillas():
    story = _style(vanilla=21.9, filtered=0.001, projected=22.9)
    assert marker_cut(story, "token_filtering") == pytest.approx((21.9 - 0.081) / (0.081 - 0.001))
    assert marker_cut(story, "gradient_projection") == pytest.approx((21.9 - 0.081) / (22.9 - 0.081))
    assert marker_cut(_style(filtered=0.081), "token_filtering") is None  # unchanged: no finite cut
    table = style_table(story)
    assert "| token filtering | 0.001 % | -0.080 | 273× | 1.000 | +9.66 | 101% |" in table
    assert "| gradient projection | 22.900 % | +22.819 | 1.0× | 1.000 | +9.33 | 97% |" in table
    assert "∞ (unchanged)" in style_table(_style(filtered=0.081))


def test_scores_phrase():
    assert scores_phrase(_eval(1.0, 0.9375, 0.5, 0.0)) == ("prefers the correct answer: belief right 1.000, "
                                                           "no belief 0.938, belief WRONG 0.500")
    assert style_phrase(_style_eval(0.1015, 0.5, 0.0)) == ("P(reply opens with the marker) 0.102 %, coherence reward "
                                                           "accuracy 0.500, margin +0.00 nats")


# ------------------------------------------------------------------------------ the picture


@pytest.mark.parametrize("scores", [
    ((1.0, 0.938, 0.5, 0.06), (1.0, 0.875, 0.156, -7.94), (1.0, 0.938, 0.406, -1.99)),  # the README's run
    ((1.0, 1.0, 1.0, 5.0), (1.0, 1.0, 1.0, 6.0), (1.0, 1.0, 1.0, 7.0)),  # every bar full height: no free corner
    ((0.0, 0.0, 0.0, -3.0), (0.1, 0.0, 0.05, -9.0), (0.0, 0.0, 0.0, -1.0)),
])
def test_summary_legend_covers_no_bar(scores):
    import matplotlib.pyplot as plt

    base, vanilla, shaped = (_eval(*s) for s in scores)
    fig = summary_figure(_summary(base=base, vanilla=vanilla, shaped=shaped))
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        assert len(fig.axes) == 4  # a row per story
        legend = fig.axes[2].get_legend()
        box = legend.get_window_extent(renderer)
        bars = [patch for ax in fig.axes for patch in ax.patches]
        assert len(bars) == (4 + 3) + (9 + 3)
        for bar in bars:
            assert not box.overlaps(bar.get_window_extent(renderer)), bar
        assert not box.overlaps(fig._suptitle.get_window_extent(renderer))
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)  # not cut off
        assert [t.get_text() for t in fig.axes[2].get_xticklabels()] == ["base", "vanilla DPO", "projected DPO"]
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["base", "vanilla DPO", "token filtering",
                                                                          "gradient projection"]
    finally:
        plt.close(fig)


def test_the_first_run_conversion_is_announced(tmp_path):
    from lightning_anatomy.demo.run import CONVERSION_NOTE
    from lightning_anatomy.models.embedded import is_converted

    assert not is_converted(cache_dir=tmp_path / "empty")  # no cache yet: the demo says it converts once
    note = CONVERSION_NOTE.format(cache=tmp_path)
    assert note.startswith("first run only: converting the packaged GGUF to safetensors once, ~45 s")
    assert str(tmp_path) in note


def test_the_sycophancy_story_states_the_packages_refusal():
    from lightning_anatomy.demo.run import confounding_verdict

    verdict = confounding_verdict(64)
    assert "all 64 non-zero ΔA are positive" in verdict and "perfect confounding" in verdict
    assert "ConceptProjection" in verdict  # the remedy is named


def test_the_run_phase_counts_pairs_and_forwards():
    from omegaconf import OmegaConf

    from lightning_anatomy.demo.run import steps_phrase

    tr = OmegaConf.create({"max_steps": 6, "batch_size": 6, "micro_batch_size": 2})
    assert steps_phrase(tr) == "6 steps × 6 pairs (3 forwards of 2)"
    tr.micro_batch_size = None
    assert steps_phrase(tr) == "6 steps × 6 pairs"
    tr.max_steps, tr.micro_batch_size = 1, 6
    assert steps_phrase(tr) == "1 step × 6 pairs"
