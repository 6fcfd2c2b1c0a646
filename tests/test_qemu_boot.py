"""QEMU as a user starts it: no -L, no -nodefaults.  Each machine finds the
firmware of its default devices (BIOS, VGA BIOS, the NIC's option ROM) and of
common ones in the build's data directory (ci/build-qemu.sh, step 4)."""

from __future__ import annotations

import json
import subprocess
import threading

import pytest

from tests.guest import guest_dir
from tests.hostdriver.machine import QEMU_DIR

MACHINES = {   # name: the start of its command line
    "q35": ["qemu-system-x86_64", "-machine", "q35"],
    "pc": ["qemu-system-x86_64", "-machine", "pc"],
    "virt": ["qemu-system-aarch64", "-machine", "virt", "-cpu", "max"],
}


def qemu(machine: str, *args: str) -> list[str]:
    binary, *rest = MACHINES[machine]
    return [str(QEMU_DIR / binary), *rest, "-accel", "tcg", "-m", "2G", "-display", "none",
            *args]


def prelaunch(machine: str, *args: str) -> str:
    """Start stopped (-S), check over QMP on stdio that the machine was built,
    quit; returns the monitor's ``info network``."""
    commands = [{"execute": "qmp_capabilities"},
                {"execute": "query-status"},
                {"execute": "human-monitor-command",
                 "arguments": {"command-line": "info network"}},
                {"execute": "quit"}]
    proc = subprocess.run(qemu(machine, "-serial", "none", "-monitor", "none", "-S",
                               "-qmp", "stdio", *args),
                          input="".join(json.dumps(c) + "\n" for c in commands),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr        # e.g. failed to find romfile "..."
    replies = [r["return"] for r in map(json.loads, proc.stdout.splitlines()) if "return" in r]
    assert len(replies) == len(commands), proc.stdout + proc.stderr
    assert replies[1]["status"] == "prelaunch"
    return replies[2]


@pytest.mark.parametrize(("machine", "nic"), [
    ("q35", "e1000e"), ("pc", "e1000"), ("virt", "virtio-net-pci")])
def test_default_devices(machine, nic):
    assert f"model={nic}" in prelaunch(machine)


DISPLAYS = {"q35": ["-vga", "std"], "pc": ["-vga", "cirrus"],
            "virt": ["-device", "ramfb", "-device", "VGA"]}


@pytest.mark.parametrize("machine", sorted(DISPLAYS))
def test_common_nics_and_displays(machine):
    network = prelaunch(machine, *DISPLAYS[machine], "-device", "e1000",
                        "-device", "virtio-net-pci", "-device", "rtl8139")
    assert network.count("model=") == 4, network    # the default NIC and these three


def test_q35_boots_a_kernel_with_its_default_devices():
    """SeaBIOS runs the VGA BIOS and the NIC's option ROM, linuxboot_dma.bin
    starts the kernel, which prints its banner on the serial console."""
    proc = subprocess.Popen(qemu("q35", "-monitor", "none", "-serial", "stdio",
                                 "-kernel", str(guest_dir() / "vmlinuz"),
                                 "-append", "console=ttyS0"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    timer = threading.Timer(60, proc.kill)
    timer.start()
    console = b""
    try:
        while b"Linux version" not in console and (chunk := proc.stdout.read1(4096)):
            console += chunk
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert b"Linux version" in console, console.decode(errors="replace")
