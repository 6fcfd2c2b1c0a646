#!/usr/bin/python3.11
"""Builds the small Linux guest the real-guest sound tests boot.

Everything comes from Debian packages (``apt-get download`` + ``dpkg -x``,
nothing is installed on the host): the bookworm-backports kernel (6.12, the
first Debian kernel with CONFIG_SND_VIRTIO), busybox-static, and aplay /
arecord / amixer with libasound and alsa-lib's config files; libc comes from
the host, which is bookworm too.  Output, cached by the package versions and
this script's hash::

    ${PYEMB_CACHE:-~/.cache/pyemb}/guest-<key>/{vmlinuz,initrd.img}
    build/guest -> that directory

The initramfs' /init loads the sound modules, waits for the card, runs
/test.sh if there is one (tests append it as a second cpio archive), prints
``PYEMB-GUEST-DONE rc=<status>`` and powers off.

    /usr/bin/python3.11 ci/build_guest.py
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PYEMB_CACHE", Path.home() / ".cache" / "pyemb"))
PACKAGES = ["busybox-static", "alsa-utils", "libasound2", "libasound2-data"]
TOOLS = ["aplay", "arecord", "amixer"]
MODULES = ["virtio_snd"]             # with everything they depend on
SYSTEM_LIBS = ["/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6",
               "/lib/x86_64-linux-gnu/libm.so.6"]

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m || echo "init: insmod $m failed"; done
i=0
while [ ! -e /dev/snd/controlC0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
echo PYEMB-GUEST-READY
rc=0
if [ -x /test.sh ]; then /test.sh; rc=$?; fi
echo "PYEMB-GUEST-DONE rc=$rc"
poweroff -f
"""


def run(*cmd: str, cwd: Path | None = None) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=cwd).stdout


def candidate(package: str, suite: str | None = None) -> str:
    """The version apt would install, or the newest one from ``suite``."""
    if suite:
        for line in run("apt-cache", "madison", package).splitlines():
            fields = [f.strip() for f in line.split("|")]
            if len(fields) == 3 and f" {suite}/" in fields[2]:
                return fields[1]
        sys.exit(f"build_guest: no {package} in {suite}: run ci/setup-host.sh first")
    for line in run("apt-cache", "policy", package).splitlines():
        if line.strip().startswith("Candidate:"):
            return line.split()[1]
    sys.exit(f"build_guest: apt knows no {package}")


def kernel_package() -> tuple[str, str]:
    """linux-image-<abi>-amd64 that bookworm-backports' linux-image-amd64 pulls."""
    version = candidate("linux-image-amd64", "bookworm-backports")
    deps = run("apt-cache", "show", f"linux-image-amd64={version}")
    for line in deps.splitlines():
        if line.startswith("Depends:"):
            name = line.split(":", 1)[1].split(",")[0].split("(")[0].strip()
            return name, candidate(name)
    sys.exit("build_guest: cannot tell which kernel linux-image-amd64 needs")


def modinfo_depends(ko: bytes) -> list[str]:
    marker = ko.find(b"\0depends=")
    if marker < 0:
        return []
    end = ko.index(b"\0", marker + 1)
    value = ko[marker + 9:end].decode()
    return [d for d in value.split(",") if d]


def collect_modules(moddir: Path) -> list[tuple[str, bytes]]:
    """The modules to load, dependencies first, decompressed."""
    index = {}
    for path in moddir.rglob("*.ko*"):
        index[path.name.split(".ko")[0].replace("-", "_")] = path
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        path = index[key]
        data = path.read_bytes()
        if path.suffix == ".xz":
            data = lzma.decompress(data)
        for dep in modinfo_depends(data):
            visit(dep)
        ordered.append((key + ".ko", data))

    for name in MODULES:
        visit(name)
    return ordered


