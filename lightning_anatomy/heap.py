"""Give a long CPU job's freed memory back to the OS (glibc's heap, where one exists).

glibc keeps freed tensors in its heap once its mmap threshold has grown (up to 32 MB), so a job
that trains several models one after another (the demo, the benchmarks) would carry one run's
garbage into the next run's resident size. Trimming after a run gives it back. (Pinning the
threshold instead keeps the heap small but made the demo's training steps 2.5× slower here:
every activation became its own mapping.)
"""

from __future__ import annotations

import ctypes
import gc


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


def release_free_memory() -> bool:
    """Collect garbage and hand the heap's free memory back to the OS (glibc `malloc_trim`), so
    RSS shows live memory. Returns False where unavailable (not glibc)."""
    gc.collect()
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
