"""MSI-X interrupts counted per vector on x86, through QEMU's own log.

Each MSI-X vector of each virtio-pci device gets an interrupt vector of its
own at the local APIC (address 0xFEE00000, data = that vector), as a guest
kernel programs it.  QEMU's ``apic_deliver_irq`` trace event, written to the
machine's log file (``-D``, flushed line by line), records every message the
APIC receives, so the driver counts messages, not flags.

Why not the other ways a qtest driver can see an MSI:

- MSI-X aimed at a word of guest RAM (libqos does so, this driver did): a
  second message writes the same word, so two interrupts read as one, and
  the driver clearing the word races a device thread's next message.
- qtest's ``irq_intercept_in``/``_out`` see GPIO lines (the I/O APIC's pins,
  a sysbus device's IRQ) and report level changes only; MSI never goes
  through a GPIO line.
- ``pci-testdev`` counts writes, one counter per device: a device per
  vector would change every machine's PCI topology.
"""

from __future__ import annotations

import os
import re
from collections import Counter

MSI_ADDRESS = 0xFEE00000           # the local APIC, destination 0, physical mode
FIRST_VECTOR, LAST_VECTOR = 0x30, 0xFF
DELIVERED = re.compile(rb"apic_deliver_irq .*\bvector (\d+)")


class MsiCounter:
    """Hands out APIC vectors to devices and counts the messages each gets."""

    def __init__(self, log_path: str | None) -> None:
        self.log_path = log_path        # None: interrupts are not counted
        self.fd: int | None = None
        self.offset = 0
        self.partial = b""
        self.counts: Counter[int] = Counter()
        self.by_device: dict[int, list[int]] = {}
        self.next_vector = FIRST_VECTOR

    def vectors(self, key: int, n: int) -> list[int]:
        """``n`` APIC vectors for device ``key`` (its devfn): the same ones
        every time the device is set up again (a re-scan, a replug)."""
        have = self.by_device.get(key, [])
        if len(have) < n:
            more = n - len(have)
            if self.next_vector + more > LAST_VECTOR + 1:
                raise RuntimeError("out of APIC vectors for MSI-X: fewer devices or vectors")
            have = have + list(range(self.next_vector, self.next_vector + more))
            self.next_vector += more
            self.by_device[key] = have
        return have[:n]

    def count(self, vector: int) -> int:
        """Messages delivered on APIC ``vector`` since QEMU started."""
        if self.log_path is None:
            raise RuntimeError("this machine does not count interrupts "
                               "(Machine(count_interrupts=False))")
        if self.fd is None:
            self.fd = os.open(self.log_path, os.O_RDONLY)
        while chunk := os.pread(self.fd, 1 << 20, self.offset):
            self.offset += len(chunk)
            *lines, self.partial = (self.partial + chunk).split(b"\n")
            for line in lines:
                if m := DELIVERED.search(line):
                    self.counts[int(m.group(1))] += 1
        return self.counts[vector]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
