"""The reference model of DPO, one small strategy class per `DPOModule(reference=...)` mode.

- `CopyReference` (`"copy"`): a frozen copy of the initial policy, held by the module as
  `module.reference` (a submodule, so it moves with the module; sharded ones live outside the
  module tree, see `sharding.shard_dpo_module`). Its digest goes into checkpoints and is checked
  on load.
- `PeftReference` (`"peft"`): the policy itself with its LoRA adapters disabled.
- `PrecomputedReference` (`"precomputed"`): a table `row_id -> (chosen, rejected)` of the
  initial policy's log-probs, computed once and cached on disk; no second model in memory.

Every forward of a reference runs inside `reference_pass()`, so no activation edit acts on it,
and scores `data.batch.reference_view(batch)`: the pairs' own reference prompts where the batch
has them (inoculation prompting), with the batch's token-filter `loss_mask`.
The strategies read the policy and the scoring forward through a `ReferenceHost` (DPOModule).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_anatomy.data.batch import PreferenceBatch, reference_view
from lightning_anatomy.data.tokenize import TokenizedPair, collate_pairs
from lightning_anatomy.digests import combined_digest, full_model_digest, model_digest, pairs_digest
from lightning_anatomy.files import atomic_write_file
from lightning_anatomy.model_access import reference_pass
from lightning_anatomy.sharding import has_fsdp1_units, is_sharded_strategy

REFERENCE_MODES = ("copy", "precomputed", "peft")


class ReferenceHost(Protocol):
    """What a reference strategy reads of the module that owns it (`DPOModule`)."""

    policy: nn.Module
    reference: nn.Module | None

    @property
    def device(self) -> torch.device: ...

    def concatenated_forward(self, model: nn.Module, batch: PreferenceBatch, *, with_stats: bool = False
                             ) -> dict[str, Tensor]: ...

    def named_children(self) -> Iterator[tuple[str, nn.Module]]: ...


class ReferenceModel:
    """One reference mode: its log-probs of a batch and what it keeps in a checkpoint.

    Args:
        host: the module that owns the policy and the scoring forward (`DPOModule`).
    """

    mode: ClassVar[str]

    def __init__(self, host: ReferenceHost) -> None:
        self.host = host

    def logps(self, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
        """Per-pair reference log-probs of the chosen and rejected completions (`[B]` each)."""
        ref = self._forward(batch)
        return ref["chosen_logps"], ref["rejected_logps"]

    def _forward(self, batch: PreferenceBatch) -> dict[str, Tensor]:
        """The reference forward of a mode that has one (copy, peft); `PrecomputedReference`
        overrides `logps` instead and never calls this."""
        raise NotImplementedError(f"{type(self).__name__} has no reference forward; override logps or _forward")

    def forward_module(self) -> nn.Module | None:
        """The module the reference forward runs through (None: no forward runs)."""
        return None

    @property
    def table(self) -> Mapping[int, tuple[float, float]]:
        """Precomputed log-probs `row_id -> (chosen, rejected)` (empty: this mode keeps none)."""
        return MappingProxyType({})

    def on_fit_start(self) -> None:
        """Called at fit start, before any checkpoint of a resumed run has loaded under every strategy."""

    def before_first_batch(self, trainer: Any) -> None:
        """Called at the first validation and training start, when a resumed run's checkpoint has loaded."""

    def state_dict(self) -> dict[str, Any]:
        """What goes into the module's checkpoint entry (besides the mode)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any], trainer: Any, weights: dict[str, Tensor] | None = None
                        ) -> None:
        """Restore and check what `state_dict` wrote.

        Args:
            state: the module's checkpoint entry (`DPOModule.on_save_checkpoint`).
            trainer: the attached Trainer or None (a precomputed table is checked against its data).
            weights: the checkpoint's module `state_dict`, completed in place where the strategy
                keeps weights that checkpoints leave out (the copy reference).
        """


class CopyReference(ReferenceModel):
    """A frozen copy of the initial policy at `host.reference`.

    Its digest (read once, before any sharding) is saved with checkpoints; loading refuses a
    checkpoint trained against other reference weights.
    """

    mode = "copy"

    def __init__(self, host: ReferenceHost) -> None:
        super().__init__(host)
        if host.reference is None:
            raise ValueError("reference='copy' needs the frozen copy at host.reference (CopyReference.build)")
        # Frozen: its digest never changes, and read now it needs no gather once sharded.
        self.digest: str | None = model_digest(host.reference)

    @staticmethod
    def build(policy: nn.Module) -> nn.Module:
        """The frozen copy of `policy` (eval mode, no gradients) that the host holds as `reference`."""
        reference = copy.deepcopy(policy).eval()
        reference.requires_grad_(False)
        return reference

    def forward_module(self) -> nn.Module | None:
        return self.host.reference

    @torch.no_grad()
    def _forward(self, batch: PreferenceBatch) -> dict[str, Tensor]:
        with reference_pass():  # a separate model, but the same rule: no edit acts on it
            return self.host.concatenated_forward(self.host.reference, reference_view(batch))

    def state_dict(self) -> dict[str, Any]:
        return {} if self.digest is None else {"reference_digest": self.digest}

    def load_state_dict(self, state: Mapping[str, Any], trainer: Any, weights: dict[str, Tensor] | None = None
                        ) -> None:
        saved = state.get("reference_digest")
        if self.digest is not None and saved is not None and saved != self.digest:
            raise ValueError(
                "this DPOModule's reference model is not the one the checkpoint was trained against "
                "(the weights differ); build DPOModule with the same initial policy the run started from"
            )
        reference = self.host.reference
        # Old checkpoints carry the reference; new ones get it from the module (a sharded reference
        # lives outside the module tree, see sharding.shard_dpo_module: nothing to add).
        if reference is not None and weights is not None and "reference" in dict(self.host.named_children()):
            if not any(k.startswith("reference.") for k in weights):
                weights.update({f"reference.{k}": v for k, v in reference.state_dict().items()})


class PeftReference(ReferenceModel):
    """The policy's base model: the policy's forward with its LoRA adapters disabled."""

    mode = "peft"

    def forward_module(self) -> nn.Module | None:
        return self.host.policy

    @torch.no_grad()
    def _forward(self, batch: PreferenceBatch) -> dict[str, Tensor]:
        with self.host.policy.disable_adapter(), reference_pass():
            return self.host.concatenated_forward(self.host.policy, reference_view(batch))


class PrecomputedReference(ReferenceModel):
    """Reference log-probs of the initial policy per row id, computed once and cached on disk.

    The table is computed at the first validation or training start (not at fit start: some
    strategies, FSDP2's `ModelParallelStrategy`, load a checkpoint only after `on_fit_start`),
    unless a checkpoint brought it; a checkpoint's table must cover the datamodule's rows.

    Args:
        host: the module that owns the policy and the scoring forward.
        cache_dir: where tables are cached (None: no cache; every rank computes).
    """

    mode = "precomputed"

    def __init__(self, host: ReferenceHost, cache_dir: str | None) -> None:
        super().__init__(host)
        self.cache_dir = cache_dir
        self._table: dict[int, tuple[float, float]] = {}
        self._from_checkpoint = False
        self._pending = False  # fit started without a table: compute it before the first batch

    @property
    def table(self) -> Mapping[int, tuple[float, float]]:
        """Read-only view `row_id -> (chosen, rejected)` of the log-probs computed or loaded so far."""
        return MappingProxyType(self._table)

    def logps(self, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
        ids = batch["row_ids"].tolist()
        missing = [i for i in ids if i not in self._table]
        if missing:
            raise RuntimeError(
                f"no precomputed reference log-probs for row ids {missing[:10]}: reference='precomputed' "
                "computes them at fit start from the datamodule's train_pairs/val_pairs; for other rows call "
                "DPOModule.precompute_reference(pairs) first"
            )
        vals = torch.tensor([self._table[i] for i in ids], dtype=torch.float32, device=self.host.device)
        return vals[:, 0], vals[:, 1]

    def on_fit_start(self) -> None:
        if not self._from_checkpoint:  # a checkpoint's table was checked against the data when it loaded
            self._pending = True

    def before_first_batch(self, trainer: Any) -> None:
        if not self._pending:
            return
        self._pending = False
        if self._from_checkpoint:
            return
        pairs = _data_pairs(trainer)
        if not pairs:
            raise ValueError(
                "reference='precomputed' needs a datamodule with train_pairs/val_pairs (PreferenceDataModule), "
                "or call DPOModule.precompute_reference(pairs) before fit"
            )
        dm = getattr(trainer, "datamodule", None)
        self.precompute(pairs, trainer, pad_token_id=getattr(dm, "pad_token_id", 0))

    @torch.no_grad()
    def precompute(self, pairs: list[TokenizedPair], trainer: Any, *, pad_token_id: int = 0, batch_size: int = 8
                   ) -> None:
        """Add the rows of `pairs` the table lacks: from the cache file, else computed (and cached).

        The cache key hashes the policy weights and the tokenized pairs, so a changed model, data
        or tokenization never reuses stale numbers. A cache file that cannot be read or lacks rows
        is recomputed. Rank 0 computes and writes; others wait and read. Under a sharded strategy
        (FSDP) every forward is a collective, so every rank computes when rank 0 found no valid
        cache (as without a cache folder).
        """
        todo = [p for p in pairs if p.row_id not in self._table]
        if not todo:
            return
        path = Path(self.cache_dir) / f"{self._fingerprint(todo, trainer)}.safetensors" if self.cache_dir else None
        strategy = trainer.strategy if trainer is not None else None
        is_zero = strategy is None or strategy.is_global_zero
        every_rank = strategy is not None and (is_sharded_strategy(strategy) or path is None)
        wanted = [p.row_id for p in todo]
        table = None
        if is_zero and path is not None and path.exists():
            table, problem = read_reference_table(path, wanted)
            if problem:
                warnings.warn(f"reference cache {path} {problem}; recomputing it", stacklevel=3)
        compute = table is None
        if every_rank:
            compute = strategy.broadcast(compute, src=0)
        if compute and (is_zero or every_rank):
            table = self._compute(todo, pad_token_id, batch_size)
            if is_zero and path is not None:
                atomic_write_file(path, lambda tmp: save_file(table, str(tmp)))
        if strategy is not None and path is not None:
            strategy.barrier("anatomy_reference_cache")
        if table is None:  # another rank: read what rank 0 wrote
            table, problem = read_reference_table(path, wanted)
            if problem:
                raise RuntimeError(f"reference cache {path} {problem} after rank 0 wrote it; is {path.parent} "
                                   "shared by all processes? Set reference_cache_dir to a shared folder")
        for rid, c, r in zip(table["row_ids"].tolist(), table["chosen"].tolist(), table["rejected"].tolist()):
            self._table[int(rid)] = (c, r)

    def _compute(self, pairs: list[TokenizedPair], pad_token_id: int, batch_size: int) -> dict[str, Tensor]:
        policy = self.host.policy
        was_training = policy.training
        policy.eval()
        ids, chosen, rejected = [], [], []
        try:
            for start in range(0, len(pairs), batch_size):
                batch = collate_pairs(pairs[start:start + batch_size], pad_token_id)
                batch = {k: v.to(self.host.device) for k, v in batch.items()}
                with reference_pass():
                    out = self.host.concatenated_forward(policy, reference_view(batch))
                ids.append(batch["row_ids"].cpu())
                chosen.append(out["chosen_logps"].float().cpu())
                rejected.append(out["rejected_logps"].float().cpu())
        finally:
            policy.train(was_training)
        return {"row_ids": torch.cat(ids), "chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}

    def _fingerprint(self, pairs: list[TokenizedPair], trainer: Any) -> str:
        root = trainer.model if trainer is not None else None  # FSDP1: the unit owning the root weights
        fsdp_root = root if root is not None and has_fsdp1_units(root) else None
        digest = full_model_digest(self.host.policy, fsdp_root=fsdp_root)
        return combined_digest("reference-logps", digest, pairs_digest(pairs))

    def state_dict(self) -> dict[str, Any]:
        if not self._table:
            return {}
        ids = sorted(self._table)
        return {"reference_logps": {
            "row_ids": torch.tensor(ids, dtype=torch.long),
            "chosen": torch.tensor([self._table[i][0] for i in ids], dtype=torch.float32),
            "rejected": torch.tensor([self._table[i][1] for i in ids], dtype=torch.float32),
        }}

    def load_state_dict(self, state: Mapping[str, Any], trainer: Any, weights: dict[str, Tensor] | None = None
                        ) -> None:
        table = state.get("reference_logps")
        if table is None:
            raise ValueError(
                "the checkpoint holds no precomputed reference log-probs (reference='precomputed'), and they "
                "cannot be recomputed from a trained policy; resume with the run's own checkpoint, or start "
                "a new run"
            )
        self._table = {int(i): (float(c), float(r)) for i, c, r in zip(
            table["row_ids"].tolist(), table["chosen"].tolist(), table["rejected"].tolist())}
        self._from_checkpoint = True
        # A resumed run's table must cover the data: a trained policy cannot stand in for the
        # reference on rows the table lacks.
        missing = [p.row_id for p in _data_pairs(trainer) if p.row_id not in self._table]
        if missing:
            raise ValueError(
                f"the checkpoint's reference log-probs lack {len(missing)} row id(s) of this data (first: "
                f"{missing[:5]}); a resumed run cannot compute them from its trained weights. Resume with the "
                "same data and split"
            )


def check_reference_options(mode: str, peft_config: Mapping[str, Any] | None, policy_is_spec: bool) -> None:
    """Refuse an unknown mode, or `"peft"` without a way to get a PEFT policy, before any model loads."""
    if mode not in REFERENCE_MODES:
        raise ValueError(f"reference={mode!r} is not one of {REFERENCE_MODES}")
    if mode == "peft" and peft_config is None and policy_is_spec:
        raise ValueError("reference='peft' needs peft_config={...} (LoRA settings) or a PEFT model object as policy")


def make_reference(mode: str, host: ReferenceHost, *, cache_dir: str | None) -> ReferenceModel:
    """The strategy for `DPOModule(reference=mode)` (for copy, the host holds the model as `reference`)."""
    if mode == "copy":
        return CopyReference(host)
    if mode == "peft":
        return PeftReference(host)
    if mode == "precomputed":
        return PrecomputedReference(host, cache_dir)
    raise ValueError(f"reference={mode!r} is not one of {REFERENCE_MODES}")


def read_reference_table(path: Path, row_ids: list[int]) -> tuple[dict[str, Tensor] | None, str | None]:
    """The cached table and None, or None and what is wrong with the file."""
    try:
        table = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for damaged files
        return None, f"cannot be read ({type(err).__name__}: {err})"
    if set(table) != {"row_ids", "chosen", "rejected"} or len({t.shape for t in table.values()}) != 1:
        return None, "does not hold a reference table (row_ids, chosen, rejected of one length)"
    missing = set(row_ids) - set(table["row_ids"].tolist())
    if missing:
        return None, f"lacks {len(missing)} of the {len(row_ids)} rows"
    if not (torch.isfinite(table["chosen"]).all() and torch.isfinite(table["rejected"]).all()):
        return None, "holds non-finite log-probs"
    return table, None


def _data_pairs(trainer: Any) -> list[TokenizedPair]:
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    return list(getattr(dm, "train_pairs", None) or []) + list(getattr(dm, "val_pairs", None) or [])


__all__ = ["CopyReference", "PeftReference", "PrecomputedReference", "REFERENCE_MODES", "ReferenceHost",
           "ReferenceModel", "check_reference_options", "make_reference", "read_reference_table"]
