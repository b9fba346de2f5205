"""The C allocator of an engine's process: freed memory stays with the process.

A step allocates and frees the same large temporaries every time: a batch's logits, its
attention scores and expert activations, megabytes each at tens of requests. glibc serves
an allocation above its mmap threshold (128 KB at start, raised as such blocks are freed)
with a fresh mapping that it unmaps when the block is freed, and it returns the top of its
heap to the system once more than its trim threshold is free there. Either way the next
step writes to pages the kernel must supply again, a page fault each 4 KB, for every
temporary of every step: at 64 requests on the CPU machine, 8-10 % of a step
(docs/engine.md, "Session 19"). ``keep_freed_memory`` makes allocations up to 32 MB come
from the heap and keeps what is freed there, so a step's temporaries reuse the pages of the
step before. The process's resident memory then stays at its peak, as with the allocators
serving systems preload for the same reason (TCMalloc, jemalloc).

NOTE: process-wide and idempotent; a no-op where the C library has no ``mallopt`` (not
glibc). The engine's model runner calls it when it is built (``ModelRunner``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""Allocations up to this many bytes come from the heap (glibc's default ceiling for its
dynamic threshold on 64-bit systems)."""
TRIM_THRESHOLD = (1 << 31) - 1
"""Free bytes at the heap's top before glibc returns them to the system (the largest value
``mallopt``'s int takes: 2 GB)."""

_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Set the allocator's thresholds once per process (module docstring); True where
    they are set, False where the C library cannot take them."""
    global _kept
    if _kept is None:
        _kept = _set_thresholds()
        if not _kept:
            logger.debug("the C library takes no mallopt: allocator thresholds unchanged")
    return _kept


def _set_thresholds() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and mmap
