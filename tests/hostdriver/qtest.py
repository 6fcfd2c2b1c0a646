"""The qtest line protocol: port and memory accesses, interrupt capture."""

from __future__ import annotations

import base64
import socket


class QTestError(Exception):
    pass


class QTest:
    """Client side of ``-qtest unix:PATH`` (QEMU connects to our socket)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.irqs: list[str] = []
        self.unanswered = 0         # posted commands whose OK is still to read

    def _line(self) -> str:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise QTestError("QEMU closed the qtest socket")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def cmd(self, text: str) -> str:
        self.sock.sendall(text.encode() + b"\n")
        return self._answer(text)

    def post(self, text: str) -> None:
        """Send a command without waiting for its answer (a doorbell write:
        a guest's vCPU does not wait for the device either).  The answer is
        read, and an error raised, at the next command."""
        self.sock.sendall(text.encode() + b"\n")
        self.unanswered += 1
        if self.unanswered >= 256:          # keep QEMU's socket buffer small
            self.cmd("endianness")

    def _answer(self, text: str) -> str:
        while True:
            line = self._line()
            if line.startswith("IRQ"):
                self.irqs.append(line)
                continue
            if self.unanswered:             # answers come in order
                self.unanswered -= 1
                if not line.startswith("OK"):
                    raise QTestError(f"an earlier posted command: {line}")
                continue
            if line.startswith("OK"):
                return line[2:].strip()
            raise QTestError(f"{text!r}: {line}")

    # Port I/O (x86)
    def outb(self, port: int, v: int) -> None:
        self.cmd(f"outb 0x{port:x} 0x{v:x}")

    def outw(self, port: int, v: int) -> None:
        self.cmd(f"outw 0x{port:x} 0x{v:x}")

    def outl(self, port: int, v: int) -> None:
        self.cmd(f"outl 0x{port:x} 0x{v:x}")

    def inb(self, port: int) -> int:
        return int(self.cmd(f"inb 0x{port:x}"), 16)

    def inw(self, port: int) -> int:
        return int(self.cmd(f"inw 0x{port:x}"), 16)

    def inl(self, port: int) -> int:
        return int(self.cmd(f"inl 0x{port:x}"), 16)

    # Memory-mapped I/O
    def write(self, addr: int, size: int, v: int, wait: bool = True) -> None:
        op = {1: "writeb", 2: "writew", 4: "writel", 8: "writeq"}[size]
        (self.cmd if wait else self.post)(f"{op} 0x{addr:x} 0x{v:x}")

    def read(self, addr: int, size: int) -> int:
        op = {1: "readb", 2: "readw", 4: "readl", 8: "readq"}[size]
        return int(self.cmd(f"{op} 0x{addr:x}"), 16)

    # Any guest-physical memory (device memory too), in one round trip
    def memread(self, addr: int, size: int) -> bytes:
        return base64.b64decode(self.cmd(f"b64read 0x{addr:x} 0x{size:x}"))

    def memwrite(self, addr: int, data: bytes) -> None:
        self.cmd(f"b64write 0x{addr:x} 0x{len(data):x} {base64.b64encode(data).decode()}")
