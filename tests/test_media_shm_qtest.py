"""virtio-media-py's shared memory region 0, through tests/models.py:ShmProbe:
the PCI capability and BAR, both directions of access, shm-size, virtio-mmio,
discard_shared_memory, unplug."""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import command, start
from tests.hostdriver import Machine, QemuExited

MEDIA = 48
PROBE = "backend=tests.models:ShmProbe"
PAGE = 4096


def media(props: str = "", transport: str = "pci") -> Machine:
    return start(transport, "virtio-media-py", ",".join(p for p in (PROBE, props) if p))


@pytest.fixture
def shm():
    """A PCI machine with a 16 MiB region; yields (machine, device, base, length)."""
    m = media("shm-size=16M")
    try:
        dev = m.find_virtio(MEDIA)
        dev.initialize()
        yield m, dev, *dev.shm_regions[0]
    finally:
        m.stop()


def test_cap_says_region_0_with_the_default_size_in_a_64_bit_bar():
    m = media()
    try:
        dev = m.find_virtio(MEDIA)
        dev.initialize()
        assert list(dev.shm_regions) == [0]
        base, length = dev.shm_regions[0]
        assert length == 256 << 20
        assert base >= 1 << 32 and base % length == 0      # BAR 4, 64-bit, aligned
        assert command(dev, "size") == str(256 << 20)
    finally:
        m.stop()


def test_model_writes_are_visible_through_the_bar(shm):
    m, dev, base, length = shm
    for offset in (0, 0x123456, length - 64):
        data = os.urandom(64)
        assert command(dev, f"write {offset:#x} {data.hex()}") == "ok"
        assert m.qtest.memread(base + offset, 64) == data


def test_guest_writes_through_the_bar_are_visible_to_the_model(shm):
    m, dev, base, length = shm
    for offset in (0, 0x345678, length - 64):
        data = os.urandom(64)
        m.qtest.memwrite(base + offset, data)
        assert command(dev, f"read {offset:#x} 64") == data.hex()


def test_the_region_and_its_bytes_outlive_a_device_reset(shm):
    m, dev, base, _ = shm
    data = os.urandom(32)
    assert command(dev, f"write 0x2000 {data.hex()}") == "ok"
    dev.initialize()                    # driver reset, then a new driver
    assert command(dev, "read 0x2000 32") == data.hex()
    assert m.qtest.memread(base + 0x2000, 32) == data


def test_shm_size_0_gives_no_region():
    m = media("shm-size=0")
    try:
        dev = m.find_virtio(MEDIA)
        dev.initialize()
        assert dev.shm_regions == {}
        assert command(dev, "size") == "none"
        assert command(dev, "discard 0 4096").startswith("refused the device has no shared")
    finally:
        m.stop()


@pytest.mark.parametrize("transport", ["pci", "mmio"])
@pytest.mark.parametrize("size", ["3M", "512K", "1000"])
def test_bad_shm_size_stops_qemu_with_one_line(transport, size):
    with pytest.raises(QemuExited) as exc:
        media(f"shm-size={size}", transport)
    assert exc.value.returncode != 0
    lines = [line for line in exc.value.stderr.splitlines() if "shm-size" in line]
    assert len(lines) == 1, exc.value.stderr
    assert "shm-size must be 0 (no shared memory) or a power of two of at least 1M" in lines[0]
    assert "Traceback" not in exc.value.stderr


def test_virtio_mmio_has_no_region_and_the_device_works():
    m = media(transport="mmio")
    try:
        dev = m.find_virtio(MEDIA)
        dev.initialize()
        assert dev.shm_regions == {}
        assert command(dev, "size") == "none"
        assert command(dev, "bogus") == "unknown bogus"
    finally:
        m.stop()


