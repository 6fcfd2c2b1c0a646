"""Heap probe for QEMU's embedded Python (bench/heap.py puts this directory
on QEMU's PYTHONPATH, so ``site`` imports it at the interpreter's start).

With PYEMB_HEAP_PROBE naming a file, a daemon thread appends a JSON line to
it every PROBE_INTERVAL_S: the process's anonymous RSS, glibc's malloc
figures over all arenas (``mallinfo2``: bytes in use, bytes the arenas hold,
bytes free in them) and the Python heap (allocated blocks, objects the
collector tracks, collections so far per generation).  RSS that climbs while
these stay level is the allocator keeping pages, not a leak.  Without the
variable it does nothing.
"""

import ctypes
import gc
import json
import os
import sys
import threading
import time

PROBE_INTERVAL_S = 1.0


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _sample(mallinfo2) -> dict:  # noqa: ANN001 - a ctypes function
    mi = mallinfo2()
    return {"t": time.monotonic(), "pid": os.getpid(),
            "rss_anon": _rss_anon(),
            "malloc_in_use": mi.uordblks + mi.hblkhd,   # small chunks + mmapped ones
            "malloc_held": mi.arena + mi.hblkhd,
            "malloc_free": mi.fordblks,
            "py_blocks": sys.getallocatedblocks(),
            "py_objects": len(gc.get_objects()),
            "gc_collections": [g["collections"] for g in gc.get_stats()],
            "threads": threading.active_count()}


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) << 10
    return 0


def _run(path: str) -> None:
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = _MallInfo2
    with open(path, "a", buffering=1) as out:
        while True:
            out.write(json.dumps(_sample(mallinfo2)) + "\n")
            time.sleep(PROBE_INTERVAL_S)


if os.environ.get("PYEMB_HEAP_PROBE"):
    threading.Thread(target=_run, args=(os.environ["PYEMB_HEAP_PROBE"],), daemon=True,
                     name="pyemb-heap-probe").start()
