"""Name the calling OS thread, so that ``top -H``, ``perf`` and ``gdb`` show
which stream a thread serves (Python's thread names stay inside Python)."""

from __future__ import annotations

import ctypes

PR_SET_NAME = 15
_libc = None


def set_native_name(name: str) -> None:
    """Best effort: Linux keeps 15 bytes; elsewhere nothing happens."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None)          # the process's own symbols: libc's prctl
        _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError, TypeError):
        pass
