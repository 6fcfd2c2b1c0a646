"""Logging through QEMU's error reporting when running inside QEMU.

Outside QEMU (unit tests, tools) the messages go to the :mod:`logging`
module instead.
"""

from __future__ import annotations

import logging
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
