#!/usr/bin/python3.11
"""Builds the small Linux guest the real-guest tests boot.

Two guests: x86_64 (the default, Debian amd64) and arm64 (``--arch arm64``,
for ``qemu-system-aarch64 -machine virt``).

The kernel, busybox-static and aplay / arecord / amixer (with libasound and
alsa-lib's config files) come from Debian packages of the guest's
architecture unpacked with ``apt-get download`` + ``dpkg -x``: the
bookworm-backports kernel (6.12, the first Debian kernel with
CONFIG_SND_VIRTIO).  On x86_64, libc, V4L2 and GStreamer tools (v4l2-ctl,
v4l2-compliance, gst-launch-1.0 with the v4l2 and parser plugins) come from
the host, which is bookworm too and has them installed by ci/setup-host.sh,
with every library they load (GStreamer's elements include v4l2src, the
v4l2 decoders and encoders, filesrc/filesink, videoconvert, videotestsrc and
rawvideoparse); on arm64, libc comes from libc6:arm64 and there are no
V4L2/GStreamer tools but v4l2-compliance.

The ChromeOS virtio-video driver from ../shared/guest-drivers/virtio-video,
exactly as published plus guest/patches/virtio-video-linux-6.12.patch, is
built out of tree against the same kernel's headers (packages unpacked into
the cache, nothing installed), and so is ``v4l2-mem2mem.ko`` from the matching
``linux-source-6.12`` where Debian's kernel does not ship it (amd64:
CONFIG_V4L2_MEM2MEM_DEV is off; arm64 ships it).  So is the virtio-media
driver (device 48) from ../shared/guest-drivers/virtio-media/driver, exactly
as published with its own Kbuild and no patch; its dependencies (videodev,
videobuf2-common, videobuf2-memops) are Debian's, and /init loads it with
``allow_userptr=1`` (MODULE_PARAMS) so that its nodes offer USERPTR besides
MMAP.  The kernel build tools come from the host's ``linux-kbuild`` package
(Multi-Arch: foreign: Debian's way of building modules for another
architecture against its headers), with the cross compiler the headers name
(aarch64-linux-gnu-gcc-12 for arm64).  The project's own V4L2 clients, the
decoder (guest/v4l2_decode.c) and the encoder (guest/v4l2_encode.c), both
with the code they share (guest/v4l2_common.h), are built static.

Output, cached by the package versions and the hash of everything above::

    ${PYEMB_CACHE:-~/.cache/pyemb}/guest-<key>/{vmlinuz,initrd.img}
    build/guest -> that directory (build/guest-arm64 for arm64)

The initramfs' /init loads the modules (/lib/modules/order: one a line,
dependencies first, then any insmod parameters), waits for the sound card, runs
/test.sh if there is one (tests append it as a second cpio archive), prints
``PYEMB-GUEST-DONE rc=<status>`` and powers off.

    /usr/bin/python3.11 ci/build_guest.py [--arch amd64|arm64]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PYEMB_CACHE", Path.home() / ".cache" / "pyemb"))
PACKAGES = ["busybox-static", "alsa-utils", "libasound2", "libasound2-data"]
ARCH_ALL = {"libasound2-data"}                  # one package for every architecture
TOOLS = ["aplay", "arecord", "amixer"]
SYSTEM_LIBS = ["/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6",
               "/lib/x86_64-linux-gnu/libm.so.6"]
# The team's shared/ folder (the guest drivers): $PYEMB_SHARED, or beside the
# checkout, as tests/streams.py finds it.
SHARED = Path(os.environ.get("PYEMB_SHARED") or REPO.parent / "shared")
VIDEO_DRIVER = SHARED / "guest-drivers" / "virtio-video"
DRIVER_PATCH = REPO / "guest" / "patches" / "virtio-video-linux-6.12.patch"
# The virtio-media driver (device 48): built as published, with its own Kbuild.
MEDIA_DRIVER = SHARED / "guest-drivers" / "virtio-media" / "driver"
# Module parameters /init passes to insmod, by module.  allow_userptr: the
# driver offers V4L2_MEMORY_USERPTR only with it (MMAP always, DMABUF never).
MODULE_PARAMS = {"virtio_media": "allow_userptr=1"}
# The project's V4L2 clients: /usr/bin/<name> in the guest, from guest/<source>.
CLIENTS = {"pyemb-v4l2-decode": REPO / "guest" / "v4l2_decode.c",
           "pyemb-v4l2-encode": REPO / "guest" / "v4l2_encode.c"}
# What every client includes (from its own folder: no -I); part of the cache key.
CLIENT_SHARED = [REPO / "guest" / "v4l2_common.h"]
# Host programs copied in with the libraries they need (ci/setup-host.sh
# installs their packages: v4l-utils, gstreamer1.0-tools, -plugins-good/-bad;
# -plugins-base, for videotestsrc and videoconvertscale, comes with -good).
HOST_PACKAGES = ["v4l-utils", "gstreamer1.0-tools", "gstreamer1.0-plugins-base",
                 "gstreamer1.0-plugins-good", "gstreamer1.0-plugins-bad"]
MULTIARCH = "/usr/lib/x86_64-linux-gnu"
HOST_PROGRAMS = ["/usr/bin/v4l2-ctl", "/usr/bin/gst-launch-1.0",
                 "/usr/bin/gst-inspect-1.0",
                 f"{MULTIARCH}/gstreamer1.0/gstreamer-1.0/gst-plugin-scanner"]
GST_PLUGINS = ["coreelements", "video4linux2", "videoparsersbad", "ivfparse", "debug",
               "videoconvertscale", "app", "videotestsrc", "rawparse"]


@dataclass(frozen=True)
class Arch:
    """What differs between the guests: Debian's name for the architecture,
    its GNU triplet, the modules /init loads (with everything they depend
    on) and where the result is linked."""

    debian: str
    triplet: str
    modules: tuple[str, ...]
    link: str

    @property
    def native(self) -> bool:
        return self.debian == host_arch()

    @property
    def cross(self) -> str:
        """The prefix of its compiler and binutils on this host."""
        return "" if self.native else f"{self.triplet}-"

    def package(self, name: str) -> str:
        """``name`` as apt names it for this architecture."""
        return name if self.native or name in ARCH_ALL else f"{name}:{self.debian}"

    @property
    def packages(self) -> list[str]:
        """The userland packages: with libc where it is not the host's."""
        return [self.package(p) for p in PACKAGES + ([] if self.native else ["libc6"])]


