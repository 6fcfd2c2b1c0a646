"""A virtio-media client speaking the protocol as the Linux driver does
(``../shared/guest-drivers/virtio-media/driver``), over any transport:
the pure-Python tier hands requests to the model in process, the qtest tier
sends them through QEMU with the host driver.

``send(readable, writable_sizes) -> bytes`` runs one command and returns
what the device wrote; ``post_event_buffer()`` / ``events()`` work the
eventq.
"""

from __future__ import annotations

import ctypes as C
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pyemb.media import protocol as p
from pyemb.media import v4l2

Send = Callable[[list[bytes], list[int]], bytes]
NAMES = {io.name: io for io in p.IOCTLS.values()}


class IoctlFailed(Exception):
    def __init__(self, name: str, status: int, reply: bytes) -> None:
        super().__init__(f"{name}: status {status}")
        self.status = status
        self.reply = reply


@dataclass
class Event:
    kind: int
    session: int
    body: bytes

    @property
    def buffer(self) -> v4l2.Buffer:
        return v4l2.Buffer.parse(self.body)

    @property
    def planes(self) -> list[v4l2.Plane]:
        b = C.sizeof(v4l2.Buffer)
        return [v4l2.Plane.parse(self.body[b + 64 * i:]) for i in range(v4l2.VIDEO_MAX_PLANES)]

    @property
    def v4l2_event(self) -> v4l2.Event:
        return v4l2.Event.parse(self.body)


def parse_event(data: bytes) -> Event:
    kind, session = p.HEADER.unpack_from(data)
    return Event(kind, session, data[p.HEADER.size:])


