"""Start the patched QEMU under ``-accel qtest`` with shared guest RAM."""

from __future__ import annotations

import mmap
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.hostdriver.interrupts import MsiCounter
from tests.hostdriver.memory import Allocator, GuestMemory
from tests.hostdriver.mmio import MmioTransport, scan_slots
from tests.hostdriver.pci import VIRTIO_VENDOR, PciTransport, scan_bus
from tests.hostdriver.qmp import QMP, QMPError
from tests.hostdriver.qtest import QTest
from tests.hostdriver.virtio import VirtioDevice

REPO = Path(__file__).resolve().parents[2]
QEMU_DIR = Path(os.environ.get("PYEMB_QEMU_DIR", REPO / "build" / "qemu"))

ARCHES = {
    # binary, machine, RAM base, first address for 32-bit BARs
    "x86_64": ("qemu-system-x86_64", "pc", 0x0, 0xE0000000),
    "aarch64": ("qemu-system-aarch64", "virt", 0x40000000, None),
}
# First address for 64-bit BARs: above 4 GiB and above the guest RAM of any
# test (the pc machine's PCI address space shows through wherever RAM and
# its own devices are not, and qtest reaches every address).
BAR64_BASE = 0x10_0000_0000


class QemuExited(Exception):
    """QEMU ended before or while the test talked to it."""

    def __init__(self, returncode: int, stderr: str) -> None:
        super().__init__(f"QEMU exited with {returncode}: {stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr


class Machine:
    """One QEMU process; a context manager."""

    def __init__(self, arch: str, args: list[str], mem_mb: int = 128,
                 env: dict[str, str | None] | None = None, cwd: str | None = None,
                 prealloc: bool = False, count_interrupts: bool = True) -> None:
        """``count_interrupts``: have QEMU log every MSI the APIC receives
        (x86), which VirtioDevice.interrupts() counts; a benchmark turns it
        off (a write to the log per interrupt)."""
        self.arch = arch
        self.binary, self.machine_type, self.ram_base, bar_base = ARCHES[arch]
        self.args, self.mem_mb, self.env, self.cwd = args, mem_mb, env, cwd
        self.prealloc = prealloc        # fault guest RAM in at start, like -mem-prealloc
        self.count_interrupts = count_interrupts
        self.bar_window = [bar_base, BAR64_BASE]
        self.mmio_interrupts: dict[int, list[int]] = {}
        self.msi = MsiCounter(None)
        self.proc: subprocess.Popen | None = None

    @classmethod
    def x86(cls, args: list[str], **kw) -> Machine:
        return cls("x86_64", args, **kw)

    @classmethod
    def aarch64(cls, args: list[str], **kw) -> Machine:
        return cls("aarch64", ["-global", "virtio-mmio.force-legacy=false", *args], **kw)

    @property
    def qemu(self) -> Path:
        return QEMU_DIR / self.binary

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> Machine:
        try:
            return self._start()
        except BaseException:
            # Never leave a QEMU or its files behind, whatever went wrong
            # (a device that refuses its config ends here, in many tests).
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._remove_files()
            raise

    def _remove_files(self) -> None:
        ram_path = getattr(self, "ram_path", None)
        if ram_path is not None and os.path.exists(ram_path):
            os.unlink(ram_path)
        if getattr(self, "tmp", None) is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _start(self) -> Machine:
        self.tmp = tempfile.mkdtemp(prefix="pyemb-test-")
        self.ram_path = tempfile.mktemp(prefix="pyemb-ram-", dir="/dev/shm")
        size = self.mem_mb << 20
        with open(self.ram_path, "wb") as f:
            f.truncate(size)
        qtest_path, qmp_path = f"{self.tmp}/qtest.sock", f"{self.tmp}/qmp.sock"
        listeners = []
        for path in (qtest_path, qmp_path):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(path)
            s.listen(1)
            s.settimeout(0.2)
            listeners.append(s)
        self.stderr_path = f"{self.tmp}/stderr"
        args = list(self.args)
        if self.arch == "x86_64" and self.count_interrupts:
            # MSI-X messages counted per vector (tests/hostdriver/interrupts.py),
            # in the caller's log file if it names one.
            if "-D" not in args:
                args += ["-D", f"{self.tmp}/qemu.log"]
            args += ["-trace", "apic_deliver_irq"]
            log = [args[i + 1] for i, arg in enumerate(args) if arg == "-D"][-1]   # the last wins
            self.msi = MsiCounter(log)
        cmd = [
            str(self.qemu), "-machine", f"{self.machine_type},memory-backend=ram",
            "-accel", "qtest", "-qtest", f"unix:{qtest_path}", "-qtest-log", "/dev/null",
            "-qmp", f"unix:{qmp_path}",
            "-display", "none", "-nodefaults", "-m", f"{self.mem_mb}M",
            "-object", f"memory-backend-file,id=ram,size={self.mem_mb}M,"
                       f"mem-path={self.ram_path},share=on"
                       + (",prealloc=on" if self.prealloc else ""),
            *args,
        ]
        env = dict(os.environ)
        # The build in the cache is shared by every checkout and its
        # pyemb.conf names whichever venv ran `make build` last: pin QEMU to
        # the venv running this driver, so a test never loads another
        # checkout's pyemb.
        env.setdefault("PYEMB_VENV", sys.prefix)
        for key, value in (self.env or {}).items():     # None removes a variable
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err,
                                         stderr=err, env=env, cwd=self.cwd)
        try:
            qtest_sock = self._accept(listeners[0])
            qmp_sock = self._accept(listeners[1])
        finally:
            for s in listeners:
                s.close()
        self.qtest = QTest(qtest_sock)
        try:
            self.qmp = QMP(qmp_sock)
        except (OSError, QMPError):
            # QEMU connects its sockets before it creates devices: a device
            # that fails to realize shows up here as a closed socket.
            self.proc.wait(10)
            raise QemuExited(self.proc.returncode, self.stderr()) from None
        fd = os.open(self.ram_path, os.O_RDWR)
        self.mm = mmap.mmap(fd, size)
        os.close(fd)
        # QEMU answered QMP, so it is past machine set-up and has the RAM
        # mapped: the name can go now, and the RAM goes with the last of the
        # two mappings, even if this driver or QEMU is killed.
        os.unlink(self.ram_path)
        self.mem = GuestMemory(self.mm, self.ram_base, size)
        # Low 16 MiB: BIOS areas; the rest for queues and buffers.
        self.alloc = Allocator(self.ram_base + (16 << 20), self.ram_base + size)
        return self

    def _accept(self, listener: socket.socket) -> socket.socket:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                conn, _ = listener.accept()
                conn.settimeout(None)
                return conn
            except TimeoutError:
                if self.proc.poll() is not None:
                    raise QemuExited(self.proc.returncode, self.stderr()) from None
        raise TimeoutError("QEMU did not connect")

    def stderr(self) -> str:
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 15.0) -> int:
        """Quit QEMU cleanly and return its exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            try:
                self.qmp.execute("quit")
            except Exception:  # noqa: BLE001 - already going down
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        for closer in (getattr(self, "mm", None), self.msi):
            if closer is not None:
                closer.close()
        self.exit_stderr = self.stderr()
        self._remove_files()
        return rc

    def __enter__(self) -> Machine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- devices -------------------------------------------------------------------
    def virtio_devices(self) -> list[VirtioDevice]:
        """Every virtio device, with its transport set up."""
        if self.arch == "x86_64":
            found = []
            for pci in scan_bus(self.qtest):
                if pci.vendor_id == VIRTIO_VENDOR and pci.device_id >= 0x1040:
                    t = PciTransport(self.qtest, self.mem, pci, self.bar_window, self.msi)
                    found.append(VirtioDevice(t, self.mem, self.alloc))
            return found
        return [VirtioDevice(MmioTransport(self.qtest, base, self.mmio_interrupts), self.mem,
                             self.alloc)
                for base in scan_slots(self.qtest)]

    def find_virtio(self, device_id: int, index: int = 0) -> VirtioDevice:
        matches = [d for d in self.virtio_devices() if d.device_id == device_id]
        if len(matches) <= index:
            raise LookupError(f"no virtio device with ID {device_id} (#{index})")
        return matches[index]
