"""Transport-independent virtio 1.x driver: handshake and split virtqueues,
with VIRTIO_RING_F_EVENT_IDX and VIRTIO_RING_F_INDIRECT_DESC when asked for
(as Linux's virtio_ring.c uses them), and interrupts counted per vector."""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from tests.hostdriver.memory import Allocator, GuestMemory

ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 64, 128
VIRTIO_F_VERSION_1 = 32
VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX = 28, 29
DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4
USED_F_NO_NOTIFY = 1                    # used->flags: the device asks for no kicks
DESC = struct.Struct("<QIHH")           # addr, len, flags, next
USED_ELEM = struct.Struct("<II")        # id, len
U16 = struct.Struct("<H")


def store_u16(mm: Any, offset: int, value: int) -> None:
    """One 16-bit store into guest memory, as a driver's WRITE_ONCE of a ring
    index.  ``struct.pack_into`` zeroes its destination before it writes
    the value (CPython's s_pack_internal), so a device reading the avail
    index at that moment saw 0: QEMU then took its shadow index for new
    entries and popped slots never published (the protocol fuzzer's
    "zero sized buffers" and "came back again", about once a million
    inputs, more under load; caught with a check in QEMU's
    vring_avail_idx(): "read 0, again 3191")."""
    ctypes.c_uint16.from_buffer(mm, offset).value = value


class Transport(Protocol):
    kind: str
    device_id: int

    def get_status(self) -> int: ...
    def set_status(self, v: int) -> None: ...
    def device_features(self) -> int: ...
    def set_driver_features(self, feats: int) -> None: ...
    def num_queues(self) -> int: ...
    def queue_max_size(self, index: int) -> int: ...
    def setup_queue(self, index: int, size: int, desc: int, avail: int, used: int) -> None: ...
    def setup_config_vector(self) -> None: ...
    def notify(self, index: int, wait: bool = True) -> None: ...
    def config_read(self, offset: int, size: int) -> int: ...
    def config_write(self, offset: int, size: int, v: int) -> None: ...
    def interrupts(self, index: int | None) -> int: ...
    def shm_regions(self) -> dict[int, tuple[int, int]]: ...


_fence = threading.Lock()


def memory_barrier() -> None:
    """A full barrier between this process's stores to guest RAM and its
    later loads (virtio_mb() in Linux): a lock's atomic read-modify-write is
    one on x86 and Arm.  Needed where the driver writes a ring index and
    then reads the device's (event index, kick suppression): QEMU's threads
    read and write the same shared RAM."""
    with _fence:
        pass


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event(): has the index moved past ``event`` going from
    ``old`` to ``new`` (16-bit, wrapping)?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


@dataclass
class Slot:
    """Guest buffers and a written descriptor chain for requests of one
    shape (buffer sizes), kept for the next request of that shape: a driver
    reuses its request structures instead of allocating, zeroing and
    describing fresh ones every time."""

    shape: tuple[tuple[int, ...], tuple[int, ...]]     # out and in sizes
    descs: list[int]
    out_bufs: list[tuple[int, int]]
    in_bufs: list[tuple[int, int]]          # (gpa, length)
    table: int | None = None                # the indirect descriptor table, if any


@dataclass
class Chain:
    """A descriptor chain made available to the device."""

    head: int
    descs: list[int]
    out_bufs: list[tuple[int, int]]
    in_bufs: list[tuple[int, int]]          # (gpa, length)
    token: int = 0                          # unique per queue: heads are reused
    slot: Slot | None = None                # None: add_raw's caller owns the buffers
    table: int | None = None                # the indirect descriptor table, if any


@dataclass
class Used:
    """A chain the device has returned: ``written`` bytes, and their data."""

    chain: Chain
    written: int
    data: bytes


