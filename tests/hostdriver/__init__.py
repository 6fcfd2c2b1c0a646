"""A host-side virtio driver that drives QEMU under ``-accel qtest``.

Register accesses and interrupts go over the qtest socket; guest RAM is a
shared file that this process maps, so buffers move without hex over the
socket.  The same driver runs against pyemb's devices and QEMU's own
(``virtio-sound-pci``), on PCI (x86_64 ``pc``) and on virtio-mmio (aarch64
``virt``).

Typical use::

    with Machine.x86(["-device", "virtio-snd-py-pci"]) as m:
        dev = m.find_virtio(device_id=25)
        dev.initialize()
        reply = dev.queues[0].call([command], [64])
"""

from tests.hostdriver.machine import Machine, QemuExited
from tests.hostdriver.virtio import VirtioDevice

__all__ = ["Machine", "QemuExited", "VirtioDevice"]
