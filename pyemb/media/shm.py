"""MMAP buffers in shared memory region 0: where each one lives.

The C shim owns the region's host memory and hands the model one memoryview
of it (``handle.shared_memory``); this allocator gives each MMAP plane a
page-aligned block and its offset, which is also the plane's ``mem_offset``
cookie and the offset CMD_MMAP answers.  A block a queue frees while the
guest still maps it stays reserved until the last CMD_MUNMAP (V4L2's
orphaned buffers): another session's pictures never show through an old
mapping.  Freed pages go back to the host (``discard_shared_memory``), so
the region's size bounds the host memory MMAP buffers can take.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from pyemb.device import DeviceHandle

PAGE = 4096


def page_align(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


@dataclass
class Block:
    length: int                 # page-aligned
    owned: bool = True          # a queue still has it
    maps: int = 0               # CMD_MMAP not yet undone


class SharedMemory:
    def __init__(self, handle: DeviceHandle) -> None:
        self._handle = handle
        view = getattr(handle, "shared_memory", None)
        self.view: memoryview | None = view
        self.size = len(view) if view is not None else 0
        self._lock = threading.Lock()
        # The first page is never a buffer's: an mmap() of offset 0 on a queue
        # without MMAP buffers finds none (v4l2-compliance tries it on an m2m
        # node's USERPTR queue, where the other queue's MMAP buffers live).
        self._free: list[tuple[int, int]] = ([(PAGE, self.size - PAGE)]
                                             if self.size > PAGE else [])
        self._blocks: dict[int, Block] = {}

    @property
    def available(self) -> bool:
        return self.view is not None

    def allocate(self, length: int) -> int | None:
        """A block of at least ``length`` bytes: its offset, or None if full."""
        want = page_align(max(length, 1))
        with self._lock:
            for i, (start, size) in enumerate(self._free):
                if size >= want:
                    if size == want:
                        del self._free[i]
                    else:
                        self._free[i] = (start + want, size - want)
                    self._blocks[start] = Block(want)
                    return start
        return None

    def release(self, offset: int) -> None:
        """The queue is done with the block; it goes once unmapped."""
        with self._lock:
            block = self._blocks.get(offset)
            if block is None:
                return
            block.owned = False
            if block.maps == 0:
                self._free_locked(offset)

    def map(self, offset: int) -> int | None:
        """CMD_MMAP of a live block: its length, or None if there is none."""
        with self._lock:
            block = self._blocks.get(offset)
            if block is None or not block.owned:
                return None
            block.maps += 1
            return block.length

    def unmap(self, offset: int) -> bool:
        with self._lock:
            block = self._blocks.get(offset)
            if block is None or block.maps == 0:
                return False
            block.maps -= 1
            if block.maps == 0 and not block.owned:
                self._free_locked(offset)
            return True

    def view_of(self, offset: int, length: int) -> memoryview:
        assert self.view is not None
        return self.view[offset:offset + length]

    def reset(self) -> None:
        """Device reset: the guest's mappings are gone with its driver."""
        with self._lock:
            for offset in list(self._blocks):
                self._free_locked(offset)

    @property
    def used(self) -> int:
        with self._lock:
            return sum(b.length for b in self._blocks.values())

    def _free_locked(self, offset: int) -> None:
        block = self._blocks.pop(offset)
        discard = getattr(self._handle, "discard_shared_memory", None)
        if discard is not None:
            discard(offset, block.length)
        self._free.append((offset, block.length))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for start, size in self._free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((start, size))
        self._free = merged
