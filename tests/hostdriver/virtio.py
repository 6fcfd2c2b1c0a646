"""Transport-independent virtio 1.x driver: handshake and split virtqueues."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Protocol

from tests.hostdriver.memory import Allocator, GuestMemory

ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 64, 128
VIRTIO_F_VERSION_1 = 32
DESC_F_NEXT, DESC_F_WRITE = 1, 2
DESC = struct.Struct("<QIHH")           # addr, len, flags, next
USED_ELEM = struct.Struct("<II")        # id, len
U16 = struct.Struct("<H")


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
    def take_interrupt(self, index: int | None) -> bool: ...
    def wait_interrupt(self, index: int | None, timeout: float = 5.0) -> bool: ...
    def shm_regions(self) -> dict[int, tuple[int, int]]: ...


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


@dataclass
class Chain:
    """A descriptor chain made available to the device."""

    head: int
    descs: list[int]
    out_bufs: list[tuple[int, int]]
    in_bufs: list[tuple[int, int]]          # (gpa, length)
    token: int = 0                          # unique per queue: heads are reused
    slot: Slot | None = None                # None: add_raw's caller owns the buffers


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
        self.avail = alloc.alloc(6 + 2 * size, 4096)
        self.used = alloc.alloc(6 + 8 * size, 4096)
        mem.write(self.desc, bytes(16 * size))
        mem.write(self.avail, bytes(6 + 2 * size))
        mem.write(self.used, bytes(6 + 8 * size))
        # The rings are touched for every request: by offset into the
        # mapping, without GuestMemory's per-call checks.
        self.mm, self.base = mem.mm, mem.base
        self.free = list(range(size))
        self.slots: dict[tuple[tuple[int, ...], tuple[int, ...]], list[Slot]] = {}
        self.avail_idx = 0
        self.last_used = 0
        self.inflight: dict[int, Chain] = {}
        self.serial = 0
        dev.transport.setup_queue(index, size, self.desc, self.avail, self.used)

    # -- making chains available -----------------------------------------------
    def _write_chain(self, descs: list[tuple[int, int, bool]]) -> list[int]:
        if len(descs) > len(self.free):
            self._release_slots()
            if len(descs) > len(self.free):
                raise RuntimeError("virtqueue full")
        ids = [self.free.pop() for _ in descs]
        for i, (addr, length, writable) in enumerate(descs):
            flags = (DESC_F_WRITE if writable else 0) | (DESC_F_NEXT if i + 1 < len(ids) else 0)
            nxt = ids[i + 1] if i + 1 < len(ids) else 0
            DESC.pack_into(self.mm, self.desc - self.base + 16 * ids[i], addr, length, flags, nxt)
        return ids

    def _publish(self, chain: Chain) -> Chain:
        chain.token = self.serial
        self.serial += 1
        self.inflight[chain.head] = chain
        avail = self.avail - self.base
        U16.pack_into(self.mm, avail + 4 + 2 * (self.avail_idx % self.size), chain.head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        U16.pack_into(self.mm, avail + 2, self.avail_idx)
        return chain

    def add_raw(self, descs: list[tuple[int, int, bool]]) -> Chain:
        """Descriptors as (gpa, length, device_writable); nothing allocated."""
        ids = self._write_chain(descs)
        return self._publish(Chain(ids[0], ids, [(a, n) for a, n, w in descs if not w],
                                   [(a, n) for a, n, w in descs if w]))

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
                                   slot=slot))

    def _new_slot(self, out_sizes: tuple[int, ...], in_sizes: tuple[int, ...]) -> Slot:
        mem, alloc = self.dev.mem, self.dev.alloc
        out_bufs = [(alloc.alloc(n), n) for n in out_sizes]
        in_bufs = [(alloc.alloc(n), n) for n in in_sizes]
        for addr, n in in_bufs:
            mem.write(addr, bytes(n))
        ids = self._write_chain([(a, n, False) for a, n in out_bufs]
                                + [(a, n, True) for a, n in in_bufs])
        return Slot((out_sizes, in_sizes), ids, out_bufs, in_bufs)

    def _release_slots(self) -> None:
        """Give the idle slots' descriptors and buffers back."""
        for pool in self.slots.values():
            for slot in pool:
                self.free.extend(slot.descs)
                for addr, _ in slot.out_bufs + slot.in_bufs:
                    self.dev.alloc.free(addr)
        self.slots.clear()

    def kick(self, wait: bool = True) -> None:
        """Notify the device.  ``wait``: until qtest answers, by which time
        QEMU has run the queue's handler (what a synchronous call wants);
        without, the driver goes on at once, as a vCPU after a doorbell."""
        self.dev.transport.notify(self.index, wait)

    # -- taking chains back ----------------------------------------------------
    def poll(self) -> Used | None:
        mm, used = self.mm, self.used - self.base
        if U16.unpack_from(mm, used + 2)[0] == self.last_used:
            return None
        head, written = USED_ELEM.unpack_from(mm, used + 4 + 8 * (self.last_used % self.size))
        self.last_used = (self.last_used + 1) & 0xFFFF
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

    @property
    def device_id(self) -> int:
        return self.transport.device_id

    @property
    def shm_regions(self) -> dict[int, tuple[int, int]]:
        """The device's shared memory regions, {id: (guest-physical address,
        length)}: read and write them with ``machine.qtest.memread`` and
        ``memwrite`` (they are device memory, not the shared guest RAM)."""
        return self.transport.shm_regions()

    def initialize(self, want_features: int = 0, queue_size: int | None = None) -> None:
        """Reset, negotiate VERSION_1 plus ``want_features``, set up every
        queue and set DRIVER_OK."""
        t = self.transport
        t.set_status(0)
        t.set_status(ACKNOWLEDGE)
        t.set_status(ACKNOWLEDGE | DRIVER)
        offered = t.device_features()
        if not offered >> VIRTIO_F_VERSION_1 & 1:
            raise RuntimeError("device does not offer VIRTIO_F_VERSION_1")
        self.features = (offered & want_features) | (1 << VIRTIO_F_VERSION_1)
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
