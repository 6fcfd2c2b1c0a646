"""The event queue of a virtio device: the driver posts empty buffers, the
device fills one per event.  Shared by virtio-snd-py and virtio-video-py.

An event raised while no buffer is posted waits, at most ``limit`` of them
(past that the oldest goes: a guest that never posts a buffer cannot grow
the host's memory), and with ``coalesce`` an event already waiting is not
queued again (for events a driver acts on once, such as "re-read the
params").  Events may be raised from any thread.
"""

from __future__ import annotations

import threading
from collections import deque

from pyemb.device import Request, write_all


class EventQueue:
    def __init__(self, size: int, limit: int, coalesce: bool = False) -> None:
        self.size = size                # bytes of one event
        self.limit = limit
        self.coalesce = coalesce
        self._lock = threading.Lock()
        self._buffers: deque[Request] = deque()
        self.pending: deque[bytes] = deque()

    def on_buffer(self, request: Request) -> None:
        """A buffer the driver posted: filled now if an event waits, else held.
        One too small for an event goes back empty."""
        if request.writable_size < self.size:
            request.complete(0)
            return
        with self._lock:
            if self.pending:
                self._deliver(request, self.pending.popleft())
            else:
                self._buffers.append(request)

    def post(self, payload: bytes) -> None:
        """Raise an event (from any thread)."""
        with self._lock:
            if self._buffers:
                self._deliver(self._buffers.popleft(), payload)
                return
            if self.coalesce and payload in self.pending:
                return
            if len(self.pending) >= self.limit:
                self.pending.popleft()
            self.pending.append(payload)

    def clear(self) -> None:
        """Device reset: QEMU drops the held buffers, and what waited goes."""
        with self._lock:
            self._buffers.clear()
            self.pending.clear()

    @staticmethod
    def _deliver(request: Request, payload: bytes) -> None:
        request.complete(write_all(request, payload))