class SplitQueue:
    def __init__(self, dev: VirtioDevice, index: int, size: int) -> None:
        self.dev, self.index, self.size = dev, index, size
        mem, alloc = dev.mem, dev.alloc
        self.desc = alloc.alloc(16 * size, 4096)
        self.avail = alloc.alloc(6 + 2 * size, 4096)       # flags, idx, ring, used_event
        self.used = alloc.alloc(6 + 8 * size, 4096)        # flags, idx, ring, avail_event
        mem.write(self.desc, bytes(16 * size))
        mem.write(self.avail, bytes(6 + 2 * size))
        mem.write(self.used, bytes(6 + 8 * size))
        # The rings are touched for every request: by offset into the
        # mapping, without GuestMemory's per-call checks.
        self.mm, self.base = mem.mm, mem.base
        self.used_event = self.avail - self.base + 4 + 2 * size
        self.avail_event = self.used - self.base + 4 + 8 * size
        self.event_idx = bool(dev.features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.indirect = bool(dev.features >> VIRTIO_RING_F_INDIRECT_DESC & 1)
        self.free = list(range(size))
        self.slots: dict[tuple[tuple[int, ...], tuple[int, ...]], list[Slot]] = {}
        self.avail_idx = 0
        self.kicked_idx = 0                 # avail_idx at the last kick decision
        self.last_used = 0
        self.inflight: dict[int, Chain] = {}
        self.serial = 0
        self.kicks = 0                      # notifications sent
        self.kicks_suppressed = 0           # kicks the device's avail_event (or flags) spared
        dev.transport.setup_queue(index, size, self.desc, self.avail, self.used)

    # -- making chains available -----------------------------------------------
    def _write_chain(self, descs: list[tuple[int, int, bool]]) -> tuple[list[int], int | None]:
        """Write ``descs`` as a chain in the descriptor table, or, with
        INDIRECT_DESC negotiated and more than one buffer, as an indirect
        table behind one descriptor (as Linux does).  Returns the ring's
        descriptor IDs and the indirect table's address (None if direct)."""
        if self.indirect and len(descs) > 1:
            ids = self._take_ids(1)
            table = self.dev.alloc.alloc(16 * len(descs), 16)
            self._pack_descs(table - self.base, list(range(len(descs))), descs)
            DESC.pack_into(self.mm, self.desc - self.base + 16 * ids[0], table,
                           16 * len(descs), DESC_F_INDIRECT, 0)
            return ids, table
        ids = self._take_ids(len(descs))
        self._pack_descs(self.desc - self.base, ids, descs)
        return ids, None

    def _take_ids(self, n: int) -> list[int]:
        if n > len(self.free):
            self._release_slots()
            if n > len(self.free):
                raise RuntimeError("virtqueue full")
        return [self.free.pop() for _ in range(n)]

    def _pack_descs(self, table: int, ids: list[int], descs: list[tuple[int, int, bool]]) -> None:
        for i, (addr, length, writable) in enumerate(descs):
            last = i + 1 == len(ids)
            flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
            DESC.pack_into(self.mm, table + 16 * ids[i], addr, length, flags,
                           0 if last else ids[i + 1])

    def _publish(self, chain: Chain) -> Chain:
        chain.token = self.serial
        self.serial += 1
        self.inflight[chain.head] = chain
        avail = self.avail - self.base
        store_u16(self.mm, avail + 4 + 2 * (self.avail_idx % self.size), chain.head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        store_u16(self.mm, avail + 2, self.avail_idx)
        return chain

    def add_raw(self, descs: list[tuple[int, int, bool]]) -> Chain:
        """Descriptors as (gpa, length, device_writable); nothing allocated
        but an indirect table, given back when the chain is."""
        ids, table = self._write_chain(descs)
        return self._publish(Chain(ids[0], ids, [(a, n) for a, n, w in descs if not w],
                                   [(a, n) for a, n, w in descs if w], table=table))

    def add(self, out: list[bytes], in_sizes: list[int]) -> Chain:
        """Copy ``out`` into guest buffers, add writable buffers of
        ``in_sizes`` bytes, and make the chain available.  The buffers and
        descriptors are those of an earlier request of the same shape when
        one is free; the writable ones are zeroed, so that a reply never
        shows an earlier request's bytes."""
        key = (tuple(len(data) for data in out), tuple(in_sizes))
        pool = self.slots.get(key)
        mm, base = self.mm, self.base
        if pool:
            slot = pool.pop()
            for addr, n in slot.in_bufs:
                mm[addr - base:addr - base + n] = bytes(n)
        else:
            slot = self._new_slot(*key)
        for (addr, n), data in zip(slot.out_bufs, out, strict=True):
            mm[addr - base:addr - base + n] = data
        return self._publish(Chain(slot.descs[0], slot.descs, slot.out_bufs, slot.in_bufs,
                                   slot=slot, table=slot.table))

    def _new_slot(self, out_sizes: tuple[int, ...], in_sizes: tuple[int, ...]) -> Slot:
        mem, alloc = self.dev.mem, self.dev.alloc
        out_bufs = [(alloc.alloc(n), n) for n in out_sizes]
        in_bufs = [(alloc.alloc(n), n) for n in in_sizes]
        for addr, n in in_bufs:
            mem.write(addr, bytes(n))
        ids, table = self._write_chain([(a, n, False) for a, n in out_bufs]
                                       + [(a, n, True) for a, n in in_bufs])
        return Slot((out_sizes, in_sizes), ids, out_bufs, in_bufs, table)

    def _release_slots(self) -> None:
        """Give the idle slots' descriptors and buffers back."""
        for pool in self.slots.values():
            for slot in pool:
                self.free.extend(slot.descs)
                for addr, _ in slot.out_bufs + slot.in_bufs:
                    self.dev.alloc.free(addr)
                if slot.table is not None:
                    self.dev.alloc.free(slot.table)
        self.slots.clear()

    def kick_needed(self) -> bool:
        """virtqueue_kick_prepare(): with EVENT_IDX, whether the avail index
        moved past the device's avail_event since the last kick decision;
        without, unless the device set VRING_USED_F_NO_NOTIFY."""
        new, old = self.avail_idx, self.kicked_idx
        self.kicked_idx = new
        memory_barrier()                # the avail index out before avail_event is read
        if self.event_idx:
            return need_event(U16.unpack_from(self.mm, self.avail_event)[0], new, old)
        return not U16.unpack_from(self.mm, self.used - self.base)[0] & USED_F_NO_NOTIFY

    def kick(self, wait: bool = True) -> bool:
        """Notify the device if it needs it (see :meth:`kick_needed`);
        returns whether it was notified.  ``wait``: until qtest answers, by
        which time QEMU has run the queue's handler (what a synchronous call
        wants); without, the driver goes on at once, as a vCPU after a
        doorbell."""
        if not self.kick_needed():
            self.kicks_suppressed += 1
            return False
        self.kicks += 1
        self.dev.transport.notify(self.index, wait)
        return True

    # -- taking chains back ----------------------------------------------------
    def poll(self) -> Used | None:
        mm, used = self.mm, self.used - self.base
        if U16.unpack_from(mm, used + 2)[0] == self.last_used:
            return None
        head, written = USED_ELEM.unpack_from(mm, used + 4 + 8 * (self.last_used % self.size))
        self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            # virtqueue_get_buf(): an interrupt for the next used entry, and
            # that store seen before the device's next used index is read.
            store_u16(mm, self.used_event, self.last_used)
            memory_barrier()
        chain = self.inflight.pop(head)
        data = b""
        left = written
        for addr, n in chain.in_bufs:
            if left <= 0:
                break
            take = min(n, left)
            data += mm[addr - self.base:addr - self.base + take]
            left -= take
        if chain.slot is not None:
            self.slots.setdefault(chain.slot.shape, []).append(chain.slot)
        else:
            self.free.extend(chain.descs)
            if chain.table is not None:
                self.dev.alloc.free(chain.table)
        return Used(chain, written, data)

    def wait(self, timeout: float = 10.0) -> Used:
        deadline = time.monotonic() + timeout
        while (used := self.poll()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {self.index}: no used buffer within {timeout} s")
            time.sleep(0.0001)
        return used

    def call(self, out: list[bytes], in_sizes: list[int], timeout: float = 10.0) -> Used:
        """One request, synchronously: add, kick, wait for it."""
        self.add(out, in_sizes)
        self.kick()
        return self.wait(timeout)


class VirtioDevice:
    """A virtio 1.x device behind a transport."""

    def __init__(self, transport: Transport, mem: GuestMemory, alloc: Allocator) -> None:
        self.transport, self.mem, self.alloc = transport, mem, alloc
        self.queues: list[SplitQueue] = []
        self.features = 0
        self.event_idx = False          # ring features asked for; kept across initialize()
        self.indirect = False

    @property
    def device_id(self) -> int:
        return self.transport.device_id

    @property
    def shm_regions(self) -> dict[int, tuple[int, int]]:
        """The device's shared memory regions, {id: (guest-physical address,
        length)}: read and write them with ``machine.qtest.memread`` and
        ``memwrite`` (they are device memory, not the shared guest RAM)."""
        return self.transport.shm_regions()

    def initialize(self, want_features: int = 0, queue_size: int | None = None, *,
                   event_idx: bool | None = None, indirect: bool | None = None) -> None:
        """Reset, negotiate VERSION_1 plus ``want_features``, set up every
        queue and set DRIVER_OK.  ``event_idx``, ``indirect``: negotiate
        VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC (an error if
        the device does not offer it); None keeps the choice of the last
        call (neither at first), so a test's re-initialization after a
        reset keeps the ring features its device fixture chose."""
        if event_idx is not None:
            self.event_idx = event_idx
        if indirect is not None:
            self.indirect = indirect
        ring = (self.event_idx << VIRTIO_RING_F_EVENT_IDX
                | self.indirect << VIRTIO_RING_F_INDIRECT_DESC)
        t = self.transport
        t.set_status(0)
        t.set_status(ACKNOWLEDGE)
        t.set_status(ACKNOWLEDGE | DRIVER)
        offered = t.device_features()
        if not offered >> VIRTIO_F_VERSION_1 & 1:
            raise RuntimeError("device does not offer VIRTIO_F_VERSION_1")
        if ring & ~offered:
            raise RuntimeError(f"device does not offer ring features 0x{ring & ~offered:x}")
        self.features = (offered & want_features) | ring | (1 << VIRTIO_F_VERSION_1)
        t.set_driver_features(self.features)
        t.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        if not t.get_status() & FEATURES_OK:
            raise RuntimeError("device refused the features")
        t.setup_config_vector()
        self.queues = []
        for i in range(t.num_queues()):
            size = t.queue_max_size(i)
            if queue_size:
                size = min(size, queue_size)
            self.queues.append(SplitQueue(self, i, size))
        t.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)

    def reset(self) -> None:
        self.transport.set_status(0)
        self.queues = []

    def offered_features(self) -> int:
        return self.transport.device_features()

    def config(self, size: int) -> bytes:
        return bytes(self.transport.config_read(i, 1) for i in range(size))

    def config_u32(self, offset: int) -> int:
        return self.transport.config_read(offset, 4)

    # -- interrupts ------------------------------------------------------------------
    def interrupts(self, queue: int | None) -> int:
        """How many interrupts the device has sent for ``queue`` (None: for
        a configuration change) since the machine started: messages on the
        queue's MSI-X vector on PCI (queues may share the last vector),
        rising edges of the device's line with the used-buffer bit on
        virtio-mmio (all queues share it).  Compare two readings: "exactly
        one more since X"."""
        return self.transport.interrupts(queue)

    def wait_interrupts(self, queue: int | None, count: int, timeout: float = 5.0) -> bool:
        """Wait until :meth:`interrupts` reaches ``count``; False on timeout.
        The message comes after the used entry it announces: a driver that
        saw the entry may have to wait a little for it."""
        deadline = time.monotonic() + timeout
        while self.interrupts(queue) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0002)
        return True
