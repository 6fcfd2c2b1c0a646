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
from tests.conftest import with_and_without_ring_features
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
           tmp_path=None, ring=None) -> tuple[Machine, HostDriverMedia]:  # noqa: ANN001
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
        return m, HostDriverMedia(m, m.find_virtio(p.DEVICE_ID), ring)
    except BaseException:
        m.stop()
        raise


@pytest.fixture
def cam(ring):
    m, media = camera(ring=ring)
    yield media
    assert m.alive(), m.stderr()
    m.stop()


def test_config_space_and_region_0(cam, tmp_path):
    caps, kind, card = p.CONFIG.unpack(cam.device.config(p.CONFIG.size))
    assert caps == v4l2.CAP_VIDEO_CAPTURE | v4l2.CAP_STREAMING | v4l2.CAP_EXT_PIX_FORMAT
    assert kind == v4l2.VFL_TYPE_VIDEO and card.rstrip(b"\0") == b"pyemb camera"
    assert cam.region is not None and cam.region[1] == 256 << 20


@with_and_without_ring_features
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


@with_and_without_ring_features
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


@with_and_without_ring_features
def test_many_sessions_close_while_streaming_and_reset(tmp_path, ring):
    m, cam = camera(config="[media]\nmax_sessions = 32\n", tmp_path=tmp_path, ring=ring)
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


@with_and_without_ring_features
def test_virtio_mmio_has_no_region_and_captures_into_userptr(ring):
    m, media = camera(arch="aarch64", ring=ring)
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


def test_every_ioctl_the_driver_sends_a_camera_through_qemu(cam):
    """Each ioctl the virtio-media driver forwards, once, through the real
    transport: those a camera has answer as V4L2 says, the rest ENOTTY."""
    c = cam.client
    s = c.open()
    assert c.ioctl(s, "enum_fmt", v4l2.Fmtdesc(index=1, type=CAP))[0].pixelformat == NV12
    f = c.ioctl(s, "try_fmt", c.ioctl(s, "g_fmt", v4l2.Format(type=CAP))[0])[0]
    assert f.fmt.pix.bytesperline == 1280
    assert c.s_fmt(s, "NV12", 1280, 720).fmt.pix.sizeimage == 1280 * 720 * 3 // 2
    fs = c.ioctl(s, "enum_framesizes", v4l2.Frmsizeenum(index=3, pixel_format=NV12))[0]
    assert (fs.u.discrete.width, fs.u.discrete.height) == (1920, 1080)
    fi = c.ioctl(s, "enum_frameintervals",
                 v4l2.Frmivalenum(index=3, pixel_format=NV12, width=1280, height=720))[0]
    assert fi.u.discrete.denominator == 60
    parm = v4l2.StreamParm(type=CAP)
    parm.parm.capture.timeperframe.numerator, parm.parm.capture.timeperframe.denominator = 1, 25
    c.ioctl(s, "s_parm", parm)
    assert c.ioctl(s, "g_parm", v4l2.StreamParm(type=CAP))[0] \
        .parm.capture.timeperframe.denominator == 25
    assert bytes(c.ioctl(s, "enuminput", v4l2.Input(index=0))[0].name).startswith(b"Camera 0")
    assert c.ioctl(s, "g_input")[0].value == 0
    c.ioctl(s, "s_input", v4l2.Int(value=0))
    assert c.status(s, "s_input", v4l2.Int(value=1)) == errno.EINVAL
    q = c.ioctl(s, "queryctrl", v4l2.Queryctrl(id=v4l2.CID_CONTRAST))[0]
    assert (q.minimum, q.maximum, q.default_value) == (0, 255, 128)
    qe = c.ioctl(s, "query_ext_ctrl", v4l2.QueryExtCtrl(id=v4l2.CID_TEST_PATTERN))[0]
    assert (qe.type, qe.maximum) == (v4l2.CTRL_TYPE_MENU, 2)
    assert bytes(c.ioctl(s, "querymenu", v4l2.Querymenu(id=v4l2.CID_TEST_PATTERN, index=2))[0]
                 .u.name).startswith(b"Moving Gradient")
    other = c.open()
    sub = v4l2.EventSubscription(type=v4l2.EVENT_CTRL, id=v4l2.CID_SATURATION)
    c.ioctl(other, "subscribe_event", sub)
    assert c.ioctl(s, "s_ctrl", v4l2.Control(id=v4l2.CID_SATURATION, value=64))[0].value == 64
    (event,) = cam.events(1)
    assert (event.kind, event.session, event.v4l2_event.id) == (p.Evt.EVENT, other,
                                                                 v4l2.CID_SATURATION)
    c.ioctl(other, "unsubscribe_event", sub)
    assert c.ioctl(s, "g_ctrl", v4l2.Control(id=v4l2.CID_SATURATION))[0].value == 64
    ctrl = v4l2.ExtControl(id=v4l2.CID_BRIGHTNESS)
    ctrl.u.value = -20
    for name in ("try_ext_ctrls", "s_ext_ctrls"):
        c.ioctl(s, name, v4l2.ExtControls(count=1), bytes(ctrl))
    _, rest = c.ioctl(s, "g_ext_ctrls", v4l2.ExtControls(count=1), bytes(ctrl))
    assert v4l2.ExtControl.parse(rest).u.value == -20
    cb = v4l2.CreateBuffers(count=2, memory=v4l2.MEMORY_MMAP)
    cb.format = c.ioctl(s, "g_fmt", v4l2.Format(type=CAP))[0]
    assert c.ioctl(s, "create_bufs", cb)[0].count == 2
    b, _ = c.buffer(1)
    assert c.ioctl(s, "prepare_buf", b)[0].flags & v4l2.BUF_FLAG_PREPARED
    c.qbuf(s, 1)
    c.stream(s, True)
    (done,) = cam.events(1)
    assert done.kind == p.Evt.DQBUF and done.buffer.index == 1
    c.stream(s, False)
    for name in ("g_std", "querystd", "g_output", "decoder_cmd", "g_selection"):
        assert c.status(s, name) == errno.ENOTTY, name
    assert c.status(s, "s_std", v4l2.StdId(value=1)) == errno.ENOTTY
