"""The C shim's contract, probed through tests/models.py:ProbeDevice and the
bundled models: errors, dead views, guest mappings, threads, reset, unplug,
start-up checks."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyemb.video import protocol as video
from tests.conftest import command, settled, start, with_and_without_ring_features
from tests.hostdriver import Machine, QemuExited
from tests.hostdriver.machine import QEMU_DIR


def test_exception_in_model_is_logged_once_and_device_keeps_serving(probe):
    m, dev = probe
    used = dev.queues[0].call([b"raise"], [64])
    assert used.written == 0                    # DeviceModel.fail_request: empty reply
    assert command(dev, "echo still here") == "still here"
    err = m.stderr()
    assert err.count("RuntimeError: probe asked to raise") == 1
    assert "Traceback (most recent call last)" in err
    assert m.alive()


def test_raising_backend_gets_error_reply_then_next_request_works(transport):
    m = start(transport, "virtio-video-py", "backend=tests.models:FlakyVideoBackend")
    try:
        dev = m.find_virtio(31)
        dev.initialize(want_features=0b11)
        cmd = video.QUERY_CAPABILITY.pack(video.Cmd.QUERY_CAPABILITY, 0, video.QueueType.INPUT)
        first = dev.queues[0].call([cmd], [4096])
        assert first.written == video.HDR.size
        assert video.HDR.unpack_from(first.data)[0] == video.Resp.ERR_INVALID_OPERATION
        second = dev.queues[0].call([cmd], [4096])
        assert video.HDR.unpack_from(second.data)[0] == video.Resp.OK_QUERY_CAPABILITY
        assert m.stderr().count("RuntimeError: flaky backend: first query fails") == 1
    finally:
        m.stop()


def test_views_are_dead_after_completion(probe):
    _, dev = probe
    assert command(dev, "keep") == "kept"
    assert command(dev, "check-kept") == "dead dead"


@with_and_without_ring_features
def test_completion_from_a_python_thread_reaches_the_guest(probe):
    _, dev = probe
    q = dev.queues[0]
    before = dev.interrupts(0)
    q.add([b"later 1.0"], [16])                    # long enough for a loaded machine
    q.kick()
    assert command(dev, "echo first") == "first"   # the main loop is not blocked
    assert settled(dev, 0, before + 1)             # the echo's, and nothing more yet
    used = q.wait()
    assert used.data == b"later"
    assert settled(dev, 0, before + 2)             # exactly one for the thread's completion


def test_guest_mapping_reads_guest_ram_and_dies_on_release(probe):
    m, dev = probe
    addr = m.alloc.alloc(4096)
    m.mem.write(addr, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert command(dev, f"map {addr:#x} 4096") == "ok 0102030405060708 after-release=dead"
    assert m.mem.read(addr, 4) == b"PYEM"       # written through the mapping


@pytest.mark.parametrize("where", ["beyond-ram", "mmio", "overflow", "zero-length"])
def test_guest_mapping_outside_ram_is_refused(probe, where):
    m, dev = probe
    ram_end = m.ram_base + (m.mem_mb << 20)
    address, length = {
        "beyond-ram": (ram_end - 4096, 8192),           # straddles the end of RAM
        "mmio": (0xFEE00000 if m.arch == "x86_64" else 0x0A000000, 16),
        "overflow": (0xFFFFFFFFFFFFF000, 0x2000),
        "zero-length": (m.ram_base + 0x100000, 0),
    }[where]
    reply = command(dev, f"map {address:#x} {length:#x}")
    assert reply.startswith("refused"), reply
    assert f"range {address:#x}+{length:#x}" in reply, reply      # formatted, not "%llx"
    assert command(dev, "echo alive") == "alive"


def test_chain_outside_guest_ram_is_returned_unused(probe):
    m, dev = probe
    q = dev.queues[0]
    mmio = 0xFEC00000 if m.arch == "x86_64" else 0x09000000   # IOAPIC / PL011
    reply = m.alloc.alloc(64)
    q.add_raw([(mmio, 8, False), (reply, 64, True)])
    q.kick()
    used = q.wait()
    assert used.written == 0
    assert command(dev, "echo fine") == "fine"


def hold(dev, n: int) -> str:
    """Have the probe hold ``n`` requests of queue 1; returns its status."""
    held = dev.queues[1]
    for _ in range(n):
        held.add([b"x"], [8])
    held.kick()
    deadline = time.monotonic() + 5
    while f"held={n}" not in (status := command(dev, "status")):
        assert time.monotonic() < deadline, status
    return status


def test_reset_drops_held_requests_and_model_state(probe):
    m, dev = probe
    held = dev.queues[1]
    status = hold(dev, 3)
    assert "pending=4" in status                # 3 held + this status request
    resets = int(status.split("resets=")[1])
    assert command(dev, "stash-held") == "3"
    dev.initialize()                            # driver reset, then a new driver
    assert command(dev, "status") == f"pending=1 held=0 resets={resets + 1}"
    # The model completing a dropped request is told so, nothing is pushed twice.
    assert command(dev, "complete-stash") == "False False False"
    assert held.poll() is None


@with_and_without_ring_features
def test_completion_batch_from_a_thread_is_pushed_when_it_ends(probe):
    _, dev = probe
    hold(dev, 3)
    assert command(dev, "batch-held 0.4") == "3"
    # On virtio-mmio queue 1 shares the line with the commands' replies:
    # reading the count takes (and counts) theirs.
    before = dev.interrupts(1)
    time.sleep(0.15)
    assert dev.queues[1].poll() is None         # completed inside the batch, not pushed yet
    assert dev.interrupts(1) == before          # and no interrupt for it yet
    used = [dev.queues[1].wait(timeout=5) for _ in range(3)]
    assert [u.written for u in used] == [0, 0, 0]
    assert settled(dev, 1, before + 1)          # one interrupt for the batch's three
    assert command(dev, "status").startswith("pending=1 held=0")


def test_reset_while_a_completion_batch_is_open_drops_its_completions(probe):
    m, dev = probe
    hold(dev, 3)
    assert command(dev, "batch-held 0.5") == "3"
    dev.initialize()                            # driver reset inside the batch
    time.sleep(0.8)                             # the batch has ended
    assert dev.queues[1].poll() is None         # nothing pushed into the new rings
    assert command(dev, "status").startswith("pending=1 held=0")
    assert command(dev, "echo fine") == "fine"
    assert m.alive()


PROBE_IN_SLOT_5 = ["-device",
                   "virtio-snd-py-pci,id=snd0,backend=tests.models:ProbeDevice,addr=5"]


def unplug(m: Machine, dev_id: str = "snd0", slot: int = 5) -> None:
    m.qmp.execute("device_del", id=dev_id)
    m.qtest.outl(0xAE08, 1 << slot)             # PIIX4 ACPI PCI hotplug: eject the slot
    m.qmp.wait_event("DEVICE_DELETED")


def test_hot_unplug_and_replug():
    with Machine.x86(PROBE_IN_SLOT_5) as m:
        dev = m.find_virtio(25)
        dev.initialize()
        assert command(dev, "echo before") == "before"
        unplug(m)
        assert not m.virtio_devices()
        m.qmp.execute("device_add", driver="virtio-snd-py-pci", id="snd1", addr="5",
                      backend="tests.models:ProbeDevice")
        dev = m.find_virtio(25)
        dev.initialize()
        assert command(dev, "echo after") == "after"
        assert m.alive()


def test_an_unplugged_model_in_a_reference_cycle_is_freed_at_unplug(tmp_path: Path):
    """A model in a cycle, in the collector's oldest generation, goes at
    unplug, not at some later full collection (what it holds went with it
    only every few dozen unplugs in bench.unplug_loop)."""
    freed = tmp_path / "freed"
    with Machine.x86(["-device", "virtio-snd-py-pci,id=snd0,backend=tests.models:CyclicProbe,"
                      "addr=5"], env={"PYEMB_TEST_FREED": str(freed)}) as m:
        dev = m.find_virtio(25)
        dev.initialize()
        assert command(dev, "echo before") == "before"
        assert not freed.exists()
        unplug(m)
        deadline = time.monotonic() + 5          # collected on a thread of its own
        while not freed.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert freed.read_text() == "freed"
        assert m.alive()


def test_unplug_while_a_completion_batch_is_open():
    with Machine.x86(PROBE_IN_SLOT_5) as m:
        dev = m.find_virtio(25)
        dev.initialize()
        hold(dev, 3)
        assert command(dev, "batch-held 0.5") == "3"
        unplug(m)
        time.sleep(0.8)                         # the batch ended on a device that is gone
        assert m.alive()
        assert "Traceback" not in m.stderr()


def test_unimportable_backend_stops_qemu_with_one_line():
    with pytest.raises(QemuExited) as exc:
        Machine.x86(["-device", "virtio-snd-py-pci,backend=no_such_module:Backend"]).start()
    assert exc.value.returncode != 0
    lines = [line for line in exc.value.stderr.splitlines() if "no_such_module" in line]
    assert len(lines) == 1
    assert "cannot import backend 'no_such_module:Backend'" in lines[0]


@pytest.mark.parametrize("content,message", [
    ("snd = [", "not valid TOML"),
    ("[[snd.streams]]\nchannels = [0, 9]\n", "snd.streams[0].channels must be [min, max]"),
    ("[[snd.streams]]\nrates = [12345]\n", "unsupported rate 12345"),
])
def test_bad_config_stops_qemu_with_one_line(tmp_path, content, message):
    cfg = tmp_path / "snd.toml"
    cfg.write_text(content)
    with pytest.raises(QemuExited) as exc:
        Machine.x86(["-device", f"virtio-snd-py-pci,config={cfg}"]).start()
    assert exc.value.returncode != 0
    assert message in exc.value.stderr
    assert "Traceback" not in exc.value.stderr


def test_backend_constructor_failure_is_a_config_error():
    with pytest.raises(QemuExited) as exc:
        Machine.x86(["-device",
                     "virtio-video-py-pci,backend=tests.models:BrokenConstructorBackend"]).start()
    assert "OSError: no such host device" in exc.value.stderr


def test_wrong_venv_is_a_clear_error(tmp_path):
    fake = tmp_path / "venv"
    fake.mkdir()
    (fake / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.9.2\n")
    with pytest.raises(QemuExited) as exc:
        Machine.x86(["-device", "virtio-snd-py-pci"], env={"PYEMB_VENV": str(fake)}).start()
    assert "is Python 3.9.2 but this QEMU embeds libpython 3.11" in exc.value.stderr


def test_binary_finds_the_venv_from_any_directory_without_environment():
    env = {"PYEMB_VENV": None, "PYTHONPATH": None, "VIRTUAL_ENV": None}
    with Machine.x86(["-device", "virtio-snd-py-pci"], env=env, cwd="/") as m:
        dev = m.find_virtio(25)
        dev.initialize()
        query = struct.pack("<IIII", 0x0100, 0, 1, 32)
        assert dev.queues[0].call([query], [36]).data[:4] == struct.pack("<I", 0x8000)


def test_device_help_lists_devices_and_properties():
    qemu = str(QEMU_DIR / "qemu-system-x86_64")
    listing = subprocess.run([qemu, "-device", "help"], capture_output=True, text=True,
                             check=True).stdout
    for kind in ("snd", "video", "media"):
        for name in (f"virtio-{kind}-py", f"virtio-{kind}-py-pci"):
            assert f'name "{name}"' in listing
    props = subprocess.run([qemu, "-device", "virtio-video-py-pci,help"], capture_output=True,
                           text=True, check=True).stdout
    for prop in ("backend=<str>", "config=<str>", "role=<str>"):
        assert prop in props
    assert "shm-size" not in props
    props = subprocess.run([qemu, "-device", "virtio-media-py-pci,help"], capture_output=True,
                           text=True, check=True).stdout
    for prop in ("backend=<str>", "config=<str>", "role=<str>"):
        assert prop in props
    shm = [line for line in props.splitlines() if "shm-size=<size>" in line]
    assert len(shm) == 1 and "(default: 268435456)" in shm[0]       # 256 MiB


def test_qemu_exits_cleanly_with_requests_held_and_a_thread_running(probe):
    m, dev = probe
    dev.queues[1].add([b"x"], [8])
    dev.queues[1].kick()
    dev.queues[0].add([b"later 0.3"], [16])
    dev.queues[0].kick()
    assert m.stop() == 0
    assert "error" not in m.exit_stderr.lower(), m.exit_stderr


def expected_venv() -> str:
    """$PYEMB_VENV, else the venv running the tests (the host driver pins it)."""
    return os.environ.get("PYEMB_VENV") or sys.prefix


def test_devices_share_one_interpreter_from_the_venv():
    args = []
    for i in range(2):
        args += ["-device", f"virtio-snd-py-pci,backend=tests.models:ProbeDevice,addr={4 + i}"]
    args += ["-device", "virtio-video-py-pci"]
    with Machine.x86(args) as m:
        probes = [d for d in m.virtio_devices() if d.device_id == 25]
        assert len(probes) == 2
        answers = set()
        for dev in probes:
            dev.initialize()
            answers.add(command(dev, "interpreter"))
        assert len(answers) == 1
        assert os.path.realpath(answers.pop().split()[1]) == os.path.realpath(expected_venv())


def test_hung_backend_thread_does_not_hang_qemu_exit(probe):
    m, dev = probe
    assert command(dev, "hang") == "hanging"
    t0 = time.monotonic()
    assert m.stop() == 0
    assert time.monotonic() - t0 < 10
    assert "Python threads still running at exit" in m.exit_stderr


def libpython_mapped(m: Machine) -> bool:
    with open(f"/proc/{m.proc.pid}/maps") as f:
        return "libpython3" in f.read()


def test_libpython_is_loaded_only_when_a_pyemb_device_is_used():
    with Machine.x86(["-audiodev", "none,id=a", "-device", "virtio-sound-pci,audiodev=a"]) as m:
        assert m.find_virtio(25)
        assert not libpython_mapped(m)
        m.qmp.execute("device_add", driver="virtio-snd-py-pci", id="py0")
        assert libpython_mapped(m)


def test_freeing_a_request_or_mapping_keeps_the_exception_in_flight(probe):
    """Issue 15: request_dealloc and mapping_dealloc called into Python and
    then PyErr_Clear() without saving the exception being propagated, so
    freeing a Request (or a GuestMapping) while unwinding swallowed it."""
    m, dev = probe
    hold(dev, 1)
    addr = m.alloc.alloc(4096)
    assert command(dev, f"drop-held-while-raising {addr:#x}") == "caught TypeError"
    assert m.alive()


def test_requests_freed_by_another_thread_during_a_reset_are_dropped_under_the_bql(probe):
    """Issue 15: the `dropping` flag was per device, not per thread, so a
    thread that freed a request while the main loop sat in a reset's drop
    (the model let the GIL go) detached its element without the BQL.  The
    shim now asserts the BQL there; the dropping thread detaches it."""
    m, dev = probe
    hold(dev, 3)
    assert command(dev, "orphan-on-reset") == "armed"
    dev.initialize()                            # driver reset, then a new driver
    assert m.alive(), m.stderr()
    assert command(dev, "status").startswith("pending=1 held=0")
    assert dev.queues[1].poll() is None         # dropped, not completed
    assert "dropped without being completed" not in m.stderr()
    assert command(dev, "echo fine") == "fine"


def test_a_mapping_released_by_a_model_thread_is_unmapped_by_the_main_loop(probe):
    """Stream workers release guest mappings (a buffer destroyed while it
    was written or read): QEMU's memory API wants the BQL, so the unmap
    waits for the main loop, which asserts it holds the BQL."""
    m, dev = probe
    addr = m.alloc.alloc(4096)
    for _ in range(3):
        assert command(dev, f"release-in-thread {addr:#x}") == "released"
    assert command(dev, f"map {addr:#x} 4096").startswith("ok ")
    assert m.alive(), m.stderr()


def test_a_mapping_released_while_a_view_of_it_is_used_stays_mapped_until_then(probe):
    """Issue 15: mapping_release unmapped (and warned of stale views) while a
    conversion still read or wrote through a view derived from the
    mapping's (a stream worker's, as a reset released every mapping: the
    encoder's reset test saw the warning).  The unmap now waits for the
    last export; the memory is written through it after the release."""
    m, dev = probe
    addr = m.alloc.alloc(4096, 4096)
    assert command(dev, f"map-keep-slice {addr:#x}") == "released"
    assert command(dev, "write-slices") == "written"
    assert m.mem.read(addr, 4) == b"LATE"
    assert command(dev, f"map {addr:#x} 4096").startswith("ok ")
    assert "keeps views" not in m.stderr()
    assert m.alive()


def test_views_still_used_at_unplug_are_reported_once():
    with Machine.x86(PROBE_IN_SLOT_5) as m:
        dev = m.find_virtio(25)
        dev.initialize()
        for _ in range(2):
            addr = m.alloc.alloc(4096, 4096)
            assert command(dev, f"map-keep-slice {addr:#x}") == "released"
        unplug(m)
        assert m.alive()
        assert m.stderr().count("keeps views of guest memory after releasing a guest "
                                "mapping") == 1
