"""The offline W&B reader against runs that wandb itself writes (pins wandb's internal framing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lightning_anatomy.wandb_offline import WandbFileError, find_offline_runs, iter_records, read_run

wandb = pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    yield
    if wandb.run is not None:
        wandb.finish()


def _write_run(root, **config):
    run = wandb.init(mode="offline", dir=str(root), project="anatomy-test", config=config)
    for i in range(4):
        wandb.log({"loss": 1.0 / (i + 1), "rewards/margins": i * 0.25, "concepts": {"drift": -i}}, step=2 * i)
    wandb.log(
        {
            "table": wandb.Table(columns=["feature", "delta"], data=[[7, 0.5], [11, -1.25]]),
            "hist": wandb.Histogram([1.0, 2.0, 3.0, 3.0], num_bins=4),
        },
        step=9,
    )
    run.summary["best"] = 0.125
    run_id = run.id
    wandb.finish()
    return run_id


def test_reads_back_a_real_offline_run(tmp_path):
    run_id = _write_run(tmp_path, lr=0.01, model={"family": "gpt2", "layers": 2})
    (run_dir,) = find_offline_runs(tmp_path)
    assert run_dir.name.endswith(run_id)
    run = read_run(run_dir, wait=30)  # wandb.finish() may return before wandb-core flushed the file

    assert run.finished and run.exit_code == 0
    assert run.run_id == run_id and run.project == "anatomy-test"
    assert run.config == {"lr": 0.01, "model": {"family": "gpt2", "layers": 2}}
    assert run.keys() == ["concepts/drift", "hist", "loss", "rewards/margins", "table"]
    assert run.series("loss") == [(0, 1.0), (2, 0.5), (4, 1 / 3), (6, 0.25)]
    assert run.series("rewards/margins") == [(0, 0.0), (2, 0.25), (4, 0.5), (6, 0.75)]
    assert run.series("concepts/drift") == [(0, 0), (2, -1), (4, -2), (6, -3)]

    ((step, table),) = run.series("table")
    assert step == 9 and table["_type"] == "table-file" and table["nrows"] == 2 and table["ncols"] == 2
    assert run.table(table) == {"columns": ["feature", "delta"], "data": [[7, 0.5], [11, -1.25]]}

    ((step, hist),) = run.series("hist")
    counts, edges = np.histogram([1.0, 2.0, 3.0, 3.0], bins=4)
    assert step == 9 and hist["_type"] == "histogram"
    assert hist["values"] == counts.tolist() and hist["bins"] == pytest.approx(edges.tolist(), abs=0)

    assert run.summary["best"] == 0.125
    assert run.summary["loss"] == 0.25 and run.summary["_step"] == 9
    assert run.summary["hist"]["_type"] == "histogram"


def test_multi_block_records_and_series_errors(tmp_path):
    blob = "".join(chr(ord("a") + i % 26) for i in range(100_000))  # one record across 4 blocks
    _write_run(tmp_path, blob=blob)
    (run_dir,) = find_offline_runs(tmp_path / "wandb")
    (wandb_file,) = run_dir.glob("run-*.wandb")
    run = read_run(wandb_file, wait=30)
    assert wandb_file.stat().st_size > 3 * 32 * 1024
    assert run.config["blob"] == blob
    assert max(len(p) for p in iter_records(wandb_file)) > 100_000
    with pytest.raises(KeyError, match="no key 'nope'"):
        run.series("nope")
    with pytest.raises(KeyError, match="no step key 'trainer/global_step'"):
        run.series("loss", step_key="trainer/global_step")


def test_corruption_and_truncation_are_reported(tmp_path):
    _write_run(tmp_path)
    (run_dir,) = find_offline_runs(tmp_path)
    (wandb_file,) = run_dir.glob("run-*.wandb")
    full = read_run(wandb_file, wait=30)
    data = bytearray(wandb_file.read_bytes())

    (tmp_path / "bad").mkdir()
    bad = tmp_path / "bad" / "run-bad.wandb"
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    with pytest.raises(WandbFileError, match="checksum mismatch"):
        read_run(bad)

    bad.write_bytes(b"NOTWB" + bytes(data[5:]))
    with pytest.raises(WandbFileError, match="not a W&B record log"):
        read_run(bad)

    bad.write_bytes(bytes(data[: len(data) - 5]))
    with pytest.raises(WandbFileError, match="truncated.*allow_truncated=True"):
        read_run(bad)
    partial = read_run(bad, allow_truncated=True)
    assert partial.history == full.history[: len(partial.history)] and len(partial.history) >= 4
    assert full.finished and not partial.finished  # the exit record was the last one cut off

    with pytest.raises(FileNotFoundError, match="expected one run-\\*.wandb"):
        read_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="no folder"):
        find_offline_runs(tmp_path / "absent")


@pytest.mark.slow
def test_lightning_wandb_logger_metrics_read_back(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    first = _write_run(tmp_path)  # an older run in the same folder: runs come back oldest first
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="anatomy-test")
    logger.log_hyperparams({"beta": 0.1})
    for step, loss in [(0, 0.75), (5, 0.5), (10, 0.375)]:
        logger.log_metrics({"train/loss": loss, "train/rewards/accuracies": step / 10}, step=step)
    second, second_dir = logger.experiment.id, Path(logger.experiment.dir).parent
    wandb.finish()

    run = read_run(second_dir, wait=30)
    runs = find_offline_runs(tmp_path)
    assert [r.name[-len(first) :] for r in runs] == [first, second]
    assert runs[1] == second_dir.resolve()
    assert run.config == {"beta": 0.1}
    assert run.series("train/loss", step_key="trainer/global_step") == [(0, 0.75), (5, 0.5), (10, 0.375)]
    assert run.series("train/rewards/accuracies", step_key="trainer/global_step") == [(0, 0.0), (5, 0.5), (10, 1.0)]


def test_cli_finish_returns_once_the_file_holds_the_exit_record(tmp_path, monkeypatch):
    """wandb-core can still be writing when `wandb.finish()` returns: the CLI waits for the exit record."""
    import sys
    import threading
    import types

    from lightning_anatomy.cli import finish_wandb

    _write_run(tmp_path)
    (run_dir,) = find_offline_runs(tmp_path)
    (wandb_file,) = run_dir.glob("run-*.wandb")
    full = read_run(wandb_file, wait=30).history
    data = wandb_file.read_bytes()
    wandb_file.write_bytes(data[: len(data) - 5])  # as when finish() returns before the last flush

    def finish():  # the file is completed 0.3 s after finish() returned
        fake.run = None
        threading.Timer(0.3, wandb_file.write_bytes, args=(data,)).start()

    fake = types.SimpleNamespace(run=types.SimpleNamespace(settings=types.SimpleNamespace(sync_file=str(wandb_file))),
                                 finish=finish)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    finish_wandb()
    run = read_run(wandb_file)  # no wait: complete on return
    assert run.finished and run.history == full
