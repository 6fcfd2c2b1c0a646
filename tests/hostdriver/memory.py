"""Guest RAM shared with QEMU through a memory-backend-file in /dev/shm."""

from __future__ import annotations

import mmap
import struct


class GuestMemory:
    """Guest-physical addresses [base, base + size) of a mapped RAM file."""

    def __init__(self, mm: mmap.mmap, base: int, size: int) -> None:
        self.mm = mm
        self.base = base
        self.size = size

    def _off(self, gpa: int, n: int) -> int:
        off = gpa - self.base
        if off < 0 or off + n > self.size:
            raise ValueError(f"0x{gpa:x}+{n} is outside guest RAM")
        return off

    def read(self, gpa: int, n: int) -> bytes:
        off = self._off(gpa, n)
        return self.mm[off:off + n]

    def write(self, gpa: int, data: bytes) -> None:
        off = self._off(gpa, len(data))
        self.mm[off:off + len(data)] = data

    def unpack(self, fmt: str, gpa: int) -> tuple:
        return struct.unpack_from(fmt, self.mm, self._off(gpa, struct.calcsize(fmt)))

    def pack(self, fmt: str, gpa: int, *values: int) -> None:
        struct.pack_into(fmt, self.mm, self._off(gpa, struct.calcsize(fmt)), *values)

    def u16(self, gpa: int) -> int:
        return self.unpack("<H", gpa)[0]

    def u32(self, gpa: int) -> int:
        return self.unpack("<I", gpa)[0]


class Allocator:
    """Bump allocation with exact-size reuse: enough for tests and benches."""

    def __init__(self, start: int, end: int) -> None:
        self.next = start
        self.end = end
        self.free_lists: dict[int, list[int]] = {}

    def alloc(self, size: int, align: int = 64) -> int:
        size = max(size, 1)
        size = (size + align - 1) & ~(align - 1)
        reuse = self.free_lists.get(size)
        if reuse:
            return reuse.pop()
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError("test guest RAM exhausted")
        self.next = addr + size
        self._sizes = getattr(self, "_sizes", {})
        self._sizes[addr] = size
        return addr

    def free(self, addr: int) -> None:
        size = self._sizes[addr]
        self.free_lists.setdefault(size, []).append(addr)
