"""The qtest line protocol: port and memory accesses, interrupt capture."""

from __future__ import annotations

import socket


class QTestError(Exception):
    pass


class QTest:
    """Client side of ``-qtest unix:PATH`` (QEMU connects to our socket)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.irqs: list[str] = []

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
        while True:
            line = self._line()
            if line.startswith("IRQ"):
                self.irqs.append(line)
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
    def write(self, addr: int, size: int, v: int) -> None:
        op = {1: "writeb", 2: "writew", 4: "writel", 8: "writeq"}[size]
        self.cmd(f"{op} 0x{addr:x} 0x{v:x}")

    def read(self, addr: int, size: int) -> int:
        op = {1: "readb", 2: "readw", 4: "readl", 8: "readq"}[size]
        return int(self.cmd(f"{op} 0x{addr:x}"), 16)