ARCHES = {
    "amd64": Arch("amd64", "x86_64-linux-gnu", ("virtio_snd", "virtio_video", "virtio_media"),
                  "guest"),
    # virt's virtio-mmio transports need virtio_mmio, a module on arm64 (virtio_pci is built in).
    "arm64": Arch("arm64", "aarch64-linux-gnu",
                  ("virtio_mmio", "virtio_snd", "virtio_video", "virtio_media"), "guest-arm64"),
}

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp
# One module a line, dependencies first, then its parameters if any.
while read -r m params; do
    insmod /lib/modules/$m $params || echo "init: insmod $m failed"
done < /lib/modules/order
export HOME=/tmp
# GStreamer looks for plugins beside its library, which is in /lib here.
export GST_PLUGIN_SYSTEM_PATH=/usr/lib/{triplet}/gstreamer-1.0
export GST_PLUGIN_SCANNER=/usr/lib/{triplet}/gstreamer1.0/gstreamer-1.0/gst-plugin-scanner
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


@cache
def host_arch() -> str:
    return run("dpkg", "--print-architecture").strip()


def candidate(package: str, suite: str | None = None) -> str:
    """The version apt would install, or the newest one from ``suite``."""
    if suite:
        for line in run("apt-cache", "madison", package).splitlines():
            fields = [f.strip() for f in line.split("|")]
            if len(fields) == 3 and f" {suite}/" in fields[2]:
                return fields[1]
        sys.exit(f"build_guest: no {package} in {suite}: run ci/setup-host.sh first")
    return candidates((package,))[package]


