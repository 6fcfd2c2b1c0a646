"""Shared fixtures: QEMU machines with pyemb devices, driven by the host driver."""

from __future__ import annotations

import os
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


def start(transport: str, device: str, props: str = "", **kw) -> Machine:
    """Start a machine with one pyemb (or QEMU) device on ``transport``."""
    arch, suffix = TRANSPORTS[transport]
    spec = f"{device}{suffix}" + (f",{props}" if props else "")
    factory = Machine.x86 if arch == "x86_64" else Machine.aarch64
    return factory(["-device", spec], **kw).start()


@pytest.fixture(params=sorted(TRANSPORTS))
def transport(request) -> str:
    return request.param


@pytest.fixture
def probe(transport) -> Iterator[tuple[Machine, VirtioDevice]]:
    """A running machine with the probe model (tests/models.py) initialized."""
    m = start(transport, "virtio-snd-py", "backend=tests.models:ProbeDevice")
    try:
        dev = m.find_virtio(25)
        dev.initialize()
        yield m, dev
    finally:
        m.stop()


def command(dev: VirtioDevice, text: str, reply_size: int = 256) -> str:
    """One probe command on queue 0; returns the reply text."""
    used = dev.queues[0].call([text.encode()], [reply_size])
    return used.data.decode()
