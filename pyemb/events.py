"""The event queue of a virtio device: the driver posts empty buffers, the
device fills one per event.  Shared by virtio-snd-py and virtio-video-py.

An event raised while no buffer is posted waits, at most ``limit`` of them
(past that the oldest goes: a guest that never posts a buffer cannot grow
the host's memory), and with ``coalesce`` an event already waiting is not
queued again (for events a driver acts on once, such as "re-read the
params").  Events may be raised from any thread.

A driver acts on the events of a used ring in order and posts each buffer
again once it has (Linux's virtio-media does, in a work item that runs
apart from the thread waiting for a command's answer).  :meth:`after_acted_on`
uses that to answer a command only after the driver has taken in every
event delivered before it: an answer that overtook a DQBUF event raised
before a STREAMOFF would let the driver put a buffer it has just cleared
back on its list of done buffers.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from pyemb.device import Request, write_all


class EventQueue:
    def __init__(self, size: int, limit: int, coalesce: bool = False) -> None:
        self.size = size                # bytes of one event
        self.limit = limit
        self.coalesce = coalesce
        self._lock = threading.Lock()
        self._buffers: deque[Request] = deque()
        self.pending: deque[bytes] = deque()
        self.delivered = 0          # events written into a driver's buffer
        self.returned = 0           # buffers posted again after an event
        # after_acted_on's waiters: (events to be returned, callback, its timer)
        self._waiters: list[tuple[int, Callable[[], None], threading.Timer]] = []

    def on_buffer(self, request: Request) -> None:
        """A buffer the driver posted: filled now if an event waits, else held.
        One too small for an event goes back empty."""
        with self._lock:
            # A buffer posted while events are out is one the driver has acted on.
            if self.returned < self.delivered:
                self.returned += 1
            ready = self._take_ready()
            if request.writable_size < self.size:
                request.complete(0)
            elif self.pending:
                self._deliver(request, self.pending.popleft())
            else:
                self._buffers.append(request)
        self._run(ready)

    def after_acted_on(self, callback: Callable[[], None], timeout: float) -> None:
        """Call ``callback`` (once, from whichever thread notices) when the
        driver has posted again the buffer of every event delivered so far,
        or after ``timeout`` seconds if it does not (a driver that keeps
        its buffers only delays its own answers)."""
        with self._lock:
            if self.returned >= self.delivered:
                ready = True
            else:
                ready = False
                timer = threading.Timer(timeout, self._expire, (callback,))
                timer.daemon = True
                self._waiters.append((self.delivered, callback, timer))
                timer.start()
        if ready:
            callback()

    def drop(self, keep: Callable[[bytes], bool]) -> None:
        """Forget the waiting events ``keep`` says no to (a stream stopped
        before they went out)."""
        with self._lock:
            self.pending = deque(e for e in self.pending if keep(e))

    def _take_ready(self) -> list[Callable[[], None]]:
        ready = [w for w in self._waiters if w[0] <= self.returned]
        if not ready:
            return []
        self._waiters = [w for w in self._waiters if w[0] > self.returned]
        for _, _, timer in ready:
            timer.cancel()
        return [callback for _, callback, _ in ready]

    def _expire(self, callback: Callable[[], None]) -> None:
        with self._lock:
            mine = [w for w in self._waiters if w[1] is callback]
            self._waiters = [w for w in self._waiters if w[1] is not callback]
        self._run([w[1] for w in mine])

    @staticmethod
    def _run(callbacks: list[Callable[[], None]]) -> None:
        for callback in callbacks:
            callback()

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
            self.delivered = self.returned = 0
            waiters, self._waiters = self._waiters, []
        for _, _, timer in waiters:
            timer.cancel()
        self._run([w[1] for w in waiters])     # their requests are gone: they see it

    def _deliver(self, request: Request, payload: bytes) -> None:
        self.delivered += 1
        request.complete(write_all(request, payload))
