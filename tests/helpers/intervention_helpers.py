"""Shared pieces of the intervention tests: a plain LightningModule around a tiny HF causal LM."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader

from lightning_anatomy.model_access import hook_input, hook_output, resolve_hook
from lightning_anatomy.models.tiny import build_tiny_model

VOCAB = 260


class TinyLM(L.LightningModule):
    """Next-token loss on a tiny HF model held as `.model` (no DPOModule involved).

    `fail_at` raises inside that training step (to test clean-up on exceptions); `probe` records,
    per stage, what flows through a hook point (see `watch`).
    """

    def __init__(self, family: str = "gpt2", num_layers: int = 3, fail_at: int | None = None, lr: float = 0.1,
                 checkpointing: str | None = None) -> None:
        super().__init__()
        self.model = build_tiny_model(family, num_layers=num_layers, vocab_size=VOCAB, hidden_size=64)
        if checkpointing is not None:
            kwargs = {"use_reentrant": checkpointing == "reentrant"}
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.24
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            self.model.train()  # HF only checkpoints in train mode
        self.fail_at = fail_at
        self.lr = lr

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.fail_at is not None and batch_idx == self.fail_at:
            raise RuntimeError(f"planned failure at step {batch_idx}")
        return self.model(input_ids=batch, labels=batch, use_cache=False).loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self.model(input_ids=batch, labels=batch, use_cache=False).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class MemoryLogger(Logger):
    """Keeps every `log_metrics` call: `(step, {key: value})`."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def series(self, key: str) -> list[tuple[int | None, float]]:
        return [(step, row[key]) for step, row in self.rows if key in row]

    def records(self) -> list[tuple[int, dict[str, float]]]:
        """Every call as (step, {key: float}) without Lightning's `epoch` key: what resume and
        sharding tests compare run against run."""
        return [(int(step or 0), {k: float(v) for k, v in row.items() if k != "epoch"}) for step, row in self.rows]


def token_loader(n: int = 8, length: int = 12, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(torch.randint(4, VOCAB, (n, length), generator=g), batch_size=batch_size)


def trainer(callbacks: list, **kwargs) -> L.Trainer:
    opts = dict(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                log_every_n_steps=1)
    opts.update(kwargs)
    return L.Trainer(callbacks=callbacks, **opts)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def watch(model: nn.Module, hook: str, *, grads: list | None = None, acts: list | None = None):
    """Record the activation at `hook` (`acts`) and the gradient arriving at it (`grads`).

    Register it *before* an intervention to see the raw activation and the gradient that the
    intervention sends upstream; after it, to see what downstream layers receive.
    """
    point = resolve_hook(model, hook)

    def record(hidden: torch.Tensor) -> None:
        if acts is not None:
            acts.append(hidden.detach().clone())
        if grads is not None and hidden.requires_grad:
            hidden.register_hook(lambda g: grads.append(g.detach().clone()))

    if point.kind == "input":
        return point.module.register_forward_pre_hook(
            lambda _m, args, kwargs: record(hook_input(args, kwargs)[0]), with_kwargs=True
        )
    return point.module.register_forward_hook(lambda _m, _args, output: record(hook_output(output)[0]))


def in_span_fraction(x: torch.Tensor, Q: torch.Tensor) -> float:
    """‖x·Q‖ / ‖x‖ in float64."""
    x = x.double()
    return float((x @ Q.double()).norm() / x.norm())
