"""Giving memory an engine freed back to the host.

glibc's malloc keeps what a thread frees in that thread's arena for the next
allocation there, and returns to the kernel only the free memory at the top of
an arena.  An engine session's pictures and codec state (x264 at 1080p: about
56 MB) come and go with streams, on threads that come and go too, so the
arenas' free memory grows with every session of a new size while the bytes in
use stay level: 3.7 million protocol-fuzz inputs on the encoder took QEMU's
anonymous RSS from 34 to 174 MiB with 11 MiB in use and 274 MiB free in the
arenas (``bench.protocol_fuzz`` with the heap probe, bench/heap.py).

``malloc_trim(0)`` hands the free pages of every arena back (madvise), so a
stream's end gives back what its engine held.  It runs on the stream's own
thread, as its engine closes, never on QEMU's main loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):       # not glibc: nothing to do
        return None
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def give_back_free_memory() -> None:
    """After an engine session closed: the allocator's free pages go back to
    the host (glibc; elsewhere nothing).  Milliseconds, off the main loop."""
    if _TRIM is not None:
        _TRIM(0)
