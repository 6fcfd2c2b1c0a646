"""virtio-media-py through QEMU (qtest tier): the host test driver speaks the
protocol as the Linux driver does, MMAP buffers are read through the PCI
BAR of shared memory region 0, USERPTR buffers from guest RAM."""

from __future__ import annotations

import errno
import time

import numpy as np
import pytest

from pyemb.camera_source import TestPattern as PatternSource
from pyemb.media import protocol as p
from pyemb.media import v4l2
from pyemb.media.formats import NV12, YUYV, ImageFormat
from tests.hostdriver.machine import Machine, QemuExited
from tests.media_client import HostDriverMedia, IoctlFailed

CAP = v4l2.BUF_TYPE_VIDEO_CAPTURE


def expected(fmt: ImageFormat, sequence: int) -> bytes:
    source = PatternSource()
    source.start(fmt, 30)
    target = np.zeros(fmt.sizeimage, np.uint8)
    source.render(sequence, target)
    return target.tobytes()


def camera(args: str = "", arch: str = "x86_64", config: str | None = None,
           tmp_path=None) -> tuple[Machine, HostDriverMedia]:  # noqa: ANN001
    extra = ""
    if config is not None:
        path = tmp_path / "media.toml"
        path.write_text(config)
        extra = f",config={path}"
    if arch == "x86_64":
        m = Machine.x86(["-device", f"virtio-media-py-pci,id=cam{args}{extra}"], mem_mb=256)
    else:
        m = Machine.aarch64(["-device", f"virtio-media-py,id=cam{args}{extra}"], mem_mb=256)
    m.start()
    try:
        return m, HostDriverMedia(m, m.find_virtio(p.DEVICE_ID))
    except BaseException:
        m.stop()
        raise


@pytest.fixture
def cam():
    m, media = camera()
    yield media
    assert m.alive(), m.stderr()
    m.stop()


def test_config_space_and_region_0(cam, tmp_path):
    caps, kind, card = p.CONFIG.unpack(cam.device.config(p.CONFIG.size))
    assert caps == v4l2.CAP_VIDEO_CAPTURE | v4l2.CAP_STREAMING | v4l2.CAP_EXT_PIX_FORMAT
    assert kind == v4l2.VFL_TYPE_VIDEO and card.rstrip(b"\0") == b"pyemb camera"
    assert cam.region is not None and cam.region[1] == 256 << 20


def test_mmap_capture_read_through_the_bar_is_bit_exact(cam):
    c = cam.client
    s = c.open()
    c.s_fmt(s, "YUYV", 640, 480)
    fmt = ImageFormat(YUYV, 640, 480)
    assert c.reqbufs(s, 3).count == 3
    offsets = {}
    for i in range(3):
        b, _ = c.querybuf(s, i)
        status, addr, length = c.mmap(s, b.m.offset)
        assert status == 0 and length >= fmt.sizeimage
        offsets[i] = addr
        c.qbuf(s, i)
    c.stream(s, True)
    events = cam.events(3)
    assert len(events) == 3
    for e in events:
        b = e.buffer
        assert e.kind == p.Evt.DQBUF and e.session == s
        assert cam.read_region(offsets[b.index], b.bytesused) == expected(fmt, b.sequence)
    c.stream(s, False)
    for addr in offsets.values():
        assert c.munmap(addr) == 0
    c.close(s)


def test_userptr_capture_into_guest_ram(cam):
    c = cam.client
    s = c.open()
    c.s_fmt(s, "NV12", 320, 240)
    fmt = ImageFormat(NV12, 320, 240)
    c.reqbufs(s, 2, memory=v4l2.MEMORY_USERPTR)
    m = cam.machine
    pages = [m.alloc.alloc(4096, 4096) for _ in range(fmt.sizeimage // 4096 + 1)]
    pages.reverse()
    sg = b"".join(p.SG_ENTRY.pack(a, 4096, 0) for a in pages)
    c.qbuf(s, 0, memory=v4l2.MEMORY_USERPTR, userptr=0x10000, length=fmt.sizeimage, sg=sg)
    c.stream(s, True)
    (e,) = cam.events(1)
    data = b"".join(m.mem.read(a, 4096) for a in pages)[: fmt.sizeimage]
    assert data == expected(fmt, e.buffer.sequence)


def test_many_sessions_close_while_streaming_and_reset(tmp_path):
    m, cam = camera(config="[media]\nmax_sessions = 32\n", tmp_path=tmp_path)
    try:
        many_sessions(cam)
        assert m.alive(), m.stderr()
    finally:
        m.stop()


def many_sessions(cam: HostDriverMedia) -> None:
    c = cam.client
    sessions = [c.open() for _ in range(32)]
    with pytest.raises(IoctlFailed) as e:
        c.open()
    assert e.value.status == errno.ENOMEM
    owner = sessions[0]
    c.reqbufs(owner, 4)
    for i in range(4):
        c.qbuf(owner, i)
    c.stream(owner, True)
    cam.events(2)
    c.close(owner)                          # streaming: its buffers go with it
    for s in sessions[1:]:
        c.close(s)
    s = c.open()
    assert c.reqbufs(s, 2).count == 2
    c.qbuf(s, 0)
    c.stream(s, True)
    cam.device.reset()                      # mid-stream
    time.sleep(0.1)
    cam.__init__(cam.machine, cam.device)
    s = cam.client.open()
    assert cam.client.reqbufs(s, 2).count == 2


def test_bad_commands_get_errnos(cam):
    c = cam.client
    s = c.open()
    assert c.raw_ioctl(s, 250, b"", 0)[0] == errno.ENOTTY
    assert c.raw_ioctl(s, 4, bytes(8), 208)[0] == errno.EINVAL
    assert c.raw_ioctl(s + 7, 4, bytes(208), 208)[0] == errno.EINVAL
    assert c.mmap(s, 4096)[0] == errno.EINVAL
    assert c.munmap(1 << 20) == errno.EINVAL
    assert cam.send([b"\x07\0\0\0\0\0\0\0"], [8])[:4] == errno.ENOTTY.to_bytes(4, "little")
    assert c.ioctl(s, "g_fmt", v4l2.Format(type=CAP))[0].fmt.pix.width == 640


def test_virtio_mmio_has_no_region_and_captures_into_userptr():
    m, media = camera(arch="aarch64")
    try:
        assert media.region is None
        c = media.client
        s = c.open()
        with pytest.raises(IoctlFailed):
            c.reqbufs(s, 2)
        c.s_fmt(s, "NV12", 320, 240)
        fmt = ImageFormat(NV12, 320, 240)
        c.reqbufs(s, 2, memory=v4l2.MEMORY_USERPTR)
        base = m.alloc.alloc(fmt.sizeimage, 4096)
        c.qbuf(s, 0, memory=v4l2.MEMORY_USERPTR, userptr=1, length=fmt.sizeimage,
               sg=p.SG_ENTRY.pack(base, fmt.sizeimage, 0))
        c.stream(s, True)
        (e,) = media.events(1)
        assert m.mem.read(base, fmt.sizeimage) == expected(fmt, e.buffer.sequence)
    finally:
        m.stop()


def test_bad_config_stops_qemu_with_one_line(tmp_path):
    with pytest.raises(QemuExited) as e:
        camera(config='[camera]\nsizes = ["huge"]\n', tmp_path=tmp_path)
    lines = [line for line in e.value.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "camera.sizes" in lines[0], e.value.stderr
    with pytest.raises(QemuExited) as e:
        camera(",role=printer")
    assert "role must be camera or decoder" in e.value.stderr