@cache
def candidates(packages: tuple[str, ...]) -> dict[str, str]:
    """The version apt would install of each package, from one apt-cache
    call (each call reads apt's whole cache: about a second here)."""
    found: dict[str, str] = {}
    name = ""
    for line in run("apt-cache", "policy", *packages).splitlines():
        if not line.startswith(" ") and line.endswith(":"):
            name = line[:-1]
        elif line.strip().startswith("Candidate:") and line.split()[1] != "(none)":
            found[name] = line.split()[1]
    for package in packages:
        if package not in found:
            sys.exit(f"build_guest: apt knows no {package}")
    return found


@cache
def kernel_package(arch: Arch) -> tuple[str, str]:
    """linux-image-<abi>-<arch> that bookworm-backports' linux-image-<arch> pulls."""
    meta = arch.package(f"linux-image-{arch.debian}")
    version = candidate(meta, "bookworm-backports")
    deps = run("apt-cache", "show", f"{meta}={version}")
    for line in deps.splitlines():
        if line.startswith("Depends:"):
            name = line.split(":", 1)[1].split(",")[0].split("(")[0].strip()
            return name, candidate(arch.package(name))
    sys.exit(f"build_guest: cannot tell which kernel {meta} needs")


def modinfo_depends(ko: bytes) -> list[str]:
    marker = ko.find(b"\0depends=")
    if marker < 0:
        return []
    end = ko.index(b"\0", marker + 1)
    value = ko[marker + 9:end].decode()
    return [d for d in value.split(",") if d]


def collect_modules(moddirs: list[Path], names: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """The modules to load, dependencies first, decompressed; a module in a
    later directory (built out of tree) is found as well as Debian's."""
    index = {}
    for moddir in moddirs:
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

    for name in names:
        visit(name)
    return ordered


class Cpio:
    """A newc cpio archive, written in Python (no cpio binary needed)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1
        self.dirs: set[str] = set()

    def add(self, name: str, data: bytes = b"", mode: int = 0o100644,
            link: str | None = None) -> None:
        """One entry; its parent directories first where not yet there (the
        kernel's unpacker does not make them)."""
        name = name.strip("/")
        parent = name.rpartition("/")[0]
        if parent and parent not in self.dirs:
            self.dir(parent)
        if mode & 0o170000 == 0o040000:
            self.dirs.add(name)
        if link is not None:
            data, mode = link.encode(), 0o120777
        name_b = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0))
        self.ino += 1
        blob = header.encode() + name_b
        blob += b"\0" * (-len(blob) % 4) + data
        blob += b"\0" * (-len(blob) % 4)
        self.parts.append(blob)

    def dir(self, name: str) -> None:
        if name.strip("/") not in self.dirs:
            self.add(name, mode=0o040755)

    def finish(self) -> bytes:
        self.add("TRAILER!!!", mode=0)
        return gzip.compress(b"".join(self.parts), compresslevel=6)


