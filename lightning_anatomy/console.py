"""A quiet, honest console for the `anatomy` commands.

Lightning prints, on every run, tips about cloud products, which accelerators exist, and a
warning that a Hugging Face model has modules in eval mode (dropout-free LMs always do); the
default progress bar counts batches per epoch, which says nothing when a fit is bounded by
`max_steps`. `quiet_lightning()` drops those messages (warnings and errors stay), and
`StepProgressBar` shows one bar over the whole fit in optimizer steps.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

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


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole fit, counted in optimizer steps (`trainer.estimated_stepping_batches`),
    starting at the resumed step; the epoch is shown in the postfix instead of a per-epoch bar."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        total = trainer.estimated_stepping_batches
        bar.reset(total=None if total == float("inf") else int(total))
        bar.initial = bar.n = trainer.global_step
        bar.set_description("train steps")

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
