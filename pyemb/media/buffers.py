"""One V4L2 buffer queue (the vb2 side of a V4L2 driver), for virtio-media.

REQBUFS / CREATE_BUFS / QUERYBUF / PREPARE_BUF / QBUF / STREAMON / STREAMOFF
on one buffer type, with MMAP buffers in the shared memory region and
USERPTR buffers in guest pages (the driver sends their scatter-gather
list after the ``v4l2_buffer``).  A queued buffer goes to the device's
producer (:meth:`BufferQueue.take`) and comes back to the guest as a DQBUF
event (:meth:`BufferQueue.dequeue_event`).  STREAMOFF takes every buffer
back without events: the driver forgets them itself when STREAMOFF returns.

Called under the owning session's lock; the producer thread holds a buffer
it took without it.  A producer that reads or writes a buffer's memory
outside that lock marks it ``busy`` first: STREAMOFF, REQBUFS and a new
USERPTR mapping then leave its guest mappings and its block of region 0 in
``retired`` until :meth:`BufferQueue.settle`, so nothing is unmapped or
handed to another buffer under the producer.
"""

from __future__ import annotations

import ctypes as C
import errno
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pyemb.device import DeviceHandle
from pyemb.media import v4l2
from pyemb.media.protocol import SG_ENTRY, V4L2Error
from pyemb.media.shm import SharedMemory

# Buffers a queue may hold: the guest cannot make the host allocate more.
MAX_BUFFERS = 32
# Scatter-gather entries one USERPTR plane may have (a 4 KiB page each:
# 64 MiB), so a bogus list cannot make the host map without end.
MAX_SG_ENTRIES = 16384


@dataclass
class MemoryPlane:
    length: int
    offset: int | None = None               # MMAP: offset in region 0, the mem_offset
    userptr: int = 0                        # USERPTR: the guest's value, returned as is
    mappings: list[Any] = field(default_factory=list)   # USERPTR: guest RAM while queued
    bytesused: int = 0
    data_offset: int = 0


@dataclass
class Buffer:
    index: int
    planes: list[MemoryPlane]
    queued: bool = False
    prepared: bool = False
    flags: int = 0                          # what DQBUF reports (KEYFRAME, LAST, ERROR)
    timestamp_us: int = 0
    timecode: bytes = bytes(16)
    sequence: int = 0
    busy: bool = False                      # the producer uses its memory outside the lock
    retired: list[Any] = field(default_factory=list)    # mappings / region offsets to free
    field: int = v4l2.FIELD_NONE

    def views(self, shm: SharedMemory, plane: int = 0) -> list[memoryview]:
        """Where plane ``plane``'s bytes live: one view (MMAP, or a USERPTR
        in one guest range) or several (USERPTR over scattered pages)."""
        p = self.planes[plane]
        if p.offset is not None:
            return [shm.view_of(p.offset, p.length)]
        return [m.view for m in p.mappings]

    def write(self, shm: SharedMemory, data: bytes | memoryview, plane: int = 0) -> int:
        return scatter(self.views(shm, plane), data)

    def read(self, shm: SharedMemory, length: int, plane: int = 0) -> bytes:
        parts, left = [], length
        for view in self.views(shm, plane):
            if left <= 0:
                break
            parts.append(bytes(view[:left]))
            left -= len(parts[-1])
        return b"".join(parts)


def scatter(views: list[memoryview], data: bytes | memoryview) -> int:
    """Copy ``data`` across ``views`` in order; the bytes written."""
    src = memoryview(data).cast("B")
    done = 0
    for view in views:
        n = min(len(view), len(src) - done)
        if n <= 0:
            break
        view[:n] = src[done:done + n]
        done += n
    return done


