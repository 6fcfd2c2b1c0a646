"""Logging through QEMU's error reporting when running inside QEMU.

Outside QEMU (unit tests, tools) the messages go to the :mod:`logging`
module instead.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback

try:
    import _pyemb
except ImportError:  # not inside QEMU
    _pyemb = None

_fallback = logging.getLogger("pyemb")


def error(message: str) -> None:
    if _pyemb is not None:
        _pyemb.log_error(message)
    else:
        _fallback.error(message)


def warning(message: str) -> None:
    if _pyemb is not None:
        _pyemb.log_warning(message)
    else:
        _fallback.warning(message)


def exception(who: str, what: str, exc: BaseException) -> None:
    """Log ``exc`` once, with its traceback."""
    text = "".join(traceback.format_exception(exc)).rstrip()
    error(f"{who}: Python exception while {what}:\n{text}")


class GuestLog:
    """Warnings a guest causes (a corrupt input, a buffer too small), for one
    device: each kind is said once per stream or session by its caller, and
    this bounds them all together, since a guest can make streams without
    end.  At most ``burst`` lines, then one every ``period_s`` seconds; the
    ones left out meanwhile are counted in the next line that goes out.  So
    a device writes at most ``burst`` lines plus one a minute, whatever its
    guest does.  Thread-safe."""

    def __init__(self, burst: int = 20, period_s: float = 60.0) -> None:
        self.burst, self.period_s = burst, period_s
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._left_out = 0
        self._lock = threading.Lock()

    def warning(self, message: str) -> bool:
        """Say ``message`` if the budget allows; whether it was said."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) / self.period_s)
            self._last = now
            if self._tokens < 1:
                self._left_out += 1
                return False
            self._tokens -= 1
            left_out, self._left_out = self._left_out, 0
        if left_out:
            message += f" ({left_out} more such warnings of this device left out)"
        warning(message)
        return True
