"""virtio-media-py: the device model of virtio-media (device 48).

The commandq carries OPEN / CLOSE / IOCTL / MMAP / MUNMAP, each answered at
once on QEMU's main loop; the eventq returns buffers (DQBUF), V4L2 events
and session errors.  What a node does is its kind's business: ``role=camera``
(the default, :mod:`pyemb.media.camera`) or ``role=decoder``
(:mod:`pyemb.media.decoder`); this module only parses the wire format and
routes commands to sessions.

Limits a guest cannot go past (each answered with an errno, not host memory):
``[media] max_sessions`` open sessions (default 1024, then ENOMEM; a
session without buffers costs about a kilobyte, and v4l2-compliance wants
at least 100 opens);
:data:`pyemb.media.buffers.MAX_BUFFERS` buffers per queue; MMAP buffers
within the shared memory region (``shm-size``, then ENOMEM); 256 events
waiting for event buffers (past that the oldest goes).

STREAMOFF and REQBUFS are answered only once the driver has acted on the
DQBUF events delivered before them, at most :data:`FENCE_TIMEOUT_S` later,
and the waiting DQBUF events of that queue are dropped (the buffers come
back by the STREAMOFF itself).  Linux's driver empties its list of done
buffers when such an answer comes and frees its buffer array on REQBUFS,
but takes events in on a work item of its own: an event that arrived
after the answer would put a buffer back on the list, and the next one
for that buffer links it twice (list corruption, a kernel oops in DQBUF).
Its commands time out after 5 s, hence the bound.
"""

from __future__ import annotations

import ctypes as C
import errno
from collections.abc import Callable, Mapping
from typing import Any

from pyemb import log
from pyemb.config import ConfigError, get_int, section
from pyemb.device import DeviceHandle, DeviceModel, Request, read_all, write_all
from pyemb.events import EventQueue
from pyemb.media import protocol as p
from pyemb.media import v4l2
from pyemb.media.protocol import V4L2Error
from pyemb.media.session import Session
from pyemb.media.shm import SharedMemory

# What a command is read of at most (on the main loop): an ioctl's payload
# (a few KB) and its USERPTR scatter lists (MAX_SG_ENTRIES a plane, 16 bytes
# each, VIDEO_MAX_PLANES planes: 2 MiB), with room to spare.
MAX_COMMAND_BYTES = 4 << 20

MAX_EXT_CONTROLS = 1024           # V4L2_CID_MAX_CTRLS
EVENT_BACKLOG = 256
FENCE_TIMEOUT_S = 2.0
# The ioctls after which the driver forgets the buffers of a queue.
FENCED_IOCTLS = {"streamoff", "reqbufs"}