@pytest.mark.parametrize("op", ["discard", "discard-in-thread"])
def test_discard_zeroes_the_range_and_nothing_around_it(shm, op):
    m, dev, base, _ = shm
    start_, end = 3 * PAGE - 100, 7 * PAGE + 100        # partial pages at both ends
    m.qtest.memwrite(base + 2 * PAGE, b"\xa5" * (6 * PAGE))
    assert command(dev, f"{op} {start_:#x} {end - start_:#x}") == "ok"
    seen = m.qtest.memread(base + 2 * PAGE, 6 * PAGE)
    lo, hi = start_ - 2 * PAGE, end - 2 * PAGE
    assert seen[lo:hi] == bytes(hi - lo)
    assert seen[:lo] == b"\xa5" * lo and seen[hi:] == b"\xa5" * (6 * PAGE - hi)
    assert command(dev, f"read {start_:#x} 16") == "00" * 16      # and Python sees zeros


@pytest.mark.parametrize("offset,length", [
    (16 << 20, 1),                     # starts at the end
    ((16 << 20) - PAGE, 2 * PAGE),     # runs past it
    (-PAGE, PAGE),
    (0, -1),
])
def test_discard_outside_the_region_is_refused(shm, offset, length):
    _, dev, _, _ = shm
    reply = command(dev, f"discard {offset} {length}")
    assert reply.startswith("refused range"), reply
    assert "outside the shared memory region (0x1000000 bytes)" in reply
    assert command(dev, "discard 0 0") == "ok"                  # empty is fine


def status_kib(m: Machine, field: str) -> int:
    """A size from QEMU's /proc/PID/status (RssAnon, VmSize), in KiB."""
    with open(f"/proc/{m.proc.pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise AssertionError(f"no {field}")


def rss_anon_kib(m: Machine) -> int:
    return status_kib(m, "RssAnon")


def test_discard_gives_the_pages_back_to_the_host(shm):
    m, dev, _, _ = shm
    before = rss_anon_kib(m)
    assert command(dev, f"touch 0 {8 << 20:#x}") == "ok"
    touched = rss_anon_kib(m)
    assert touched - before > 7 << 10                           # 8 MiB resident now
    assert command(dev, f"discard 0 {8 << 20:#x}") == "ok"
    assert touched - rss_anon_kib(m) > 7 << 10                  # and given back


def unplug(m: Machine, dev_id: str, slot: int) -> None:
    m.qmp.execute("device_del", id=dev_id)
    m.qtest.outl(0xAE08, 1 << slot)             # PIIX4 ACPI PCI hotplug: eject the slot
    m.qmp.wait_event("DEVICE_DELETED")


def test_unplug_revokes_the_view_and_frees_the_region():
    args = ["-device", f"virtio-media-py-pci,id=m0,addr=5,shm-size=64M,{PROBE}",
            "-device", f"virtio-media-py-pci,id=m1,addr=6,shm-size=0,{PROBE}"]
    with Machine.x86(args) as m:
        keeper, other = [d for d in m.virtio_devices() if d.device_id == MEDIA]
        keeper.initialize()
        other.initialize()
        data = os.urandom(16)
        assert command(keeper, f"write 0 {data.hex()}") == "ok"
        assert command(keeper, "keep") == "kept"     # the view, and a slice of it
        assert command(other, "probe-kept m0") == f"live=True view=alive slice={data.hex()}"
        unplug(m, "m0", 5)
        time.sleep(0.5)                 # finalized, and past the RCU grace period
        # The view is dead; the slice is stale but its memory is still mapped.
        assert command(other, "probe-kept m0") == f"live=False view=dead slice={data.hex()}"
        assert m.stderr().count("keeps views of guest memory after its unplug") == 1
        assert m.alive()

        # A region no view outlives is unmapped: QEMU's address space shrinks.
        m.qmp.execute("device_add", driver="virtio-media-py-pci", id="m2", addr="5",
                      backend="tests.models:ShmProbe", **{"shm-size": 512 << 20})
        fresh = next(d for d in m.virtio_devices() if d.device_id == MEDIA
                     and d.shm_regions)
        fresh.initialize()
        assert fresh.shm_regions[0][1] == 512 << 20
        assert command(fresh, "write 0x100 c0ffee") == "ok"
        assert m.qtest.memread(fresh.shm_regions[0][0] + 0x100, 3) == b"\xc0\xff\xee"
        mapped = status_kib(m, "VmSize")
        unplug(m, "m2", 5)
        time.sleep(0.5)
        assert mapped - status_kib(m, "VmSize") >= 512 << 10
        assert m.alive()
        assert "Traceback" not in m.stderr()
