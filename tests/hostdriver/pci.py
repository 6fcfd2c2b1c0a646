"""PCI enumeration on x86 (ports 0xcf8/0xcfc) and the virtio-pci modern
transport with MSI-X vectors aimed at the local APIC, counted per vector
(tests/hostdriver/interrupts.py)."""

from __future__ import annotations

from tests.hostdriver.interrupts import MSI_ADDRESS, MsiCounter
from tests.hostdriver.memory import GuestMemory
from tests.hostdriver.qtest import QTest

VIRTIO_VENDOR = 0x1AF4
CAP_VENDOR, CAP_MSIX = 0x09, 0x11
COMMON_CFG, NOTIFY_CFG, ISR_CFG, DEVICE_CFG = 1, 2, 3, 4
SHARED_MEMORY_CFG = 8          # struct virtio_pci_cap64: offset_hi, length_hi follow

# virtio_pci_common_cfg offsets
DFSELECT, DF, GFSELECT, GF = 0x00, 0x04, 0x08, 0x0C
MSIX_CONFIG, NUM_QUEUES, STATUS, CFG_GENERATION = 0x10, 0x12, 0x14, 0x15
Q_SELECT, Q_SIZE, Q_MSIX, Q_ENABLE, Q_NOFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
Q_DESC, Q_AVAIL, Q_USED = 0x20, 0x28, 0x30


class PciDevice:
    def __init__(self, qt: QTest, devfn: int) -> None:
        self.qt = qt
        self.devfn = devfn

    def _addr(self, off: int) -> int:
        return 0x80000000 | (self.devfn << 8) | (off & 0xFC)

    def cfg_read(self, off: int, size: int) -> int:
        self.qt.outl(0xCF8, self._addr(off))
        port = 0xCFC + (off & 3)
        return {1: self.qt.inb, 2: self.qt.inw, 4: self.qt.inl}[size](port)

    def cfg_write(self, off: int, size: int, v: int) -> None:
        self.qt.outl(0xCF8, self._addr(off))
        port = 0xCFC + (off & 3)
        {1: self.qt.outb, 2: self.qt.outw, 4: self.qt.outl}[size](port, v)

    @property
    def vendor_id(self) -> int:
        return self.cfg_read(0, 2)

    @property
    def device_id(self) -> int:
        return self.cfg_read(2, 2)

    @property
    def class_code(self) -> int:
        return self.cfg_read(8, 4) >> 8

    def capabilities(self) -> list[int]:
        caps, ptr = [], self.cfg_read(0x34, 1) & 0xFC
        while ptr:
            caps.append(ptr)
            ptr = self.cfg_read(ptr + 1, 1) & 0xFC
        return caps

    def map_bars(self, window: list[int]) -> dict[int, int]:
        """Give every memory BAR an address, naturally aligned: 32-bit BARs
        from window[0] on (below 4 GiB), 64-bit BARs from window[1] on
        (above 4 GiB, as a firmware's 64-bit window: a 256 MiB shared memory
        BAR does not fit below the x86 I/O APIC).  The windows advance past
        what was given.  Enables the device as bus master.  Returns
        {bar index: address}."""
        bars: dict[int, int] = {}
        i = 0
        while i < 6:
            off = 0x10 + 4 * i
            orig = self.cfg_read(off, 4)
            self.cfg_write(off, 4, 0xFFFFFFFF)
            probe = self.cfg_read(off, 4)
            is64 = (orig & 0x7) == 0x4
            if probe == 0 or orig & 1:       # absent or I/O BAR
                self.cfg_write(off, 4, orig)
                i += 1
                continue
            mask = probe & ~0xF
            if is64:
                self.cfg_write(off + 4, 4, 0xFFFFFFFF)
                mask |= self.cfg_read(off + 4, 4) << 32
                size = (~mask & 0xFFFFFFFFFFFFFFFF) + 1
            else:
                size = (~mask & 0xFFFFFFFF) + 1
            w = 1 if is64 and len(window) > 1 else 0
            addr = (window[w] + size - 1) & ~(size - 1)
            window[w] = addr + size
            self.cfg_write(off, 4, addr & 0xFFFFFFFF)
            if is64:
                self.cfg_write(off + 4, 4, addr >> 32)
            bars[i] = addr
            i += 2 if is64 else 1
        self.cfg_write(4, 2, self.cfg_read(4, 2) | 0x6)   # memory + bus master
        return bars


def scan_bus(qt: QTest) -> list[PciDevice]:
    found = []
    for slot in range(32):
        dev = PciDevice(qt, slot << 3)
        if dev.vendor_id != 0xFFFF:
            found.append(dev)
    return found