class MediaDevice(DeviceModel):
    device_id = p.DEVICE_ID
    queue_sizes = (64, 64)
    config_size = p.CONFIG.size

    def __init__(self, handle: DeviceHandle, config: Mapping[str, Any],
                 backend_class: type | None = None, role: str = "camera") -> None:
        self.handle = handle
        media = section(config, "media")
        self.max_sessions = get_int(media, "max_sessions", 1024, 1, 65536, "media")
        self.shm = SharedMemory(handle)
        self.events = EventQueue(p.EVENT_SIZE, EVENT_BACKLOG)
        self.guest_log = log.GuestLog()     # what the guest causes, bounded device-wide
        self.sessions: dict[int, Session] = {}
        self._next_session = 1
        self._answering: Session | None = None     # the session an IOCTL went to
        self._fence: tuple[int, int] | None = None  # (session, queue) it cleared
        self.kind = self._make_kind(role, handle, config, backend_class)
        card = media.get("card", self.kind.card)
        if not isinstance(card, str):
            raise ConfigError("config: media.card must be a string")
        self.card = card
        super().__init__(handle, config)

    def _make_kind(self, role: str, handle: DeviceHandle, config: Mapping[str, Any],
                   backend_class: type | None) -> Any:
        if role == "camera":
            from pyemb.media.camera import Camera
            return Camera(self, config, backend_class)
        if role == "decoder":
            from pyemb.media.decoder import Decoder
            return Decoder(self, config, backend_class)
        raise ConfigError(f"virtio-media-py: role must be camera or decoder, not '{role}'")

    def queue_handlers(self) -> list[Callable[[Request], None]]:
        return [self._command, self.events.on_buffer]

    def read_config(self) -> bytes:
        return p.CONFIG.pack(self.kind.device_caps, v4l2.VFL_TYPE_VIDEO, v4l2.cstr(self.card))

    # -- lifecycle ----------------------------------------------------------------
    def reset(self) -> None:
        for session in list(self.sessions.values()):
            self.kind.close_session(session)
        self.sessions.clear()
        self.events.clear()
        self.shm.reset()
        super().reset()

    def close(self) -> None:
        self.reset()
        self.kind.close()

    def fail_request(self, queue: int, request: Request) -> None:
        if queue == p.COMMAND_QUEUE and request.writable_size >= p.HEADER.size:
            request.complete(write_all(request, p.reply(errno.EIO)))
        else:
            request.complete(0)

    # -- commands -------------------------------------------------------------------
    def _command(self, request: Request) -> None:
        data = read_all(request, MAX_COMMAND_BYTES)
        self._answering = self._fence = None
        reply = self._dispatch(data)
        if reply is None:                   # CLOSE: nothing to write
            request.complete(0)
            return
        if request.writable_size < p.HEADER.size:   # a malformed chain: nothing to say
            request.complete(0)
            return
        send = self._answer(request, reply, self._fence)
        session = self._answering
        if session is not None and session.answer_later(send):
            return                          # its thread answers, after what it completed
        send()

    def _answer(self, request: Request, reply: bytes,
                fence: tuple[int, int] | None) -> Callable[[], None]:
        """What sends ``reply``: at once, or for a STREAMOFF or REQBUFS,
        once the driver has taken in the events before it."""
        def send() -> None:
            if not request.done:            # else a reset took it
                request.complete(write_all(request, reply))

        if fence is None:
            return send

        def fenced() -> None:
            self.events.drop(lambda e: p.dqbuf_event_queue(e) != fence)
            self.events.after_acted_on(send, FENCE_TIMEOUT_S)

        return fenced

    def _dispatch(self, data: bytes) -> bytes | None:
        if len(data) < p.HEADER.size:
            return p.reply(errno.EINVAL)
        cmd = int.from_bytes(data[:4], "little")
        try:
            if cmd == p.Cmd.OPEN:
                return self._open()
            if cmd == p.Cmd.CLOSE:
                self._close(data)
                return None
            if cmd == p.Cmd.IOCTL:
                return self._ioctl(data)
            if cmd == p.Cmd.MMAP:
                return self._mmap(data)
            if cmd == p.Cmd.MUNMAP:
                return self._munmap(data)
        except V4L2Error as e:
            return p.reply(e.errno)
        return p.reply(errno.ENOTTY)

    def _open(self) -> bytes:
        if len(self.sessions) >= self.max_sessions:
            raise V4L2Error(errno.ENOMEM, "too many sessions")
        session_id = self._next_session
        self._next_session = self._next_session % 0xFFFFFFFF + 1
        self.sessions[session_id] = self.kind.open_session(session_id)
        return p.OPEN_REPLY.pack(0, 0, session_id, 0)

    def _session(self, session_id: int) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise V4L2Error(errno.EINVAL, f"no session {session_id}")
        return session

    def _close(self, data: bytes) -> None:
        if len(data) < 12:
            return
        session_id = int.from_bytes(data[8:12], "little")
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self.kind.close_session(session)
            self.events.drop(lambda e: p.HEADER.unpack_from(e)[1] != session_id)

    def _ioctl(self, data: bytes) -> bytes:
        if len(data) < p.IOCTL.size:
            raise V4L2Error(errno.EINVAL, "short IOCTL")
        _, _, session_id, code = p.IOCTL.unpack_from(data)
        session = self._answering = self._session(session_id)
        io = p.IOCTLS.get(code)
        if io is None:
            raise V4L2Error(errno.ENOTTY, f"ioctl {code}")
        body = data[p.IOCTL.size:]
        if io.direction & p.W:
            if len(body) < io.size:
                raise V4L2Error(errno.EINVAL, f"{io.name}: payload of {len(body)} bytes")
            payload = io.payload.parse(body)
        else:
            payload = io.payload()
        extra = body[io.size:] if io.direction & p.W else b""
        self._check_extra(io, payload, extra)
        if io.name in FENCED_IOCTLS:
            buf_type = payload.value if io.name == "streamoff" else payload.type
            self._fence = (session_id, buf_type)
        try:
            tail = session.ioctl(io, payload, extra)
        except V4L2Error as e:
            if e.payload is not None and io.direction & p.R:
                return p.reply(e.errno) + e.payload
            raise
        if not io.direction & p.R:
            return p.reply()
        return p.reply() + bytes(payload) + (tail or b"")

    @staticmethod
    def _check_extra(io: p.Ioctl, payload: v4l2.Struct, extra: bytes) -> None:
        """The arrays that follow a payload: there, and of a sane count."""
        if io.name in p.BUFFER_IOCTLS and payload.type in v4l2.MPLANE_TYPES:
            if not 1 <= payload.length <= v4l2.VIDEO_MAX_PLANES:
                raise V4L2Error(errno.EINVAL, "plane count")
            if len(extra) < payload.length * C.sizeof(v4l2.Plane):
                raise V4L2Error(errno.EINVAL, "planes missing")
        if io.name in p.EXT_CTRL_IOCTLS:
            if payload.count > MAX_EXT_CONTROLS:
                raise V4L2Error(errno.EINVAL, "too many controls")
            if len(extra) < payload.count * C.sizeof(v4l2.ExtControl):
                raise V4L2Error(errno.EINVAL, "controls missing")

    def _mmap(self, data: bytes) -> bytes:
        if len(data) < p.MMAP.size:
            raise V4L2Error(errno.EINVAL, "short MMAP")
        _, _, session_id, _flags, offset = p.MMAP.unpack_from(data)
        self._session(session_id)
        if not self.shm.available:
            raise V4L2Error(errno.ENODEV, "no shared memory region")
        length = self.shm.map(offset)
        if length is None:
            raise V4L2Error(errno.EINVAL, f"no MMAP buffer at offset {offset:#x}")
        return p.MMAP_REPLY.pack(0, 0, offset, length)

    def _munmap(self, data: bytes) -> bytes:
        if len(data) < p.MUNMAP.size:
            raise V4L2Error(errno.EINVAL, "short MUNMAP")
        _, _, addr = p.MUNMAP.unpack_from(data)
        if not self.shm.unmap(addr):
            raise V4L2Error(errno.EINVAL, f"nothing mapped at {addr:#x}")
        return p.reply()