class BufferQueue:
    def __init__(self, buf_type: int, handle: DeviceHandle, shm: SharedMemory,
                 userptr: bool = True,
                 timestamp_flag: int = v4l2.BUF_FLAG_TIMESTAMP_MONOTONIC) -> None:
        self.type = buf_type
        # MONOTONIC: the device's capture clock; COPY: from the OUTPUT buffer (m2m).
        self.timestamp_flag = timestamp_flag
        self.mplane = buf_type in v4l2.MPLANE_TYPES
        self.capture = buf_type in v4l2.CAPTURE_TYPES
        self._handle = handle
        self._shm = shm
        self._userptr = userptr
        self.memory = 0
        self.buffers: list[Buffer] = []
        self.streaming = False
        self.pending: deque[Buffer] = deque()      # queued, not yet taken by the producer
        self.owner: int | None = None               # the session that allocated them

    # -- allocation -------------------------------------------------------------
    @property
    def capabilities(self) -> int:
        caps = v4l2.BUF_CAP_SUPPORTS_ORPHANED_BUFS | v4l2.BUF_CAP_SUPPORTS_MAX_NUM_BUFFERS
        if self._shm.available:
            caps |= v4l2.BUF_CAP_SUPPORTS_MMAP
        if self._userptr:
            caps |= v4l2.BUF_CAP_SUPPORTS_USERPTR
        return caps

    def _check_memory(self, memory: int) -> None:
        if memory == v4l2.MEMORY_MMAP and self._shm.available:
            return
        if memory == v4l2.MEMORY_USERPTR and self._userptr:
            return
        raise V4L2Error(errno.EINVAL, "memory type not supported")

    def reqbufs(self, req: v4l2.RequestBuffers, plane_size: int, minimum: int = 1) -> None:
        self._check_memory(req.memory)
        if self.streaming:
            raise V4L2Error(errno.EBUSY, "REQBUFS while streaming")
        self.free()
        count = min(req.count, MAX_BUFFERS)
        if count:
            count = max(count, minimum)
            self.memory = req.memory
            self._add(count, plane_size)
            if not self.buffers:
                raise V4L2Error(errno.ENOMEM, "shared memory region full")
        req.count = len(self.buffers)
        req.capabilities = self.capabilities
        req.flags = 0
        C.memset(C.addressof(req) + 17, 0, 3)

    def create_bufs(self, cb: v4l2.CreateBuffers, plane_size: int) -> None:
        self._check_memory(cb.memory)
        cb.capabilities = self.capabilities
        cb.max_num_buffers = MAX_BUFFERS
        cb.flags = 0                        # no cache hints: memory is always coherent
        cb.index = len(self.buffers)
        if cb.count == 0:
            return
        if self.buffers and cb.memory != self.memory:
            raise V4L2Error(errno.EINVAL, "CREATE_BUFS with another memory type")
        before = len(self.buffers)
        if before >= MAX_BUFFERS:
            raise V4L2Error(errno.ENOBUFS, f"at most {MAX_BUFFERS} buffers")
        self.memory = cb.memory
        self._add(min(cb.count, MAX_BUFFERS - before), plane_size)
        cb.count = len(self.buffers) - before
        if cb.count == 0:
            raise V4L2Error(errno.ENOMEM, "shared memory region full")

    def _add(self, count: int, plane_size: int) -> None:
        for _ in range(count):
            plane = MemoryPlane(length=plane_size)
            if self.memory == v4l2.MEMORY_MMAP:
                offset = self._shm.allocate(plane_size)
                if offset is None:
                    break
                plane.offset = offset
            self.buffers.append(Buffer(len(self.buffers), [plane]))

    def free(self) -> None:
        """All buffers go (REQBUFS(0), close, reset); mapped ones stay orphaned."""
        self.streamoff()
        for b in self.buffers:
            for p in b.planes:
                if p.offset is not None and b.busy:
                    b.retired.append(p.offset)
                elif p.offset is not None:
                    self._shm.release(p.offset)
        self.buffers = []
        self.memory = 0

    # -- V4L2 buffer structures ------------------------------------------------
    def _buffer(self, b: v4l2.Buffer) -> Buffer:
        if b.type != self.type:
            raise V4L2Error(errno.EINVAL, "wrong buffer type")
        if b.index >= len(self.buffers):
            raise V4L2Error(errno.EINVAL, "no such buffer")
        return self.buffers[b.index]

    def fill(self, buf: Buffer, b: v4l2.Buffer, planes: list[v4l2.Plane]) -> None:
        """What QUERYBUF, QBUF and the DQBUF event report of ``buf``."""
        b.index, b.type, b.memory = buf.index, self.type, self.memory
        flags = buf.flags | self.timestamp_flag
        if buf.queued:
            flags |= v4l2.BUF_FLAG_QUEUED
        elif buf.prepared:
            flags |= v4l2.BUF_FLAG_PREPARED
        b.flags = flags
        b.field = buf.field
        b.timestamp.tv_sec, b.timestamp.tv_usec = divmod(buf.timestamp_us, 1_000_000)
        C.memmove(C.addressof(b.timecode), buf.timecode, 16)
        b.sequence = buf.sequence
        b.reserved2 = 0
        b.request_fd = 0
        plane = buf.planes[0]
        if self.mplane:
            b.length = len(buf.planes)
            for src, dst in zip(buf.planes, planes, strict=False):
                dst.bytesused, dst.length, dst.data_offset = (src.bytesused, src.length,
                                                              src.data_offset)
                if src.offset is not None:
                    dst.m.mem_offset = src.offset
                elif self.memory == v4l2.MEMORY_USERPTR:
                    dst.m.userptr = src.userptr
                C.memset(C.addressof(dst.reserved), 0, C.sizeof(dst.reserved))
            b.bytesused = 0
        else:
            b.bytesused, b.length = plane.bytesused, plane.length
            if plane.offset is not None:
                b.m.offset = plane.offset
            elif self.memory == v4l2.MEMORY_USERPTR:
                b.m.userptr = plane.userptr      # a prepared buffer's, whatever QBUF said

    def querybuf(self, b: v4l2.Buffer, planes: list[v4l2.Plane]) -> None:
        buf = self._buffer(b)
        self._check_planes(b)
        self.fill(buf, b, planes)

    def _check_planes(self, b: v4l2.Buffer) -> None:
        if self.mplane and b.length < 1:
            raise V4L2Error(errno.EINVAL, "multi-planar buffer without planes")

    def prepare(self, b: v4l2.Buffer, planes: list[v4l2.Plane], sg: bytes,
                min_size: int, queueing: bool = False) -> Buffer:
        """PREPARE_BUF, and QBUF's checks and USERPTR mapping before it
        queues the buffer (``queueing``: a prepared buffer is then fine)."""
        buf = self._buffer(b)
        self._check_planes(b)
        if b.memory != self.memory:
            raise V4L2Error(errno.EINVAL, "wrong memory type")
        if buf.queued or (buf.prepared and not queueing):
            raise V4L2Error(errno.EINVAL, "buffer already queued or prepared")
        plane_struct = planes[0] if self.mplane else None
        bytesused = plane_struct.bytesused if plane_struct is not None else b.bytesused
        if self.memory == v4l2.MEMORY_USERPTR and not buf.prepared:
            length = plane_struct.length if plane_struct is not None else b.length
            userptr = plane_struct.m.userptr if plane_struct is not None else b.m.userptr
            if length < min_size:
                raise V4L2Error(errno.EINVAL, f"USERPTR buffer of {length} < {min_size} bytes")
            self._map_userptr(buf, buf.planes[0], sg, length)
            buf.planes[0].userptr = userptr
            buf.planes[0].length = length
        plane = buf.planes[0]
        if not self.capture and not (queueing and buf.prepared):
            # QBUF of a prepared buffer keeps what PREPARE_BUF checked (vb2).
            data_offset = plane_struct.data_offset if plane_struct is not None else 0
            if bytesused > plane.length:
                raise V4L2Error(errno.EINVAL, "bytesused beyond the buffer")
            if bytesused and data_offset >= bytesused:
                raise V4L2Error(errno.EINVAL, "data_offset past bytesused")
            plane.bytesused, plane.data_offset = bytesused, data_offset
        if not self.capture and queueing:   # vb2 takes the timestamp at QBUF only
            buf.timestamp_us = b.timestamp.tv_sec * 1_000_000 + b.timestamp.tv_usec
            buf.timecode = bytes(b.timecode)
        buf.prepared = True
        return buf

    def _map_userptr(self, buf: Buffer, plane: MemoryPlane, sg: bytes, length: int) -> None:
        self._unmap(buf, plane)
        entries, covered = [], 0
        for start, size, _ in SG_ENTRY.iter_unpack(sg[: len(sg) - len(sg) % SG_ENTRY.size]):
            if covered >= length:
                break
            if len(entries) >= MAX_SG_ENTRIES:
                raise V4L2Error(errno.EINVAL, "USERPTR scatter list too long")
            entries.append((start, min(size, length - covered)))
            covered += entries[-1][1]
        if covered < length:
            raise V4L2Error(errno.EINVAL, "USERPTR scatter list shorter than the buffer")
        try:
            for start, size in entries:
                if size:
                    plane.mappings.append(self._handle.map_guest(start, size, True))
        except ValueError as e:
            self._unmap(buf, plane)
            raise V4L2Error(errno.EFAULT, f"USERPTR: {e}") from None

    @staticmethod
    def _unmap(buf: Buffer, plane: MemoryPlane) -> None:
        if buf.busy:
            buf.retired.extend(plane.mappings)
        else:
            for m in plane.mappings:
                m.release()
        plane.mappings = []

    def settle(self, buf: Buffer) -> None:
        """The producer is done with ``buf``'s memory: what was taken back
        from it meanwhile is freed now."""
        buf.busy = False
        for item in buf.retired:
            if isinstance(item, int):
                self._shm.release(item)
            else:
                item.release()
        buf.retired = []

    def qbuf(self, b: v4l2.Buffer, planes: list[v4l2.Plane], sg: bytes, min_size: int) -> Buffer:
        buf = self.prepare(b, planes, sg, min_size, queueing=True)
        buf.queued = True
        buf.flags = 0
        self.pending.append(buf)
        self.fill(buf, b, planes)
        return buf

    # -- streaming ----------------------------------------------------------------
    def streamon(self) -> None:
        if not self.buffers:
            raise V4L2Error(errno.EINVAL, "STREAMON without buffers")
        self.streaming = True

    def streamoff(self) -> None:
        """Every buffer back to the guest, no events (the driver clears its side)."""
        self.streaming = False
        self.pending.clear()
        for buf in self.buffers:
            buf.queued = buf.prepared = False
            if self.memory == v4l2.MEMORY_USERPTR:
                for p in buf.planes:
                    self._unmap(buf, p)

    def take(self) -> Buffer | None:
        """The next queued buffer for the device, if streaming."""
        if not self.streaming or not self.pending:
            return None
        return self.pending.popleft()

    def give_back(self, buf: Buffer) -> None:
        """A buffer the producer took but did not use goes first in line again."""
        if buf.queued and buf in self.buffers:
            self.pending.appendleft(buf)

    def dequeue(self, buf: Buffer) -> tuple[v4l2.Buffer, list[v4l2.Plane]] | None:
        """The buffer is done: what its DQBUF event says, or None if it was
        taken back meanwhile (STREAMOFF, REQBUFS)."""
        if not buf.queued or buf not in self.buffers:
            return None
        buf.queued = buf.prepared = False
        b = v4l2.Buffer()
        planes = [v4l2.Plane() for _ in buf.planes] if self.mplane else []
        self.fill(buf, b, planes)
        if self.memory == v4l2.MEMORY_USERPTR:
            for p in buf.planes:
                self._unmap(buf, p)
        return b, planes
