"""Shared fixtures: QEMU machines with pyemb devices, driven by the host driver."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostdriver import Machine, VirtioDevice
from tests.hostdriver.machine import QEMU_DIR

REPO = Path(__file__).resolve().parents[1]

# QEMU's embedded Python imports test models (tests.models) from the repo.
os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")

# (arch, device type) for each pyemb device on each transport
TRANSPORTS = {
    "pci": ("x86_64", "-pci"),
    "mmio": ("aarch64", ""),
}


def pytest_collection_modifyitems(config, items):
    qemu = QEMU_DIR / "qemu-system-x86_64"
    if not qemu.exists():
        raise pytest.UsageError(f"{qemu} is missing: run `make build` (or `make test`)")


@pytest.fixture(autouse=True)
def _sanitizer_reports() -> Iterator[None]:
    """Under ``make sanitize`` (ci/sanitizers.py): fail the test during which
    a QEMU wrote a sanitizer report (ASan, LeakSanitizer at exit, UBSan) to
    PYEMB_SANITIZER_LOGS, whatever the test made of QEMU's exit or stderr.
    A QEMU's log file appears when it starts; a module's machine writes its
    report into it later, during whichever test stops it."""
    log_dir = os.environ.get("PYEMB_SANITIZER_LOGS")
    if not log_dir:
        yield
        return
    from ci.sanitizers import log_sizes, reports

    before = log_sizes(log_dir)
    yield
    found = reports(log_dir, [name for name, size in log_sizes(log_dir).items()
                              if size != before.get(name)])
    if found:
        pytest.fail("sanitizer report(s) from QEMU:\n"
                    + "\n".join(f"--- {name}\n{text}" for name, text in found), pytrace=False)


def start(transport: str, device: str, props: str = "", **kw) -> Machine:
    """Start a machine with one pyemb (or QEMU) device on ``transport``."""
    arch, suffix = TRANSPORTS[transport]
    spec = f"{device}{suffix}" + (f",{props}" if props else "")
    factory = Machine.x86 if arch == "x86_64" else Machine.aarch64
    return factory(["-device", spec], **kw).start()


@pytest.fixture(params=sorted(TRANSPORTS))
def transport(request) -> str:
    return request.param


# The virtqueue features a device fixture negotiates, as keyword arguments of
# VirtioDevice.initialize(): none by default; a test marked
# @with_and_without_ring_features runs once without and once with both
# VIRTIO_RING_F_EVENT_IDX and VIRTIO_RING_F_INDIRECT_DESC (what Linux asks for).
RING_FEATURES = {
    "plain-ring": {"event_idx": False, "indirect": False},
    "event-idx+indirect": {"event_idx": True, "indirect": True},
}
with_and_without_ring_features = pytest.mark.parametrize(
    "ring", sorted(RING_FEATURES), indirect=True)


@pytest.fixture
def ring(request) -> dict[str, bool]:
    return RING_FEATURES[getattr(request, "param", "plain-ring")]


@pytest.fixture
def probe(transport, ring) -> Iterator[tuple[Machine, VirtioDevice]]:
    """A running machine with the probe model (tests/models.py) initialized."""
    m = start(transport, "virtio-snd-py", "backend=tests.models:ProbeDevice")
    try:
        dev = m.find_virtio(25)
        dev.initialize(**ring)
        yield m, dev
    finally:
        m.stop()


def command(dev: VirtioDevice, text: str, reply_size: int = 256) -> str:
    """One probe command on queue 0; returns the reply text."""
    used = dev.queues[0].call([text.encode()], [reply_size])
    return used.data.decode()


def settled(dev: VirtioDevice, queue: int | None, count: int) -> bool:
    """The interrupt count of ``queue`` reaches ``count`` and stays there a
    while (a second message would follow within microseconds): "exactly
    one more interrupt since X" is ``settled(dev, q, x + 1)``."""
    if not dev.wait_interrupts(queue, count):
        return False
    time.sleep(0.05)
    return dev.interrupts(queue) == count
