"""Transport-independent virtio 1.x driver: handshake and split virtqueues."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from tests.hostdriver.memory import Allocator, GuestMemory

ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 64, 128
VIRTIO_F_VERSION_1 = 32
DESC_F_NEXT, DESC_F_WRITE = 1, 2


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


@dataclass
class Chain:
    """A descriptor chain made available to the device."""

    head: int
    descs: list[int]
    out_bufs: list[tuple[int, int]]
    in_bufs: list[tuple[int, int]]          # (gpa, length)
    owned: list[int] = field(default_factory=list)
    token: int = 0                          # unique per queue: heads are reused


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
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.inflight: dict[int, Chain] = {}
        self.serial = 0
        dev.transport.setup_queue(index, size, self.desc, self.avail, self.used)

    # -- making chains available -----------------------------------------------
    def add_raw(self, descs: list[tuple[int, int, bool]]) -> Chain:
        """Descriptors as (gpa, length, device_writable); nothing allocated."""
        if len(descs) > len(self.free):
            raise RuntimeError("virtqueue full")
        mem = self.dev.mem
        ids = [self.free.pop() for _ in descs]
        for i, (addr, length, writable) in enumerate(descs):
            flags = (DESC_F_WRITE if writable else 0) | (DESC_F_NEXT if i + 1 < len(ids) else 0)
            nxt = ids[i + 1] if i + 1 < len(ids) else 0
            mem.pack("<QIHH", self.desc + 16 * ids[i], addr, length, flags, nxt)
        chain = Chain(ids[0], ids, [(a, n) for a, n, w in descs if not w],
                      [(a, n) for a, n, w in descs if w], token=self.serial)
        self.serial += 1
        self.inflight[chain.head] = chain
        mem.pack("<H", self.avail + 4 + 2 * (self.avail_idx % self.size), chain.head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        mem.pack("<H", self.avail + 2, self.avail_idx)
        return chain

    def add(self, out: list[bytes], in_sizes: list[int]) -> Chain:
        """Copy ``out`` into fresh guest buffers, add writable buffers of
        ``in_sizes`` bytes, and make the chain available."""
        mem, alloc = self.dev.mem, self.dev.alloc
        descs, owned = [], []
        for data in out:
            addr = alloc.alloc(len(data))
            mem.write(addr, data)
            descs.append((addr, len(data), False))
            owned.append(addr)
        for n in in_sizes:
            addr = alloc.alloc(n)
            mem.write(addr, bytes(n))
            descs.append((addr, n, True))
            owned.append(addr)
        chain = self.add_raw(descs)
        chain.owned = owned
        return chain

    def kick(self, wait: bool = True) -> None:
        """Notify the device.  ``wait``: until qtest answers, by which time
        QEMU has run the queue's handler (what a synchronous call wants);
        without, the driver goes on at once, as a vCPU after a doorbell."""
        self.dev.transport.notify(self.index, wait)

    # -- taking chains back ----------------------------------------------------
    def poll(self) -> Used | None:
        mem = self.dev.mem
        if mem.u16(self.used + 2) == self.last_used:
            return None
        head, written = mem.unpack("<II", self.used + 4 + 8 * (self.last_used % self.size))
        self.last_used = (self.last_used + 1) & 0xFFFF
        chain = self.inflight.pop(head)
        data = bytearray()
        left = written
        for addr, n in chain.in_bufs:
            take = min(n, left)
            data += mem.read(addr, take)
            left -= take
        self.free.extend(chain.descs)
        for addr in chain.owned:
            self.dev.alloc.free(addr)
        return Used(chain, written, bytes(data))

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