class PciTransport:
    """virtio-pci modern (virtio 1.x) over qtest."""

    kind = "pci"

    def __init__(self, qt: QTest, mem: GuestMemory, dev: PciDevice, bar_window: list[int],
                 msi: MsiCounter) -> None:
        self.qt, self.mem, self.pci = qt, mem, dev
        bars = dev.map_bars(bar_window)
        self.regions: dict[int, int] = {}
        self.shm: dict[int, tuple[int, int]] = {}
        for cap in dev.capabilities():
            cap_id = dev.cfg_read(cap, 1)
            if cap_id == CAP_VENDOR:
                cfg_type = dev.cfg_read(cap + 3, 1)
                bar = dev.cfg_read(cap + 4, 1)
                offset = dev.cfg_read(cap + 8, 4)
                if cfg_type in (COMMON_CFG, NOTIFY_CFG, ISR_CFG, DEVICE_CFG) \
                        and cfg_type not in self.regions:
                    self.regions[cfg_type] = bars[bar] + offset
                if cfg_type == NOTIFY_CFG:
                    self.notify_mult = dev.cfg_read(cap + 16, 4)
                if cfg_type == SHARED_MEMORY_CFG:
                    shm_id = dev.cfg_read(cap + 5, 1)
                    offset |= dev.cfg_read(cap + 16, 4) << 32
                    length = dev.cfg_read(cap + 12, 4) | dev.cfg_read(cap + 20, 4) << 32
                    self.shm[shm_id] = (bars[bar] + offset, length)
            elif cap_id == CAP_MSIX:
                self._setup_msix(cap, bars, msi)
        self.common = self.regions[COMMON_CFG]
        self.notify_offsets: dict[int, int] = {}
        self.queue_vectors: dict[int, int] = {}

    def _setup_msix(self, cap: int, bars: dict[int, int], msi: MsiCounter) -> None:
        """Give every vector an APIC vector of its own (a guest kernel's
        MSI-X set-up), so that each message is counted on its vector."""
        ctrl = self.pci.cfg_read(cap + 2, 2)
        table = self.pci.cfg_read(cap + 4, 4)
        base = bars[table & 7] + (table & ~7)
        self.msi = msi
        self.msix_vectors = min((ctrl & 0x7FF) + 1, 32)    # more would go unused
        self.apic_vectors = msi.vectors(self.pci.devfn, self.msix_vectors)
        for v, apic_vector in enumerate(self.apic_vectors):
            entry = base + 16 * v
            self.qt.write(entry, 4, MSI_ADDRESS)
            self.qt.write(entry + 4, 4, 0)
            self.qt.write(entry + 8, 4, apic_vector)   # fixed delivery, edge
            self.qt.write(entry + 12, 4, 0)            # unmasked
        self.pci.cfg_write(cap + 2, 2, (ctrl | 0x8000) & ~0x4000)

    # -- the transport interface ----------------------------------------------
    @property
    def device_id(self) -> int:
        return self.pci.device_id - 0x1040

    def shm_regions(self) -> dict[int, tuple[int, int]]:
        """Shared memory regions: {id: (guest-physical address, length)}."""
        return dict(self.shm)

    def get_status(self) -> int:
        return self.qt.read(self.common + STATUS, 1)

    def set_status(self, v: int) -> None:
        self.qt.write(self.common + STATUS, 1, v)

    def device_features(self) -> int:
        feats = 0
        for half in (0, 1):
            self.qt.write(self.common + DFSELECT, 4, half)
            feats |= self.qt.read(self.common + DF, 4) << (32 * half)
        return feats

    def set_driver_features(self, feats: int) -> None:
        for half in (0, 1):
            self.qt.write(self.common + GFSELECT, 4, half)
            self.qt.write(self.common + GF, 4, (feats >> (32 * half)) & 0xFFFFFFFF)

    def num_queues(self) -> int:
        return self.qt.read(self.common + NUM_QUEUES, 2)

    def queue_max_size(self, index: int) -> int:
        self.qt.write(self.common + Q_SELECT, 2, index)
        return self.qt.read(self.common + Q_SIZE, 2)

    def setup_queue(self, index: int, size: int, desc: int, avail: int, used: int) -> None:
        c = self.common
        self.qt.write(c + Q_SELECT, 2, index)
        self.qt.write(c + Q_SIZE, 2, size)
        for off, addr in ((Q_DESC, desc), (Q_AVAIL, avail), (Q_USED, used)):
            self.qt.write(c + off, 4, addr & 0xFFFFFFFF)
            self.qt.write(c + off + 4, 4, addr >> 32)
        # One vector per queue where the device has enough (vector 0 is for
        # config changes); otherwise the last vector is shared.
        vector = min(index + 1, self.msix_vectors - 1)
        self.qt.write(c + Q_MSIX, 2, vector)
        if self.qt.read(c + Q_MSIX, 2) != vector:
            raise RuntimeError(f"queue {index}: MSI-X vector {vector} refused")
        self.queue_vectors[index] = vector
        self.notify_offsets[index] = self.qt.read(c + Q_NOFF, 2)
        self.qt.write(c + Q_ENABLE, 2, 1)

    def setup_config_vector(self) -> None:
        self.qt.write(self.common + MSIX_CONFIG, 2, 0)

    def notify(self, index: int, wait: bool = True) -> None:
        addr = self.regions[NOTIFY_CFG] + self.notify_offsets[index] * self.notify_mult
        self.qt.write(addr, 2, index, wait)

    def config_read(self, offset: int, size: int) -> int:
        return self.qt.read(self.regions[DEVICE_CFG] + offset, size)

    def config_write(self, offset: int, size: int, v: int) -> None:
        self.qt.write(self.regions[DEVICE_CFG] + offset, size, v)

    def interrupts(self, index: int | None) -> int:
        """MSI-X messages so far on the vector of queue ``index`` (None: the
        configuration vector)."""
        vector = 0 if index is None else self.queue_vectors[index]
        return self.msi.count(self.apic_vectors[vector])