class MediaClient:
    def __init__(self, send: Send) -> None:
        self.send = send

    def open(self) -> int:
        reply = self.send([p.HEADER.pack(p.Cmd.OPEN, 0)], [p.OPEN_REPLY.size])
        status, _, session, _ = p.OPEN_REPLY.unpack_from(reply.ljust(16, b"\0"))
        if status:
            raise IoctlFailed("open", status, reply)
        return session

    def close(self, session: int) -> None:
        self.send([struct.pack("<IIII", p.Cmd.CLOSE, 0, session, 0)], [])

    def raw_ioctl(self, session: int, code: int, payload: bytes, out_size: int,
                  extra_in: bytes = b"", direction: int = p.WR) -> tuple[int, bytes]:
        readable = [p.IOCTL.pack(p.Cmd.IOCTL, 0, session, code)]
        if direction & p.W and payload + extra_in:     # virtio forbids empty descriptors
            readable.append(payload + extra_in)
        writable = [p.HEADER.size] + ([out_size] if direction & p.R and out_size else [])
        reply = self.send(readable, writable)
        status = int.from_bytes(reply[:4], "little") if len(reply) >= 4 else -1
        return status, reply[p.HEADER.size:]

    def ioctl(self, session: int, name: str, payload: v4l2.Struct | None = None,
              extra: bytes = b"", extra_out: int = 0, sg: bytes = b"",
              check: bool = True) -> tuple[v4l2.Struct, bytes]:
        """Run ioctl ``name``: (the payload the device wrote back, what
        followed it).  ``extra`` follows the payload both ways (planes,
        controls), ``sg`` only towards the device (USERPTR lists)."""
        io = NAMES[name]
        payload = payload if payload is not None else io.payload()
        status, out = self.raw_ioctl(session, io.code, bytes(payload),
                                     io.size + len(extra) + extra_out if io.direction & p.R else 0,
                                     extra + sg, io.direction)
        if status and check:
            raise IoctlFailed(name, status, out)
        back = io.payload.parse(out) if io.direction & p.R and out else payload
        return back, out[io.size:]

    def status(self, session: int, name: str, payload: v4l2.Struct | None = None,
               extra: bytes = b"") -> int:
        io = NAMES[name]
        payload = payload if payload is not None else io.payload()
        status, _ = self.raw_ioctl(session, io.code, bytes(payload),
                                   io.size + len(extra) if io.direction & p.R else 0,
                                   extra, io.direction)
        return status

    def mmap(self, session: int, offset: int, rw: bool = True) -> tuple[int, int, int]:
        reply = self.send([p.MMAP.pack(p.Cmd.MMAP, 0, session, int(rw), offset)],
                          [p.MMAP_REPLY.size])
        status, _, addr, length = p.MMAP_REPLY.unpack_from(reply.ljust(24, b"\0"))
        return status, addr, length

    def munmap(self, addr: int) -> int:
        reply = self.send([p.MUNMAP.pack(p.Cmd.MUNMAP, 0, addr)], [p.HEADER.size])
        return int.from_bytes(reply[:4], "little")

    # -- helpers for the common flows -----------------------------------------------
    def s_fmt(self, session: int, fourcc: str, width: int, height: int,
              buf_type: int = v4l2.BUF_TYPE_VIDEO_CAPTURE) -> v4l2.Format:
        f = v4l2.Format()
        f.type = buf_type
        if buf_type in v4l2.MPLANE_TYPES:
            f.fmt.pix_mp.width, f.fmt.pix_mp.height = width, height
            f.fmt.pix_mp.pixelformat = v4l2.fourcc(fourcc)
            f.fmt.pix_mp.num_planes = 1
        else:
            f.fmt.pix.width, f.fmt.pix.height = width, height
            f.fmt.pix.pixelformat = v4l2.fourcc(fourcc)
        return self.ioctl(session, "s_fmt", f)[0]

    def reqbufs(self, session: int, count: int, buf_type: int = v4l2.BUF_TYPE_VIDEO_CAPTURE,
                memory: int = v4l2.MEMORY_MMAP) -> v4l2.RequestBuffers:
        r = v4l2.RequestBuffers()
        r.count, r.type, r.memory = count, buf_type, memory
        return self.ioctl(session, "reqbufs", r)[0]

    def buffer(self, index: int, buf_type: int = v4l2.BUF_TYPE_VIDEO_CAPTURE,
               memory: int = v4l2.MEMORY_MMAP) -> tuple[v4l2.Buffer, bytes]:
        b = v4l2.Buffer()
        b.index, b.type, b.memory = index, buf_type, memory
        planes = b""
        if buf_type in v4l2.MPLANE_TYPES:
            b.length = 1
            planes = bytes(v4l2.Plane())
        return b, planes

    def querybuf(self, session: int, index: int,
                 buf_type: int = v4l2.BUF_TYPE_VIDEO_CAPTURE) -> tuple[v4l2.Buffer, list]:
        b, planes = self.buffer(index, buf_type)
        out, rest = self.ioctl(session, "querybuf", b, planes)
        return out, [v4l2.Plane.parse(rest[i * 64:]) for i in range(len(planes) // 64)]

    def qbuf(self, session: int, index: int, buf_type: int = v4l2.BUF_TYPE_VIDEO_CAPTURE,
             memory: int = v4l2.MEMORY_MMAP, bytesused: int = 0, timestamp_us: int = 0,
             userptr: int = 0, length: int = 0, sg: bytes = b"",
             check: bool = True) -> v4l2.Buffer:
        b, planes = self.buffer(index, buf_type, memory)
        b.timestamp.tv_sec, b.timestamp.tv_usec = divmod(timestamp_us, 1_000_000)
        if buf_type in v4l2.MPLANE_TYPES:
            plane = v4l2.Plane()
            plane.bytesused, plane.length, plane.m.userptr = bytesused, length, userptr
            planes = bytes(plane)
        else:
            b.bytesused, b.length, b.m.userptr = bytesused, length, userptr
        return self.ioctl(session, "qbuf", b, planes, sg=sg, check=check)[0]

    def stream(self, session: int, on: bool,
               buf_type: int = v4l2.BUF_TYPE_VIDEO_CAPTURE) -> None:
        t = v4l2.Int()
        t.value = buf_type
        self.ioctl(session, "streamon" if on else "streamoff", t)


class HostDriverMedia:
    """A virtio-media device in a qtest QEMU, driven by the host test driver:
    sixteen event buffers posted as the Linux driver does, a
    :class:`MediaClient` on the commandq, region 0 read through qtest."""

    EVENT_BUFFERS = 16

    def __init__(self, machine, device,  # noqa: ANN001 - tests.hostdriver types
                 ring: dict[str, bool] | None = None) -> None:
        """``ring``: the virtqueue features (tests/conftest.py's ``ring``)."""
        self.machine = machine
        self.device = device
        device.initialize(**(ring or {}))
        self.commandq, self.eventq = device.queues
        for _ in range(self.EVENT_BUFFERS):
            self.eventq.add([], [p.EVENT_SIZE])
        self.eventq.kick()
        self.inbox: list[Event] = []        # taken in, not yet asked for
        self.client = MediaClient(self.send)
        regions = device.shm_regions
        self.region = regions.get(0)

    def send(self, readable: list[bytes], sizes: list[int]) -> bytes:
        """A command and its answer; events that come meanwhile are taken
        in (Linux's driver does, in its own work item: a STREAMOFF waits
        for that) and kept for :meth:`events`."""
        import time
        self.commandq.add(readable, sizes)
        self.commandq.kick()
        deadline = time.monotonic() + 10
        while (used := self.commandq.poll()) is None:
            if not self._take_in():
                assert time.monotonic() < deadline, "command never answered"
                time.sleep(0.0001)
        return used.data

    def _take_in(self) -> bool:
        used = self.eventq.poll()
        if used is None:
            return False
        self.inbox.append(parse_event(used.data))
        self.eventq.add([], [p.EVENT_SIZE])
        self.eventq.kick()
        return True

    def events(self, count: int, timeout: float = 10.0) -> list[Event]:
        import time
        deadline = time.monotonic() + timeout
        while len(self.inbox) < count and time.monotonic() < deadline:
            if not self._take_in():
                time.sleep(0.001)
        got, self.inbox = self.inbox[:count], self.inbox[count:]
        return got

    def read_region(self, offset: int, length: int) -> bytes:
        assert self.region is not None
        return self.machine.qtest.memread(self.region[0] + offset, length)

    def write_region(self, offset: int, data: bytes) -> None:
        assert self.region is not None
        self.machine.qtest.memwrite(self.region[0] + offset, data)
