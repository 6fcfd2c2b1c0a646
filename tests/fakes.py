"""In-process stand-ins for the C shim's Request and Device, for the
pure-Python tier: they follow the same contract (views die on completion,
double completion raises)."""

from __future__ import annotations

import contextlib


class FakeRequest:
    def __init__(self, readable: list[bytes], writable_sizes: list[int], queue: int = 0) -> None:
        self.queue = queue
        self._out = [bytearray(b) for b in readable]
        self._in = [bytearray(n) for n in writable_sizes]
        self.readable = tuple(memoryview(b).toreadonly() for b in self._out)
        self.writable = tuple(memoryview(b) for b in self._in)
        self.readable_size = sum(map(len, readable))
        self.writable_size = sum(writable_sizes)
        self.done = False
        self.cancelled = False
        self.written: int | None = None

    def complete(self, written: int = 0) -> bool:
        if self.done:
            raise RuntimeError("request already completed")
        if not 0 <= written <= self.writable_size:
            raise ValueError("written outside the writable part")
        self.done = True
        self.written = written
        for v in self.readable + self.writable:
            v.release()
        return True

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


class FakeHandle:
    name = "fake"
    live = True
    pending_requests = 0

    def __init__(self) -> None:
        self.config_notifications = 0

    def map_guest(self, address: int, length: int, writable: bool = True):
        raise ValueError("no guest RAM in the pure-Python tier")

    def notify_config(self) -> None:
        self.config_notifications += 1

    def batch(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()
