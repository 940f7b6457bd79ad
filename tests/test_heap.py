"""lightning_anatomy.heap: garbage collected and glibc's heap trimmed where it exists, a no-op elsewhere."""

from __future__ import annotations

import gc
import weakref

from lightning_anatomy import heap


class _Libc:
    def __init__(self) -> None:
        self.trims: list[int] = []

    def malloc_trim(self, pad: int) -> int:
        self.trims.append(pad)
        return 1


class _Node:
    pass


def test_release_collects_cycles_then_trims_the_heap(monkeypatch):
    libc = _Libc()
    monkeypatch.setattr(heap, "_libc", lambda: libc)
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # a reference cycle: only the collector frees it
    alive = weakref.ref(a)
    del a, b
    gc.disable()
    try:
        assert alive() is not None
        assert heap.release_free_memory() is True
    finally:
        gc.enable()
    assert alive() is None and libc.trims == [0]


def test_without_glibc_it_is_a_no_op(monkeypatch):
    monkeypatch.setattr(heap, "_libc", lambda: None)
    assert heap.release_free_memory() is False

