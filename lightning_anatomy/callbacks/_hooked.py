"""The hook lifecycle every concept callback shares.

A callback that edits or reads activations owns its forward hooks for the length of a fit and
must remove them on fit end, on exception and at teardown, so a crashed or finished run never
leaves the user's model edited.
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.hooks import RemovableHandle


class HookedCallback(Callback):
    """Base class: register handles in `self._handles`; `remove_hooks` drops them all."""

    def __init__(self) -> None:
        super().__init__()
        self._handles: list[RemovableHandle] = []

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.remove_hooks()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.remove_hooks()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.remove_hooks()

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
