"""`ReferenceHooks`: the members of `DPOModule` that expose and drive its reference.

The reference itself is one strategy per mode (`reference.ReferenceModel`); this mixin is the
module's side of it: the read-only part of the surface callbacks use (`reference_mode`,
`reference_forward_module()`, `reference_table`, `reference_logps`), the reference's lifecycle
hooks (fit start, before the first validation / training batch), `precompute_reference` and
TR-DPO's `SyncReference` callback. The module sets `self._reference` in its constructor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_anatomy.data.batch import PreferenceBatch
from lightning_anatomy.data.tokenize import TokenizedPair
from lightning_anatomy.reference import PrecomputedReference, ReferenceModel
from lightning_anatomy.reference_sync import SyncReference

if TYPE_CHECKING:
    import lightning as L


class ReferenceHooks:
    """Mixin of a LightningModule that holds a `ReferenceModel` as `self._reference`."""

    _reference: ReferenceModel
    _trainer: Any
    hparams: Any

    # ------------------------------------------------------------------ the surface callbacks use
    @property
    def reference_mode(self) -> str:
        """`"copy"`, `"precomputed"` or `"peft"` (the constructor's `reference`)."""
        return self._reference.mode

    def reference_forward_module(self) -> nn.Module | None:
        """The module the reference forward runs through (inside `reference_pass()`): the frozen
        copy (copy mode; sharded once `configure_model` ran), the policy itself (peft: its
        adapters are disabled for that forward) or None (precomputed: no reference forward runs)."""
        return self._reference.forward_module()

    @property
    def reference_table(self) -> Mapping[int, tuple[float, float]]:
        """Read-only `row_id -> (chosen, rejected)` reference log-probs (precomputed mode; empty
        until computed at the first validation/training start or loaded from a checkpoint)."""
        return self._reference.table

    @torch.no_grad()
    def reference_logps(self, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
        """Per-pair reference log-probs (`[B]` chosen, `[B]` rejected): the batch's
        `ref_chosen_logps` / `ref_rejected_logps` where given, else the reference strategy's."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        return self._reference.logps(batch)

    # ------------------------------------------------------------------ the reference's lifecycle
    def on_fit_start(self) -> None:
        self._reference.on_fit_start()

    def on_validation_start(self) -> None:
        self._reference.before_first_batch(self._trainer)

    def on_train_start(self) -> None:
        self._reference.before_first_batch(self._trainer)

    def configure_callbacks(self) -> list[L.Callback]:
        """TR-DPO's `SyncReference` when `sync_ref_model=True` (TRL adds its `SyncRefModelCallback` alike)."""
        hp = self.hparams
        if not hp.get("sync_ref_model"):
            return []
        return [SyncReference(hp.ref_model_mixup_alpha, hp.ref_model_sync_steps)]

    def precompute_reference(self, pairs: list[TokenizedPair], *, pad_token_id: int = 0, batch_size: int = 8) -> None:
        """Reference log-probs of the current (initial) policy for `pairs`, cached on disk
        (`reference="precomputed"` only; see `PrecomputedReference.precompute`)."""
        if not isinstance(self._reference, PrecomputedReference):
            raise ValueError(f"precompute_reference needs reference='precomputed', this module has "
                             f"reference={self.reference_mode!r}; build DPOModule(reference='precomputed')")
        self._reference.precompute(pairs, self._trainer, pad_token_id=pad_token_id, batch_size=batch_size)


__all__ = ["ReferenceHooks"]