class Cpio:
    """A newc cpio archive, written in Python (no cpio binary needed)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def add(self, name: str, data: bytes = b"", mode: int = 0o100644,
            link: str | None = None) -> None:
        if link is not None:
            data, mode = link.encode(), 0o120777
        name_b = name.lstrip("/").encode() + b"\0"
        header = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0))
        self.ino += 1
        blob = header.encode() + name_b
        blob += b"\0" * (-len(blob) % 4) + data
        blob += b"\0" * (-len(blob) % 4)
        self.parts.append(blob)

    def dir(self, name: str) -> None:
        self.add(name, mode=0o040755)

    def finish(self) -> bytes:
        self.add("TRAILER!!!", mode=0)
        return gzip.compress(b"".join(self.parts), compresslevel=6)


def build(out: Path) -> None:
    kernel, kernel_version = kernel_package()
    with tempfile.TemporaryDirectory(prefix="pyemb-guest-") as tmp_s:
        tmp = Path(tmp_s)
        run("apt-get", "download", "-q", f"{kernel}={kernel_version}", *PACKAGES, cwd=tmp)
        root = tmp / "root"
        for deb in sorted(tmp.glob("*.deb")):
            run("dpkg-deb", "-x", str(deb), str(root))
        abi = kernel.removeprefix("linux-image-")
        shutil.copy(root / "boot" / f"vmlinuz-{abi}", out / "vmlinuz")
        cpio = Cpio()
        for d in ("bin", "dev", "proc", "sys", "tmp", "usr", "usr/bin", "usr/share",
                  "lib", "lib64", "lib/x86_64-linux-gnu", "lib/modules"):
            cpio.dir(d)
        cpio.add("init", INIT.encode(), 0o100755)
        cpio.add("bin/busybox", (root / "bin/busybox").read_bytes(), 0o100755)
        cpio.add("bin/sh", link="busybox")
        for tool in TOOLS:
            cpio.add(f"usr/bin/{tool}", (root / "usr/bin" / tool).read_bytes(), 0o100755)
        libasound = root / "usr/lib/x86_64-linux-gnu/libasound.so.2"
        cpio.add("lib/x86_64-linux-gnu/libasound.so.2", libasound.resolve().read_bytes())
        for lib in SYSTEM_LIBS:
            cpio.add(lib.lstrip("/"), Path(lib).resolve().read_bytes(), 0o100755)
        share = root / "usr/share/alsa"
        cpio.dir("usr/share/alsa")
        for path in sorted(share.rglob("*")):
            rel = "usr/share/alsa/" + str(path.relative_to(share))
            if path.is_symlink():
                cpio.add(rel, link=os.readlink(path))
            elif path.is_dir():
                cpio.dir(rel)
            else:
                cpio.add(rel, path.read_bytes())
        modules = collect_modules(root / "lib/modules" / abi)
        for name, data in modules:
            cpio.add(f"lib/modules/{name}", data)
        cpio.add("lib/modules/order", "\n".join(n for n, _ in modules).encode() + b"\n")
        (out / "initrd.img").write_bytes(cpio.finish())
        (out / "VERSIONS").write_text(
            f"{kernel} {kernel_version}\n"
            + "".join(f"{p} {candidate(p)}\n" for p in PACKAGES)
            + "modules: " + " ".join(n for n, _ in modules) + "\n")


def main() -> None:
    kernel, kernel_version = kernel_package()
    key_src = Path(__file__).read_bytes() + f"{kernel}={kernel_version}".encode()
    key_src += "".join(f"{p}={candidate(p)}" for p in PACKAGES).encode()
    key = hashlib.sha256(key_src).hexdigest()[:12]
    out = CACHE / f"guest-{key}"
    if not (out / "initrd.img").exists():
        staging = Path(tempfile.mkdtemp(prefix="guest-", dir=CACHE))
        try:
            build(staging)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        print(f"build_guest: built {out}")
    link = REPO / "build" / "guest"
    link.parent.mkdir(exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(out)


if __name__ == "__main__":
    main()
