"""Guest buffers of virtio-video resources: scatter-gather lists of guest RAM
mapped once at RESOURCE_CREATE and read or written in place."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from pyemb.device import DeviceHandle, GuestMapping, ProtocolError
from pyemb.video import protocol as p

MAX_ENTRIES = 4096                # per resource; a 4K NV12 picture is ~3000 pages
# Resources per queue of a stream: V4L2's VIDEO_MAX_FRAME, the most buffers a
# V4L2 queue can have.
MAX_RESOURCES = 64


class Budget:
    """A count a device's streams share (mapped guest entries, encoded
    picture area): taken before what it bounds is made, given back when
    that goes.  Thread-safe."""

    def __init__(self, total: int) -> None:
        self.left = total
        self._lock = threading.Lock()

    def take(self, amount: int) -> bool:
        with self._lock:
            if amount > self.left:
                return False
            self.left -= amount
            return True

    def give(self, amount: int) -> None:
        with self._lock:
            self.left += amount


@dataclass
class Resource:
    """One resource: planes_layout, plane offsets, and its mapped chunks."""

    resource_id: int
    queue_type: int
    planes_layout: int
    plane_offsets: list[int]
    chunks: list[GuestMapping]
    queued: bool = False
    older_geometry: bool = False      # made before the last resolution change
    budget: Budget | None = None      # its entries go back to it when released
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = sum(c.length for c in self.chunks)

    def release(self) -> None:
        if self.chunks and self.budget is not None:
            self.budget.give(len(self.chunks))
        for chunk in self.chunks:
            chunk.release()
        self.chunks = []

    def read(self, length: int) -> bytes:
        """The first ``length`` bytes (a copy: the parser keeps them)."""
        if self.chunks and self.chunks[0].length >= length:
            return bytes(self.chunks[0].view[:length])     # one copy, not two
        out = bytearray()
        for chunk in self.chunks:
            if len(out) >= length:
                break
            take = min(chunk.length, length - len(out))
            out += chunk.view[:take]
        return bytes(out)

    def contiguous_view(self) -> memoryview | None:
        """A single writable view over the whole buffer, if it has one chunk."""
        if len(self.chunks) == 1:
            return self.chunks[0].view
        return None

    def write(self, data: np.ndarray | bytes) -> None:
        """Scatter ``data`` (a flat byte image of the buffer) over the chunks."""
        src = memoryview(np.ascontiguousarray(data)).cast("B")
        done = 0
        for chunk in self.chunks:
            if done >= len(src):
                break
            take = min(chunk.length, len(src) - done)
            chunk.view[:take] = src[done:done + take]
            done += take


def parse_entries(body: bytes, count: int) -> list[tuple[int, int]]:
    """(address, length) of ``count`` mem entries; checks what can be
    checked without guest RAM: zero lengths, overlaps, count."""
    if count == 0 or count > MAX_ENTRIES:
        raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER,
                            f"resource with {count} entries (1..{MAX_ENTRIES})")
    if len(body) < count * p.MEM_ENTRY.size:
        raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, "entries missing from the command")
    entries = [p.MEM_ENTRY.unpack_from(body, i * p.MEM_ENTRY.size) for i in range(count)]
    if any(length == 0 for _, length in entries):
        raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, "zero-length resource entry")
    spans = sorted(entries)
    for (a, la), (b, _) in zip(spans, spans[1:], strict=False):
        if a + la > b:
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, "overlapping resource entries")
    return entries


def map_entries(handle: DeviceHandle, entries: list[tuple[int, int]],
                writable: bool) -> list[GuestMapping]:
    chunks: list[GuestMapping] = []
    try:
        for addr, length in entries:
            chunks.append(handle.map_guest(addr, length, writable))
    except ValueError as e:
        for c in chunks:
            c.release()
        raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, str(e)) from None
    return chunks
