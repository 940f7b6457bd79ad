"""A training order that survives a resume: seeded per epoch, restartable mid-epoch.

A resumed run must see exactly the batches the uninterrupted run would have seen. Two things
break that with a plain `DataLoader`: a generator seeded once replays epoch 0's order in every
epoch after a resume, and a checkpoint taken mid-epoch restarts the epoch from its first batch.
`ResumableSampler` draws epoch e's order from `seed + e` (Lightning calls `set_epoch`), and
`ResumableLoader` is a `DataLoader` with Lightning's `state_dict`/`load_state_dict` interface:
the checkpoint holds (epoch, batches consumed), and the resumed loader skips what was consumed.

"Consumed" counts batches handed to a training step (`note_consumed`, called by
`PreferenceDataModule.on_after_batch_transfer`), not batches fetched: Lightning prefetches one
batch ahead, so a count kept in the sampler would be off by one.

It subclasses `DistributedSampler` so that Lightning never wraps or replaces it; on one process
it is `DistributedSampler(num_replicas=1, rank=0)`, whose epoch-0 order equals a `RandomSampler`
seeded with `seed` (and row order without shuffling).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator, Sized
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` whose next iteration can start part-way into an epoch."""

    def __init__(self, dataset: Sized, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._skip = 0

    def start_at(self, epoch: int, skip: int) -> None:
        """The next iteration yields epoch `epoch`'s indices for this rank from position `skip`."""
        self.set_epoch(epoch)
        self._skip = skip

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class ResumableLoader(DataLoader):
    """A training `DataLoader` over a `ResumableSampler` that Lightning saves and restores."""

    sampler: ResumableSampler

    def __init__(self, dataset: Any, *, sampler: ResumableSampler, batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, batch_size=batch_size, **kwargs)
        self._epoch = sampler.epoch
        self._consumed = 0

    def note_consumed(self) -> None:
        """One more batch of the current epoch reached a training step."""
        if self._epoch != self.sampler.epoch:
            self._epoch, self._consumed = self.sampler.epoch, 0
        self._consumed += 1

    def state_dict(self) -> dict[str, Any]:
        if self._epoch != self.sampler.epoch:  # set_epoch ran, no batch of the new epoch yet
            self._epoch, self._consumed = self.sampler.epoch, 0
        return {"epoch": self._epoch, "batches": self._consumed, "num_replicas": self.sampler.num_replicas,
                "batch_size": self.batch_size, "dataset_size": len(self.dataset), "seed": self.sampler.seed,
                "shuffle": self.sampler.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the checkpoint stopped (Lightning calls this before iterating)."""
        for key, mine in (("dataset_size", len(self.dataset)), ("seed", self.sampler.seed),
                          ("shuffle", self.sampler.shuffle)):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"the checkpoint's training order has {key}={state[key]!r}, this data module {mine!r}; "
                    "resume with the same data, seed and shuffle options (or start a new run)"
                )
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # the checkpoint closed its epoch: start the next one
            epoch, batches = epoch + 1, 0
        if batches and (state.get("num_replicas") != self.sampler.num_replicas
                        or state.get("batch_size") != self.batch_size):
            warnings.warn(
                f"the checkpoint stopped mid-epoch with {state.get('num_replicas')} process(es) x batch size "
                f"{state.get('batch_size')}, this run has {self.sampler.num_replicas} x {self.batch_size}: "
                f"epoch {epoch} restarts from its first batch", stacklevel=2,
            )
            batches = 0
        self.sampler.start_at(epoch, batches * self.batch_size)
        self._epoch, self._consumed = epoch, batches
