"""The virtio-mmio (version 2) transport of Arm ``virt`` machines."""

from __future__ import annotations

from tests.hostdriver.qtest import QTest

VIRT_MMIO_BASE, VIRT_MMIO_STRIDE, VIRT_MMIO_SLOTS = 0x0A000000, 0x200, 32

MAGIC, VERSION, DEVICE_ID, VENDOR_ID = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY = 0x030, 0x034, 0x038, 0x044
QUEUE_NOTIFY, INTERRUPT_STATUS, INTERRUPT_ACK, STATUS = 0x050, 0x060, 0x064, 0x070
QUEUE_DESC, QUEUE_AVAIL, QUEUE_USED = 0x080, 0x090, 0x0A0
SHM_SEL, SHM_LEN, SHM_BASE = 0x0AC, 0x0B0, 0x0B8      # 64-bit: low word, high word
SHM_ABSENT = 0xFFFFFFFFFFFFFFFF                        # the length of a missing region
CONFIG = 0x100


def scan_slots(qt: QTest) -> list[int]:
    """Base addresses of the virt machine's transports that have a device."""
    found = []
    for slot in range(VIRT_MMIO_SLOTS):
        base = VIRT_MMIO_BASE + slot * VIRT_MMIO_STRIDE
        if qt.read(base + MAGIC, 4) == 0x74726976 and qt.read(base + DEVICE_ID, 4):
            found.append(base)
    return found


class MmioTransport:
    kind = "mmio"

    def __init__(self, qt: QTest, base: int,
                 counts: dict[int, list[int]] | None = None) -> None:
        """``counts``: the machine's interrupt counts by transport address,
        which outlive this object (a re-scan makes new ones)."""
        self.qt, self.base = qt, base
        if qt.read(base + VERSION, 4) != 2:
            raise RuntimeError("virtio-mmio transport is legacy (version 1); "
                               "start QEMU with -global virtio-mmio.force-legacy=false")
        # rising edges of the line with bit 0 (used buffer), with bit 1 (config)
        self.counts = (counts if counts is not None else {}).setdefault(base, [0, 0])

    def _r(self, off: int) -> int:
        return self.qt.read(self.base + off, 4)

    def _w(self, off: int, v: int, wait: bool = True) -> None:
        self.qt.write(self.base + off, 4, v, wait)

    @property
    def device_id(self) -> int:
        return self._r(DEVICE_ID)

    def get_status(self) -> int:
        return self._r(STATUS)

    def shm_regions(self) -> dict[int, tuple[int, int]]:
        """Shared memory regions: {id: (guest-physical address, length)}.
        Each of the 256 IDs is selected and asked for; a length of all ones
        says there is none (QEMU's virtio-mmio has none at all)."""
        if not hasattr(self, "_shm"):
            self._shm: dict[int, tuple[int, int]] = {}
            for shm_id in range(256):
                self._w(SHM_SEL, shm_id)
                length = self._r(SHM_LEN) | self._r(SHM_LEN + 4) << 32
                if length != SHM_ABSENT:
                    base = self._r(SHM_BASE) | self._r(SHM_BASE + 4) << 32
                    self._shm[shm_id] = (base, length)
        return dict(self._shm)

    def set_status(self, v: int) -> None:
        self._w(STATUS, v)

    def device_features(self) -> int:
        feats = 0
        for half in (0, 1):
            self._w(DEVICE_FEATURES_SEL, half)
            feats |= self._r(DEVICE_FEATURES) << (32 * half)
        return feats

    def set_driver_features(self, feats: int) -> None:
        for half in (0, 1):
            self._w(DRIVER_FEATURES_SEL, half)
            self._w(DRIVER_FEATURES, (feats >> (32 * half)) & 0xFFFFFFFF)

    def num_queues(self) -> int:
        n = 0
        while n < 1024 and self.queue_max_size(n):
            n += 1
        return n

    def queue_max_size(self, index: int) -> int:
        self._w(QUEUE_SEL, index)
        return self._r(QUEUE_NUM_MAX)

    def setup_queue(self, index: int, size: int, desc: int, avail: int, used: int) -> None:
        self._w(QUEUE_SEL, index)
        self._w(QUEUE_NUM, size)
        for off, addr in ((QUEUE_DESC, desc), (QUEUE_AVAIL, avail), (QUEUE_USED, used)):
            self._w(off, addr & 0xFFFFFFFF)
            self._w(off + 4, addr >> 32)
        self._w(QUEUE_READY, 1)

    def setup_config_vector(self) -> None:
        pass

    def notify(self, index: int, wait: bool = True) -> None:
        self._w(QUEUE_NOTIFY, index, wait)

    def config_read(self, offset: int, size: int) -> int:
        return self.qt.read(self.base + CONFIG + offset, size)

    def config_write(self, offset: int, size: int, v: int) -> None:
        self.qt.write(self.base + CONFIG + offset, size, v)

    def interrupts(self, index: int | None) -> int:
        """Interrupts so far: every queue shares the device's one line, so
        ``index`` only tells used-buffer interrupts (bit 0 of
        InterruptStatus) from configuration changes (None, bit 1).

        The line is level-triggered and follows InterruptStatus: it rises
        when a bit goes from 0 to 1 and falls when the driver acknowledges.
        Each bit found set here is acknowledged at once, so each time it is
        found set is one rising edge, one interrupt as a guest's handler
        sees it: a second notification before the acknowledgement raises
        nothing (qtest's irq_intercept_out on the transport would report
        the same edges, for one device per machine only)."""
        status = self._r(INTERRUPT_STATUS)
        if status:
            self._w(INTERRUPT_ACK, status)
            self.counts[0] += status & 1
            self.counts[1] += status >> 1 & 1
        return self.counts[1 if index is None else 0]
