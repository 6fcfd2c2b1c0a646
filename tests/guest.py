"""Boot the small Linux guest (ci/build_guest.py) under TCG and run a script:
x86_64 on ``-machine pc``, or arm64 on ``qemu-system-aarch64 -machine virt``.

The script and any files it needs go into a second cpio archive appended
to the base initramfs (Linux unpacks concatenated archives on top of each
other), so one guest image serves every test without rebuilding.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from tests.hostdriver.machine import QEMU_DIR

REPO = Path(__file__).resolve().parents[1]
DONE = re.compile(r"PYEMB-GUEST-DONE rc=(\d+)")


@dataclass(frozen=True)
class Machine:
    """How a guest architecture boots: its emulator, board and console."""

    qemu: str
    args: tuple[str, ...]
    console: str
    guest: str          # build/<guest>, made by ci/build_guest.py --arch <debian>
    debian: str


MACHINES = {
    "x86_64": Machine("qemu-system-x86_64", ("-machine", "pc"), "ttyS0", "guest", "amd64"),
    # virt's UART is a PL011; its virtio-mmio transports take the *-py devices,
    # as virtio 1.x devices (QEMU's default there is legacy, which virtio_snd refuses).
    "aarch64": Machine("qemu-system-aarch64", ("-machine", "virt", "-cpu", "max", "-global",
                                               "virtio-mmio.force-legacy=false"),
                       "ttyAMA0", "guest-arm64", "arm64"),
}


_load_lock = threading.Lock()


def _build_guest_module():
    # Under a lock: guests boot from several threads (the demo), and the
    # module is in sys.modules before it has finished loading.
    with _load_lock:
        if "build_guest" in sys.modules:
            return sys.modules["build_guest"]
        spec = importlib.util.spec_from_file_location("build_guest",
                                                      REPO / "ci" / "build_guest.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules["build_guest"] = module       # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module


def guest_dir(arch: str = "x86_64") -> Path:
    machine = MACHINES[arch]
    path = REPO / "build" / machine.guest
    if not (path / "initrd.img").exists():
        raise FileNotFoundError(f"{path} is missing: run `make build` (or /usr/bin/python3.11 "
                                f"ci/build_guest.py --arch {machine.debian})")
    return path


def make_initrd(files: dict[str, bytes], out: Path, arch: str = "x86_64") -> Path:
    """The base initramfs plus ``files`` (``/test.sh`` executable)."""
    cpio = _build_guest_module().Cpio()
    for name, data in files.items():
        cpio.add(name, data, 0o100755 if name.endswith(".sh") else 0o100644)
    out.write_bytes((guest_dir(arch) / "initrd.img").read_bytes() + cpio.finish())
    return out


@dataclass
class GuestResult:
    console: str
    rc: int

    def section(self, name: str) -> str:
        """Console lines between ``== name`` and the next ``== ``."""
        match = re.search(rf"^== {re.escape(name)}\s*$(.*?)(?=^== |\Z|PYEMB-GUEST-DONE)",
                          self.console, re.S | re.M)
        assert match, f"no section {name!r} in the console:\n{self.console}"
        return match.group(1)


def timeout_report(out: bytes | str) -> str:
    """What a hung guest's console says that matters: the last section it
    reached, the guest kernel's first complaint (an oops that held a lock
    hangs every later step), and the tail."""
    text = out.decode(errors="replace") if isinstance(out, bytes) else out
    lines = text.replace("\r", "").split("\n")
    sections = [line for line in lines if line.startswith("== ")]
    report = [f"last section: {sections[-1] if sections else '(none)'}"]
    complaint = re.compile(r"cut here|BUG|Oops|corruption|timed out|WARNING|Call Trace")
    first = next((i for i, line in enumerate(lines) if complaint.search(line)), None)
    if first is not None:
        report += ["first kernel complaint:", *lines[max(0, first - 5):first + 40]]
    report += ["tail:", *lines[-30:]]
    return "\n".join(report)


def boot_guest(device_args: list[str], script: str, files: dict[str, bytes] | None = None,
               timeout: float = 120, env: dict[str, str] | None = None,
               memory: str = "256M", arch: str = "x86_64") -> GuestResult:
    """Boot, run ``script`` as /test.sh, return the console and its exit status.
    ``arch`` is a key of ``MACHINES``: ``x86_64`` or ``aarch64``."""
    machine = MACHINES[arch]
    with tempfile.TemporaryDirectory(prefix="pyemb-guest-") as tmp:
        initrd = make_initrd({"test.sh": ("#!/bin/sh\n" + script).encode(), **(files or {})},
                             Path(tmp) / "initrd.img", arch)
        cmd = [str(QEMU_DIR / machine.qemu), *machine.args, "-accel", "tcg", "-m", memory,
               "-display", "none", "-nodefaults", "-no-reboot", "-serial", "stdio",
               "-kernel", str(guest_dir(arch) / "vmlinuz"), "-initrd", str(initrd),
               "-append", f"console={machine.console} quiet panic=-1", *device_args]
        # The QEMU build is shared through the cache and its pyemb.conf names
        # whichever checkout's venv built it last: pin this one, as the host
        # driver does (tests/hostdriver/machine.py).
        full_env = {**os.environ, "PYEMB_VENV": os.environ.get("PYEMB_VENV", sys.prefix),
                    "PYTHONPATH": str(REPO), **(env or {})}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=full_env, errors="replace")
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"guest did not finish in {timeout} s:\n"
                                 + timeout_report(e.stdout or b"")) from None
        console = proc.stdout + proc.stderr
        match = DONE.search(console)
        assert match, f"guest ended without its marker (QEMU rc {proc.returncode}):\n{console}"
        return GuestResult(console, int(match.group(1)))
