"""Freed C-heap memory goes back to the OS when a tower trims after a batch."""

from __future__ import annotations

import gc

from deployments.memory import memory_mib, release_free_memory


def test_trim_returns_freed_heap_pages_to_the_os():
    """Every tenth block stays alive, so the freed ones are holes inside the heap: glibc keeps
    those pages (RSS stays up) until ``malloc_trim`` hands them back."""
    blocks = [bytearray(4000) for _ in range(60_000)]  # ~240 MB of heap, below mmap's threshold
    survivors = blocks[::10]
    held = memory_mib()["rss"]
    del blocks
    gc.collect()
    freed_but_kept = memory_mib()["rss"]
    assert freed_but_kept > held - 50  # the holes are still resident
    assert release_free_memory() is True  # glibc on this platform
    trimmed = memory_mib()["rss"]
    assert trimmed < freed_but_kept - 150, (held, freed_but_kept, trimmed)
    del survivors
