"""`PreferenceDataModule`: read, validate and tokenize everything at setup, split with a seed.

Everything is read and tokenized in `setup()`, so a bad row fails the run before the first step.
The split is a seeded permutation of the pairs and is saved in the checkpoint, so a resumed run
trains and validates on the same rows; the training loader also saves its epoch and position, so
it continues mid-epoch (data/sampler.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_anatomy.data.rows import LAYOUTS, BadRow, PreferenceRow, check_on_bad_rows, read_preferences
from lightning_anatomy.data.sampler import ResumableLoader, ResumableSampler
from lightning_anatomy.data.sources import resolve_source
from lightning_anatomy.data.tokenize import (
    TokenizedPair,
    check_length_options,
    collate_pairs,
    resolve_pad_token_id,
    tokenize_rows,
)
from lightning_anatomy.models.loading import load_tokenizer

log = logging.getLogger(__name__)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _split_groups(pairs: Sequence[TokenizedPair], n_val: int, seed: int) -> tuple[list[int], list[int]]:
    """(val, train) positions: a seeded split of whole groups of identical pairs (same token ids).

    A copy of a training pair in validation would make the validation loss look better than it
    is, so copies stay on one side. Groups are permuted with `seed` and taken into validation
    while they fit in `n_val`; with no duplicates every group is one pair and this is exactly the
    plain seeded permutation (`randperm(n)[:n_val]`), so existing splits do not move.
    """
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault((tuple(p.prompt_ids), tuple(p.chosen_ids), tuple(p.rejected_ids)), []).append(i)
    members = list(groups.values())
    if n_val and len(members) < 2:
        raise ValueError(f"all {len(pairs)} pairs are copies of one pair, so no split keeps copies on one side; "
                         "set val_fraction=0 or add distinct rows")
    order = torch.randperm(len(members), generator=torch.Generator().manual_seed(seed)).tolist()
    val: list[int] = []
    for g in order:
        if len(val) + len(members[g]) <= n_val:
            val += members[g]
        if len(val) == n_val:
            break
    if n_val and not val:  # every group is larger than n_val: take the first, it leaves training pairs
        val = list(members[order[0]])
    taken = set(val)
    return sorted(val), [i for i in range(len(pairs)) if i not in taken]


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs for `DPOModule`: batches follow the `[chosen; rejected]` contract.

    The train loader shuffles epoch e with the seed `seed + e` (`shuffle=False` keeps row order,
    e.g. to compare a single-device run with a DDP one batch for batch); its position is saved in
    checkpoints, so a resumed run continues with the batches the uninterrupted run would see.

    `.rows`, `.train_pairs`, `.val_pairs` and `.dropped` (bad rows skipped while reading and
    tokenizing) are None until `setup()` has run.

    Args:
        source: `"toy"` / `"toy:<n>"`, `"demo"`, a path (JSONL, JSON, Parquet, save_to_disk folder),
            or rows / a Dataset / a DataFrame (`data.sources`).
        tokenizer: the policy's tokenizer, or a model spec to load it from.
        batch_size: pairs per training batch.
        eval_batch_size: pairs per validation batch (None: batch_size).
        val_fraction: share of pairs held out for validation (0: none).
        seed: seed of the split and of each epoch's order.
        shuffle: shuffle the training pairs each epoch.
        max_length: tokens per sequence (prompt + response; responses cut from the right).
        max_prompt_length: prompt tokens kept (cut from the left).
        on_bad_rows: `"error"` (all bad rows listed) or `"skip"` (dropped and reported).
        num_workers: DataLoader workers.
        layout: `"auto"`, or force one of the row layouts (explicit, conversational, implicit).
        split: the split of a `DatasetDict` source.
        limit: use only the first `limit` good rows of the source (None: all), as `anatomy audit`'s
            `data.limit` does, so a training run can follow an audit on the same rows.
    """

    def __init__(
        self,
        source: Any,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        *,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        shuffle: bool = True,
        max_length: int = 512,
        max_prompt_length: int | None = 256,
        on_bad_rows: str = "error",
        num_workers: int = 0,
        layout: str = "auto",
        split: str | None = None,
        limit: int | None = None,
    ):
        super().__init__()
        if tokenizer is None:
            raise ValueError("tokenizer is required: pass the policy's tokenizer (AutoTokenizer.from_pretrained(...)) "
                             "or a model spec ('embedded', 'tiny:gpt2', a directory, a hub id)")
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        _check_int("batch_size", batch_size, 1)
        if eval_batch_size is not None:
            _check_int("eval_batch_size", eval_batch_size, 1)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be a number with 0 <= val_fraction < 1 (0: no validation), got {val_fraction!r}")
        _check_int("seed", seed, 0)
        _check_int("num_workers", num_workers, 0)
        if limit is not None:
            _check_int("limit", limit, 1)
        check_length_options(max_length, max_prompt_length)
        check_on_bad_rows(on_bad_rows)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
        self.source = source
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction = float(val_fraction)
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.on_bad_rows = on_bad_rows
        self.num_workers = num_workers
        self.layout = layout
        self.split = split
        self.limit = limit
        self.pad_token_id = resolve_pad_token_id(tokenizer)
        self.rows: list[PreferenceRow] | None = None
        self.pairs: list[TokenizedPair] | None = None
        self.train_pairs: list[TokenizedPair] | None = None
        self.val_pairs: list[TokenizedPair] | None = None
        self.dropped: list[BadRow] | None = None
        self._saved_split: dict[str, list[int]] | None = None
        self._train_loader: ResumableLoader | None = None

    # ---------------------------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        if self.pairs is None:
            rows = read_preferences(
                resolve_source(self.source, seed=self.seed), on_bad_rows=self.on_bad_rows, tokenizer=self.tokenizer, layout=self.layout, split=self.split
            )
            if self.limit is not None:
                del rows[self.limit:]  # the first `limit` good rows, as the audit's data.limit takes them
            pairs = tokenize_rows(
                rows, self.tokenizer, max_length=self.max_length, max_prompt_length=self.max_prompt_length,
                on_bad_rows=self.on_bad_rows,
            )
            self.rows, self.pairs = rows, pairs
            self.dropped = list(getattr(rows, "dropped", [])) + list(pairs.dropped)
        self._apply_split()

    def _apply_split(self) -> None:
        assert self.pairs is not None
        if self._saved_split is not None:
            by_id = {p.row_id: p for p in self.pairs}
            wanted = self._saved_split["train_row_ids"] + self._saved_split["val_row_ids"]
            missing = [i for i in wanted if i not in by_id]
            if missing:
                raise ValueError(
                    f"the checkpoint's train/val split names {len(missing)} row id(s) this data does not have "
                    f"(first: {missing[:5]}); resume with the same source, tokenizer and length/bad-row options"
                )
            self.train_pairs = [by_id[i] for i in self._saved_split["train_row_ids"]]
            self.val_pairs = [by_id[i] for i in self._saved_split["val_row_ids"]]
            return
        n = len(self.pairs)
        n_val = max(1, round(n * self.val_fraction)) if self.val_fraction > 0 else 0
        if n - n_val < 1:
            raise ValueError(
                f"val_fraction={self.val_fraction} leaves no training pairs out of {n}; lower val_fraction or add rows"
            )
        val_idx, train_idx = _split_groups(self.pairs, n_val, self.seed)
        self.train_pairs = [self.pairs[i] for i in train_idx]
        self.val_pairs = [self.pairs[i] for i in val_idx]

    def _require_setup(self) -> None:
        if self.train_pairs is None:
            raise RuntimeError("PreferenceDataModule.setup() has not run yet; call dm.setup() or let the Trainer do it")

    # ---------------------------------------------------------------------------------- loaders
    def _loader(self, pairs: Sequence[TokenizedPair], batch_size: int, shuffle: bool, *, train: bool = False
                ) -> DataLoader:
        # The sampler is ours, not Lightning's default (which always shuffles training data under
        # DDP): `shuffle` and `seed` then mean the same on 1 or N processes, and rank r sees
        # positions r, r+N, ... of the order a single process would see. The training loader is
        # resumable mid-epoch (data/sampler.py).
        world = getattr(self.trainer, "world_size", 1) if self.trainer is not None else 1
        rank = self.trainer.global_rank if world > 1 else 0
        sampler = ResumableSampler(pairs, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed)
        loader_cls = ResumableLoader if train else DataLoader
        return loader_cls(
            pairs,  # a plain list is a map-style dataset
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=functools.partial(collate_pairs, pad_token_id=self.pad_token_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        self._train_loader = self._loader(self.train_pairs, self.batch_size, shuffle=self.shuffle, train=True)
        return self._train_loader

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batches that reach a step, for a mid-epoch resume (data/sampler.py)."""
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train_loader is not None:
            self._train_loader.note_consumed()
        return batch

    def val_dataloader(self) -> DataLoader | list:
        """No validation (val_fraction=0) is an empty list, which Lightning runs as no val loop."""
        self._require_setup()
        if not self.val_pairs:
            return []
        return self._loader(self.val_pairs, self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Every pair in row order (extraction, audits)."""
        self._require_setup()
        return self._loader(self.pairs, self.eval_batch_size, shuffle=False)

    # ---------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"seed": self.seed, "val_fraction": self.val_fraction}
        if self.train_pairs is not None:
            state["train_row_ids"] = [p.row_id for p in self.train_pairs]
            state["val_row_ids"] = [p.row_id for p in self.val_pairs]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the seed and the exact split (Lightning calls this after `setup()` on resume)."""
        self.seed = int(state_dict["seed"])
        self.val_fraction = float(state_dict["val_fraction"])
        if "train_row_ids" in state_dict:
            self._saved_split = {
                "train_row_ids": [int(i) for i in state_dict["train_row_ids"]],
                "val_row_ids": [int(i) for i in state_dict["val_row_ids"]],
            }
        if self.pairs is not None:
            self._apply_split()
