"""Where the concept callbacks' numbers go: scalars to every logger, W&B-only objects to W&B.

Scalars go to every Lightning logger (`logger.log_metrics` with an explicit step) so CSV,
TensorBoard and W&B all get them, and a callback's own schedule is not thinned out by the
Trainer's `log_every_n_steps`. Tables, histograms and scatter plots only exist in W&B: they go
through `WandbLogger.experiment` with `trainer/global_step` attached (the step metric Lightning's
WandbLogger declares), and are skipped silently with any other logger. Everything logs from
global rank zero only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger


def log_scalars(trainer: Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Log scalars to every logger of `trainer` at `step` (rank zero only).

    They stay out of `trainer.callback_metrics`: a rank-zero-only value there would let a
    `ModelCheckpoint(monitor=...)` on another rank fail alone and hang a DDP run.
    """
    if not metrics or not trainer.is_global_zero:
        return
    values = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)


def wandb_experiments(trainer: Trainer) -> list[Any]:
    """The W&B runs behind the trainer's WandbLoggers (empty off rank zero or without W&B)."""
    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def log_wandb(trainer: Trainer, build: Callable[[Any], Mapping[str, Any]], step: int) -> None:
    """Log W&B-only objects: `build(wandb)` returns `{key: wandb.Table | Histogram | chart}`.

    `build` runs only when a WandbLogger is present, so other setups never pay for the objects.
    """
    runs = wandb_experiments(trainer)
    if not runs:
        return
    import wandb

    payload = dict(build(wandb))
    if not payload:
        return
    payload["trainer/global_step"] = step
    for run in runs:
        run.log(payload)


def wandb_table(wandb: Any, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Any:
    return wandb.Table(columns=list(columns), data=[list(r) for r in rows])


__all__ = ["log_scalars", "log_wandb", "wandb_experiments", "wandb_table"]
