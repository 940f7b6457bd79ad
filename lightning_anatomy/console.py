"""A quiet, honest console for the `anatomy` commands.

Lightning prints, on every run, tips about cloud products, which accelerators exist, and a
warning that a Hugging Face model has modules in eval mode (dropout-free LMs always do); the
default progress bar counts batches per epoch, which says nothing when a fit is bounded by
`max_steps`. `quiet_lightning()` drops those messages (warnings and errors stay),
`StepProgressBar` shows one bar over the whole fit in optimizer steps, named for its run, and
`PhaseLog` announces each phase of a long job before it starts and its duration after, so no
minute passes silently.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

from lightning.pytorch.callbacks import TQDMProgressBar

# Info-level chatter of Lightning's rank-zero loggers: tips, accelerator availability, "LOCAL_RANK: 0 - ...".
_CHATTY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                   "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.seed")
_NOISE = (r".*module\(s\) in eval mode.*", r".*litlogger.*", r".*LeafSpec.*", r".*Total length of .* across ranks is zero.*",
          r".*does not have many workers.*", r".*`isinstance\(treespec, LeafSpec\)`.*",
          r"LightningCLI's args parameter is intended.*")


def quiet_lightning() -> None:
    """Silence Lightning's informational chatter for this process (idempotent)."""
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" for a one-file save


def format_duration(seconds: float) -> str:
    """`4.2 s` under a minute, `3 min 05 s` above: how a person reads a phase's length."""
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


@dataclass
class Phase:
    """One running phase of a `PhaseLog`; set `result` to say what it found on its closing line."""

    what: str
    result: str = ""


class PhaseLog:
    """One line when a phase starts (what it does, and how long it may take) and one when it ends.

    Each line is `[<job> <elapsed since the log began>] <what>: <detail>`, through this one class
    rather than prints scattered in a job, so a reader sees the job's progress at one glance and
    a test can check the format.

    Args:
        job: the prefix of every line (the command's name, e.g. "demo").
        stream: where lines go (default: stdout at call time, so pytest's capture sees them).
        clock: seconds as a float; injectable so a test fixes the durations.
    """

    def __init__(self, job: str, *, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.job = job
        self._stream = stream
        self._clock = clock
        self._t0 = clock()

    def elapsed(self) -> float:
        """Seconds since the log began."""
        return self._clock() - self._t0

    def line(self, msg: str) -> None:
        """One line, prefixed with the job and the elapsed time (`[demo   1:05] msg`)."""
        minutes, seconds = divmod(int(self.elapsed()), 60)
        stream = self._stream if self._stream is not None else sys.stdout
        print(f"[{self.job} {minutes:3d}:{seconds:02d}] {msg}", file=stream, flush=True)

    @contextmanager
    def phase(self, what: str, *, expect: str = "") -> Iterator[Phase]:
        """Announce `what` (and `expect`, e.g. "about 45 s, first run only"), run the block, then
        say how long it took and the phase's `result`; a failing block says so before it raises.

        Args:
            what: the phase, as an action ("auditing 64 pairs").
            expect: how long it may take or why, when that is not obvious; shown in parentheses.
        """
        phase = Phase(what)
        self.line(f"{what} ..." + (f" ({expect})" if expect else ""))
        start = self._clock()
        try:
            yield phase
        except BaseException:
            self.line(f"{what}: failed after {format_duration(self._clock() - start)}")
            raise
        done = f"{what}: done in {format_duration(self._clock() - start)}"
        self.line(f"{done} — {phase.result}" if phase.result else done)


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole fit, counted in optimizer steps (`trainer.estimated_stepping_batches`),
    starting at the resumed step; the epoch is shown in the postfix instead of a per-epoch bar.

    Args:
        name: the bar's description, naming the run when a job trains more than one (e.g. "vanilla DPO").
        refresh_rate: redraw every N steps (as `TQDMProgressBar`).
        process_position: the bar's line, for several bars at once (as `TQDMProgressBar`).
        leave: keep the finished bar on screen (as `TQDMProgressBar`).
    """

    def __init__(self, name: str = "train steps", refresh_rate: int = 1, process_position: int = 0,
                 leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.name = name

    @property
    def train_description(self) -> str:
        """The bar's name from its first frame (Lightning's says "Training" until the fit starts)."""
        return self.name

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        total = trainer.estimated_stepping_batches
        bar.reset(total=None if total == float("inf") else int(total))
        bar.initial = bar.n = trainer.global_step
        bar.set_description(self.name)

    def on_train_epoch_start(self, trainer: Any, *_: Any) -> None:
        """One bar for the whole fit: nothing to reset per epoch."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        """The epoch in place of Lightning's `v_num`, then the logged progress-bar metrics."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {"epoch": trainer.current_epoch, **items}
