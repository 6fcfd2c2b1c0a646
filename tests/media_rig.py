"""A virtio-media device in process, for the pure-Python tier: the model
with stand-ins for QEMU's requests, guest RAM and region 0
(:mod:`tests.fakes`), sixteen event buffers posted as the Linux driver
does, and a :class:`~tests.media_client.MediaClient` on the commandq."""

from __future__ import annotations

import time

from pyemb.media import protocol as p
from pyemb.media.device import MediaDevice
from tests.fakes import FakeHandle
from tests.media_client import Event, MediaClient, parse_event


class Rig:
    """A device of ``role`` (camera or decoder), its event buffers and a client."""

    def __init__(self, config: dict | None = None, shm: int = 64 << 20, role: str = "camera",
                 backend_class: type | None = None, ram: int = 16 << 20,
                 event_buffers: int = 16) -> None:
        self.handle = FakeHandle(ram_size=ram)
        self.handle.shared_memory = memoryview(bytearray(shm)) if shm else None
        self.discarded: list[tuple[int, int]] = []
        self.handle.discard_shared_memory = lambda o, n: self.discarded.append((o, n))
        self.dev = MediaDevice(self.handle, config or {}, backend_class=backend_class,
                               role=role)
        # Every event the model raises, in order, whether or not it reached
        # the used ring yet: what "nothing after X" is checked against.
        self.posted: list[Event] = []
        post = self.dev.events.post

        def record(payload: bytes) -> None:
            self.posted.append(parse_event(payload))
            post(payload)

        self.dev.events.post = record
        self.event_buffers = []
        self.inbox: list[Event] = []        # taken in, not yet polled
        self._used_seen = 0                 # how far poll() has read the used ring
        self.reply_at = 0                   # where the last command's reply is on it
        for _ in range(event_buffers):
            self.post_event_buffer()
        self.client = MediaClient(self.send)

    def send(self, readable: list[bytes], sizes: list[int]) -> bytes:
        request = self.handle.request(readable, sizes, p.COMMAND_QUEUE)
        self.handle.call(self.dev, p.COMMAND_QUEUE, request)
        # A decoder session's thread may answer, after what it completed;
        # a STREAMOFF is answered once the driver took in the events before
        # it: they are, meanwhile, as Linux's event work item would.
        deadline = time.monotonic() + 5
        while True:
            with self.handle.bql:
                used = self.handle.used
                if request in used[self._used_seen:]:
                    self.reply_at = used.index(request, self._used_seen)
                    break
                ahead = used[self._used_seen:]
                self._used_seen = len(used)
            self._take_in(ahead)
            assert time.monotonic() < deadline, "command never answered"
            time.sleep(0.0005)
        return request.reply

    def post_event_buffer(self) -> None:
        request = self.handle.request([], [p.EVENT_SIZE], p.EVENT_QUEUE)
        self.event_buffers.append(request)
        self.handle.call(self.dev, p.EVENT_QUEUE, request)

    def _take_in(self, used: list) -> None:
        """The driver acts on events off the used ring: kept for poll(),
        each buffer posted again."""
        for request in used:
            if request in self.event_buffers:
                self.event_buffers.remove(request)
                self.inbox.append(parse_event(request.reply))
                self.post_event_buffer()

    def poll(self, before: int | None = None) -> list[Event]:
        """The events that reached the used ring since the last call, in its
        order (re-posting their buffers); ``before``: only those ahead of
        that place on it (a command's reply, :attr:`reply_at`)."""
        with self.handle.bql:
            end = len(self.handle.used) if before is None else max(before, self._used_seen)
            new = self.handle.used[self._used_seen:end]
            self._used_seen = end
        self._take_in(new)
        got, self.inbox = self.inbox, []
        return got

    def events(self, count: int, timeout: float = 5.0) -> list[Event]:
        """The first ``count`` events (re-posting used buffers)."""
        deadline = time.monotonic() + timeout
        got: list[Event] = []
        while len(got) < count and time.monotonic() < deadline:
            got += self.poll()
            if len(got) < count:
                time.sleep(0.005)
        return got

    def enumerate(self, session: int, name: str, make) -> list:  # noqa: ANN001
        """ENUM_FMT-like ioctl ``name`` over index 0, 1, ... until it fails:
        the payloads it returned (``make(i)`` builds the i-th request)."""
        found = []
        for i in range(64):
            if self.client.status(session, name, make(i)):
                break
            found.append(self.client.ioctl(session, name, make(i))[0])
        return found

    def image(self, event: Event) -> bytes:
        b = event.buffer
        return bytes(self.handle.shared_memory[b.m.offset:b.m.offset + b.bytesused])

    def close(self) -> None:
        self.dev.close()
