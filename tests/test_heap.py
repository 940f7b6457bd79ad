"""lightning_anatomy.heap: glibc's heap trimmed where it exists, a no-op elsewhere."""

from __future__ import annotations

from lightning_anatomy import heap


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_freed_memory_leaves_the_resident_set():
    import torch

    before = _rss_kb()
    blocks = [torch.ones(1 << 20) for _ in range(64)]  # 64 × 4 MiB
    assert _rss_kb() - before > 200_000
    del blocks
    heap.release_free_memory()
    assert _rss_kb() - before < 50_000  # freed and given back, not kept resident


def test_without_glibc_it_is_a_no_op(monkeypatch):
    monkeypatch.setattr(heap, "_libc", lambda: None)
    assert heap.release_free_memory() is False
