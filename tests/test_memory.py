"""pyemb.memory: the free memory of a thread's malloc arena goes back to the
host when an engine session ends (glibc keeps it otherwise)."""

from __future__ import annotations

import ctypes
import threading

from pyemb.memory import give_back_free_memory

BLOCK = 64 << 10            # under glibc's mmap threshold: from the thread's arena
BLOCKS = 800                # 50 MiB


def rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon")


def test_free_memory_held_in_a_thread_arena_goes_back_to_the_host():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    figures = {}

    def engine_thread() -> None:
        # As a session's pictures: written, then freed but for the last
        # block, which keeps the arena's top where it is (so glibc's own
        # trim at free() cannot give the rest back).
        blocks = [libc.malloc(BLOCK) for _ in range(BLOCKS)]
        for b in blocks:
            ctypes.memset(b, 1, BLOCK)
        for b in blocks[:-1]:
            libc.free(b)
        figures["freed"] = rss_anon_mib()
        give_back_free_memory()
        figures["given back"] = rss_anon_mib()
        libc.free(blocks[-1])

    thread = threading.Thread(target=engine_thread)
    thread.start()
    thread.join()
    assert figures["freed"] - figures["given back"] > 0.8 * BLOCK * BLOCKS / 2**20, figures