def kernel_build_tree(arch: Arch, kernel: str, version: str) -> Path:
    """Debian's headers for the guest kernel and the host's kbuild tools
    (the same version), and the v4l2-core sources of the matching
    linux-source package where the kernel does not ship v4l2-mem2mem.ko,
    unpacked once into the cache.  Returns the headers directory to build
    against."""
    abi = kernel.removeprefix("linux-image-")              # 6.12.95+deb12-amd64
    base = abi.removesuffix(f"-{arch.debian}")
    series = ".".join(base.split(".")[:2])                  # 6.12
    tree = CACHE / f"kbuild-{abi}-{version}"
    headers = tree / "usr" / "src" / f"linux-headers-{abi}"
    if (tree / ".ready").exists():
        return headers
    shutil.rmtree(tree, ignore_errors=True)
    debs = tree / "debs"
    debs.mkdir(parents=True)
    # linux-kbuild is Multi-Arch: foreign: the host's build tools serve
    # another architecture's headers (which name their cross compiler).
    run("apt-get", "download", "-q", f"{arch.package(f'linux-headers-{abi}')}={version}",
        f"linux-headers-{base}-common={version}", f"linux-kbuild-{base}={version}", cwd=debs)
    for deb in debs.glob("linux-[hk]*.deb"):
        run("dpkg-deb", "-x", str(deb), str(tree))
    # The arch Makefile includes the common one by its installed path.
    common = tree / "usr" / "src" / f"linux-headers-{base}-common"
    (headers / "Makefile").write_text(f"include {common}/Makefile\n")
    if ships_mem2mem(headers):
        shutil.rmtree(debs)
        (tree / ".ready").touch()
        return headers
    run("apt-get", "download", "-q", f"linux-source-{series}={version}", cwd=debs)
    source = next(debs.glob("linux-source-*.deb"))
    wanted = f"linux-source-{series}/drivers/media/v4l2-core/v4l2-mem2mem.c"
    tarball = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(source)], check=True,
                             capture_output=True).stdout
    xz = subprocess.run(["tar", "-xO", f"./usr/src/linux-source-{series}.tar.xz"],
                        input=tarball, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-xJ", "-C", str(tree), wanted], input=xz, check=True)
    shutil.move(tree / wanted, tree / "v4l2-mem2mem.c")
    shutil.rmtree(debs)
    (tree / ".ready").touch()
    return headers


def ships_mem2mem(headers: Path) -> bool:
    """Whether Debian's kernel has v4l2-mem2mem.ko (not on amd64)."""
    return "\nCONFIG_V4L2_MEM2MEM_DEV=m\n" in (headers / ".config").read_text()


def kbuild(headers: Path, moddir: Path, *extra: str) -> None:
    try:
        run("make", "-C", str(headers), f"M={moddir}", "-j2", *extra, "modules")
    except subprocess.CalledProcessError as e:
        sys.exit(f"build_guest: building {moddir.name} failed:\n{e.stdout}\n{e.stderr}")


def copy_published(driver: Path, dst: Path) -> None:
    """A published driver's sources into a build directory, writable there
    (shared/ is read-only)."""
    shutil.copytree(driver, dst)
    for path in dst.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def build_video_modules(arch: Arch, kernel: str, version: str, tmp: Path) -> Path:
    """virtio-video.ko, virtio-media.ko, and v4l2-mem2mem.ko where Debian's
    kernel lacks it, built for the guest kernel, in the directory returned."""
    headers = kernel_build_tree(arch, kernel, version)
    out = tmp / "video-modules"
    out.mkdir()
    extra = []
    if not ships_mem2mem(headers):
        m2m = tmp / "v4l2-mem2mem"
        m2m.mkdir()
        shutil.copy(headers.parents[2] / "v4l2-mem2mem.c", m2m)
        (m2m / "Kbuild").write_text("obj-m := v4l2-mem2mem.o\n")
        kbuild(headers, m2m)
        shutil.copy(m2m / "v4l2-mem2mem.ko", out)
        extra.append(f"KBUILD_EXTRA_SYMBOLS={m2m / 'Module.symvers'}")
    # The driver exactly as published, our compatibility patch on top, and
    # our own Kbuild (the published one points into an Android kernel tree).
    src = tmp / "virtio-video"
    copy_published(VIDEO_DRIVER / "drivers", src / "drivers")
    run("patch", "-s", "-p1", "-d", str(src), "-i", str(DRIVER_PATCH))
    vv = src / "drivers" / "media" / "virtio"
    objects = " ".join(sorted(f.with_suffix(".o").name for f in vv.glob("virtio_video_*.c")))
    (vv / "Kbuild").write_text(
        "obj-m := virtio-video.o\n"
        f"virtio-video-objs := {objects}\n"
        f"ccflags-y := -I{VIDEO_DRIVER / 'include' / 'uapi'} -I$(src)\n")
    kbuild(headers, vv, *extra)
    shutil.copy(vv / "virtio-video.ko", out)
    build_media_module(headers, tmp, out)
    return out


def build_media_module(headers: Path, tmp: Path, out: Path) -> None:
    """virtio-media.ko into ``out``: the driver exactly as published, its own
    Kbuild included (it needs neither a patch nor v4l2-mem2mem on 6.12)."""
    src = tmp / "virtio-media"
    copy_published(MEDIA_DRIVER, src)
    kbuild(headers, src)
    shutil.copy(src / "virtio-media.ko", out)


def host_files(programs: list[str]) -> dict[str, Path]:
    """``programs`` and every shared library they load, by guest path."""
    files = {prog: Path(prog) for prog in programs}
    for prog in programs:
        for line in run("ldd", prog).splitlines():
            match = re.search(r"=> (/\S+)", line) or re.match(r"\s*(/\S+)", line)
            if match:
                files[match.group(1)] = Path(match.group(1))
    return files


def gst_plugins() -> list[str]:
    plugins = [f"{MULTIARCH}/gstreamer-1.0/libgst{name}.so" for name in GST_PLUGINS]
    present = [p for p in plugins if Path(p).exists()]
    if not any("video4linux2" in p for p in present):
        sys.exit("build_guest: no GStreamer v4l2 plugin: run ci/setup-host.sh first")
    return present


def target_libs(root: Path, arch: Arch, binaries: list[Path]) -> dict[str, Path]:
    """The dynamic loader and every shared library ``binaries`` need, found
    in the unpacked packages ``root``, by guest path (readelf reads any
    architecture's ELF)."""
    libdirs = [f"lib/{arch.triplet}", f"usr/lib/{arch.triplet}"]
    files: dict[str, Path] = {}
    todo = list(binaries)
    while todo:
        elf = run("readelf", "-d", "-l", str(todo.pop()))
        interp = re.search(r"program interpreter: (/\S+)\]", elf)
        if interp:
            files[interp.group(1)] = root / interp.group(1).lstrip("/")
        for lib in re.findall(r"\(NEEDED\)\s+Shared library: \[(\S+)\]", elf):
            found = [d for d in libdirs if (root / d / lib).exists()]
            if not found:
                sys.exit(f"build_guest: {lib} is in no package of the {arch.debian} guest")
            guest_path = f"/{found[0]}/{lib}"
            if guest_path not in files:
                files[guest_path] = root / found[0] / lib
                todo.append(files[guest_path])
    return files


def build_client(arch: Arch, tmp: Path, name: str) -> bytes:
    """One of the project's V4L2 clients (CLIENTS), static, for the guest: one
    gcc command, the source including CLIENT_SHARED from beside it."""
    out = tmp / name
    try:
        run(f"{arch.cross}gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o",
            str(out), str(CLIENTS[name]))
    except subprocess.CalledProcessError as e:
        sys.exit(f"build_guest: building {name} failed:\n{e.stderr}")
    return out.read_bytes()


def v4l2_compliance(arch: Arch) -> Path:
    """trixie's v4l2-compliance with its own loader and libraries (bookworm's
    1.22 fails checks that newer v4l-utils fixed): a directory, cached."""
    script = REPO / "ci" / "build_v4l2_compliance.sh"
    return Path(run("bash", str(script), arch.debian).splitlines()[-1]).parent


def add_v4l2_compliance(cpio: Cpio, arch: Arch) -> None:
    """At /opt/v4l2-compliance, with /usr/bin/v4l2-compliance its wrapper."""
    bundle = v4l2_compliance(arch)
    for path in sorted(bundle.rglob("*")):
        if path.is_file() and path.name != ".complete":
            executable = path.name == "v4l2-compliance" or path.name.startswith("ld-")
            cpio.add(f"opt/v4l2-compliance/{path.relative_to(bundle)}", path.read_bytes(),
                     0o100755 if executable else 0o100644)
    cpio.add("usr/bin/v4l2-compliance", link="/opt/v4l2-compliance/v4l2-compliance")


def build(out: Path, arch: Arch) -> None:
    kernel, kernel_version = kernel_package(arch)
    with tempfile.TemporaryDirectory(prefix="pyemb-guest-") as tmp_s:
        tmp = Path(tmp_s)
        run("apt-get", "download", "-q", f"{arch.package(kernel)}={kernel_version}",
            *arch.packages, cwd=tmp)
        root = tmp / "root"
        for deb in sorted(tmp.glob("*.deb")):
            run("dpkg-deb", "-x", str(deb), str(root))
        abi = kernel.removeprefix("linux-image-")
        shutil.copy(root / "boot" / f"vmlinuz-{abi}", out / "vmlinuz")
        cpio = Cpio()
        for d in ("bin", "dev", "proc", "sys", "tmp", "usr", "usr/bin", "usr/share",
                  "lib", "lib64", f"lib/{arch.triplet}", "lib/modules"):
            cpio.dir(d)
        cpio.add("init", INIT.format(triplet=arch.triplet).encode(), 0o100755)
        cpio.add("bin/busybox", (root / "bin/busybox").read_bytes(), 0o100755)
        cpio.add("bin/sh", link="busybox")
        for tool in TOOLS:
            cpio.add(f"usr/bin/{tool}", (root / "usr/bin" / tool).read_bytes(), 0o100755)
        if arch.native:
            libasound = root / f"usr/lib/{arch.triplet}/libasound.so.2"
            cpio.add(f"lib/{arch.triplet}/libasound.so.2", libasound.resolve().read_bytes())
            for lib in SYSTEM_LIBS:
                cpio.add(lib.lstrip("/"), Path(lib).resolve().read_bytes(), 0o100755)
        else:
            tools = [root / "usr/bin" / tool for tool in TOOLS]
            for guest_path, path in target_libs(root, arch, tools).items():
                cpio.add(guest_path, path.resolve().read_bytes(), 0o100755)
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
        if arch.native:
            programs = [*HOST_PROGRAMS, *gst_plugins()]
            for guest_path, host_path in host_files(programs).items():
                if guest_path.lstrip("/") not in (lib.lstrip("/") for lib in SYSTEM_LIBS):
                    cpio.add(guest_path, host_path.resolve().read_bytes(), 0o100755)
        for name in CLIENTS:
            cpio.add(f"usr/bin/{name}", build_client(arch, tmp, name), 0o100755)
        add_v4l2_compliance(cpio, arch)
        video_modules = build_video_modules(arch, kernel, kernel_version, tmp)
        modules = collect_modules([root / "lib/modules" / abi, video_modules], arch.modules)
        for name, data in modules:
            cpio.add(f"lib/modules/{name}", data)
        order = [f"{n} {MODULE_PARAMS.get(n.removesuffix('.ko'), '')}".rstrip()
                 for n, _ in modules]
        cpio.add("lib/modules/order", "\n".join(order).encode() + b"\n")
        (out / "initrd.img").write_bytes(cpio.finish())
        (out / "VERSIONS").write_text(
            f"{kernel} {kernel_version}\n"
            + "".join(f"{p} {v}\n" for p, v in candidates(guest_packages(arch)).items())
            + "modules: " + " ".join(n for n, _ in modules) + "\n"
            + (v4l2_compliance(arch) / "VERSIONS").read_text())


def guest_packages(arch: Arch) -> tuple[str, ...]:
    """Every package whose files end up in the guest."""
    return tuple(arch.packages + (HOST_PACKAGES if arch.native else []))


def main() -> None:
    parser = argparse.ArgumentParser(description="Builds the real-guest tier's guest.")
    parser.add_argument("--arch", choices=ARCHES, default="amd64")
    arch = ARCHES[parser.parse_args().arch]
    kernel, kernel_version = kernel_package(arch)
    key_src = Path(__file__).read_bytes() + f"{kernel}={kernel_version}".encode()
    key_src += "".join(f"{p}={v}" for p, v in candidates(guest_packages(arch)).items()).encode()
    # In an order that does not depend on where the checkout is, so that
    # every checkout of the same sources shares one cached guest.
    for path in [*sorted(VIDEO_DRIVER.rglob("*")), DRIVER_PATCH,
                 *sorted(MEDIA_DRIVER.rglob("*")), *CLIENTS.values(), *CLIENT_SHARED]:
        if path.is_file():
            key_src += path.read_bytes()
    key_src += v4l2_compliance(arch).name.encode()        # its version and script hash
    key = hashlib.sha256(key_src).hexdigest()[:12]
    out = CACHE / f"guest-{key}"
    if not (out / "initrd.img").exists():
        staging = Path(tempfile.mkdtemp(prefix="guest-", dir=CACHE))
        try:
            build(staging, arch)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        print(f"build_guest: built {out}")
    link = REPO / "build" / arch.link
    link.parent.mkdir(exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(out)


if __name__ == "__main__":
    main()
