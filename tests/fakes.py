"""In-process stand-ins for the C shim's Request and Device, for the
pure-Python tier: they follow the same contract (views die on completion,
double completion raises, a request dropped by a reset answers complete()
with False; a handle's batch pushes at its end, under QEMU's lock)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any


class FakeRequest:
    def __init__(self, readable: list[bytes], writable_sizes: list[int], queue: int = 0,
                 handle: FakeHandle | None = None) -> None:
        self.queue = queue
        self.handle = handle
        self._out = [bytearray(b) for b in readable]
        self._in = [bytearray(n) for n in writable_sizes]
        self.readable = tuple(memoryview(b).toreadonly() for b in self._out)
        self.writable = tuple(memoryview(b) for b in self._in)
        self.readable_size = sum(map(len, readable))
        self.writable_size = sum(writable_sizes)
        self.done = False
        self.cancelled = False
        self.late = 0                   # complete() calls after a reset dropped it
        self.written: int | None = None

    def complete(self, written: int = 0) -> bool:
        if self.cancelled:
            self.late += 1
            return False
        if self.done:
            raise RuntimeError("request already completed")
        if not 0 <= written <= self.writable_size:
            raise ValueError("written outside the writable part")
        self.done = True
        self.written = written
        for v in self.readable + self.writable:
            v.release()
        if self.handle is not None:
            self.handle.push(self)
        return True

    def cancel(self) -> None:
        """What QEMU does to a request the model holds at a device reset."""
        self.done = self.cancelled = True

    @property
    def reply(self) -> bytes:
        assert self.written is not None, "request not completed"
        return b"".join(bytes(b) for b in self._in)[: self.written]


class FakeChunk:
    """Process memory standing in for a mapped chunk of guest RAM (the
    GuestMapping a virtio-video resource holds)."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.view = memoryview(bytearray(length))

    def release(self) -> None:
        pass


class FakeMapping:
    """A GuestMapping over a FakeHandle's RAM.  Like the shim, release()
    while something derived from the view is alive (a numpy array a write
    goes through) still unmaps, and is counted in ``handle.kept_views``."""

    def __init__(self, handle: FakeHandle, address: int, length: int, writable: bool) -> None:
        self.handle, self.address, self.length, self.writable = (handle, address, length,
                                                                 writable)
        self._view: memoryview | None = memoryview(handle.ram)[address:address + length]
        if not writable:
            self._view = self._view.toreadonly()

    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise ValueError("guest mapping was released")
        return self._view

    def release(self) -> None:
        if self._view is None:
            return
        try:
            self._view.release()
        except BufferError:             # exported: a write is going through it
            self.handle.kept_views += 1
        self._view = None
        self.handle.mappings.discard(self)


class FakeHandle:
    """A device handle with ``ram_size`` bytes of guest RAM to map, a used
    ring (``used``: requests made with :meth:`request`, in the order they
    reached the guest) and QEMU's lock (``bql``), which the test takes
    where QEMU would (:meth:`call`, :meth:`reset`) and a batch takes to push."""

    name = "fake"
    live = True
    pending_requests = 0

    def __init__(self, ram_size: int = 0) -> None:
        self.config_notifications = 0
        self.ram = bytearray(ram_size)
        self.mappings: set[FakeMapping] = set()
        self.kept_views = 0
        self.bql = threading.RLock()
        self.used: list[FakeRequest] = []
        self.live_requests: set[FakeRequest] = set()
        self.requests: list[FakeRequest] = []
        self.resets = 0
        self.batch_waits_for_bql = threading.Event()    # a batch's end is about to push
        self._batch = threading.local()

    def map_guest(self, address: int, length: int, writable: bool = True) -> FakeMapping:
        if not self.ram or address + length > len(self.ram):
            raise ValueError("no guest RAM there")
        mapping = FakeMapping(self, address, length, writable)
        self.mappings.add(mapping)
        return mapping

    def notify_config(self) -> None:
        self.config_notifications += 1

    # -- requests and the used ring ------------------------------------------------
    def request(self, readable: list[bytes], writable_sizes: list[int],
                queue: int = 0) -> FakeRequest:
        request = FakeRequest(readable, writable_sizes, queue, handle=self)
        self.live_requests.add(request)
        self.requests.append(request)
        return request

    def push(self, request: FakeRequest) -> None:
        self.live_requests.discard(request)
        held = getattr(self._batch, "held", None)
        if held is not None:
            held.append((self.resets, request))
        else:
            with self.bql:
                self.used.append(request)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        self._batch.held = []
        try:
            yield
        finally:
            held, self._batch.held = self._batch.held, None
            if held:
                self.batch_waits_for_bql.set()
                with self.bql:      # a reset meanwhile dropped what it held
                    self.used.extend(r for n, r in held if n == self.resets)

    def call(self, model: Any, queue: int, request: FakeRequest) -> None:
        """What QEMU's main loop does for an available element."""
        with self.bql:
            model.handle_request(queue, request)

    def reset(self, model: Any) -> None:
        """A device reset: the model first, then every held request is
        dropped and every mapping released, as the shim does."""
        with self.bql:
            model.reset()
            self.resets += 1
            for request in list(self.live_requests):
                request.cancel()
            self.live_requests.clear()
            for mapping in list(self.mappings):
                mapping.release()
