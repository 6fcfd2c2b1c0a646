"""virtio-media-py's camera and protocol layer, in process (pure-Python tier):
the model with stand-ins for QEMU's requests, guest RAM and region 0."""

from __future__ import annotations

import ctypes as C
import errno
import shutil
import subprocess
import time

import numpy as np
import pytest

from pyemb.camera_source import TestPattern as PatternSource
from pyemb.camera_source import read_counter
from pyemb.config import ConfigError
from pyemb.media import protocol as p
from pyemb.media import v4l2
from pyemb.media.device import MediaDevice
from pyemb.media.formats import NV12, YU12, YUYV, ImageFormat
from tests.fakes import FakeHandle
from tests.media_client import IoctlFailed
from tests.media_rig import Rig

CAP = v4l2.BUF_TYPE_VIDEO_CAPTURE


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def expected(fmt: ImageFormat, sequence: int) -> bytes:
    source = PatternSource()
    source.start(fmt, 30)
    target = np.zeros(fmt.sizeimage, np.uint8)
    source.render(sequence, target)
    return target.tobytes()


# -- wire layout ---------------------------------------------------------------------
STRUCTS = {"v4l2_format": v4l2.Format, "v4l2_buffer": v4l2.Buffer, "v4l2_plane": v4l2.Plane,
           "v4l2_requestbuffers": v4l2.RequestBuffers,
           "v4l2_create_buffers": v4l2.CreateBuffers, "v4l2_fmtdesc": v4l2.Fmtdesc,
           "v4l2_frmsizeenum": v4l2.Frmsizeenum, "v4l2_frmivalenum": v4l2.Frmivalenum,
           "v4l2_streamparm": v4l2.StreamParm, "v4l2_input": v4l2.Input,
           "v4l2_queryctrl": v4l2.Queryctrl, "v4l2_query_ext_ctrl": v4l2.QueryExtCtrl,
           "v4l2_querymenu": v4l2.Querymenu, "v4l2_control": v4l2.Control,
           "v4l2_ext_control": v4l2.ExtControl, "v4l2_ext_controls": v4l2.ExtControls,
           "v4l2_event_subscription": v4l2.EventSubscription, "v4l2_event": v4l2.Event,
           "v4l2_decoder_cmd": v4l2.DecoderCmd, "v4l2_selection": v4l2.Selection,
           "v4l2_pix_format_mplane": v4l2.PixFormatMplane}


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")  # ci/setup-host.sh has it
def test_structures_and_ioctl_table_match_videodev2_h(tmp_path):
    """Sizes and field offsets against the host's linux/videodev2.h, and every
    ioctl's number, direction and payload size against its _IO* macro."""
    names = {"VIDIOC_" + io.name.upper(): io for io in p.IOCTLS.values()}
    lines = [f'printf("{n} %zu\\n", sizeof(struct {n}));' for n in STRUCTS]
    lines += [f'printf("{n} %u %u %u\\n", _IOC_NR({n}), _IOC_DIR({n}), _IOC_SIZE({n}));'
              for n in names]
    lines += ['printf("offset m %zu\\n", offsetof(struct v4l2_buffer, m));',
              'printf("offset ev %zu\\n", offsetof(struct v4l2_event, timestamp));',
              'printf("offset cb %zu\\n", offsetof(struct v4l2_create_buffers, capabilities));']
    src = tmp_path / "sizes.c"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/videodev2.h>\n"
                   "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n")
    subprocess.run(["gcc", "-o", str(tmp_path / "sizes"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "sizes")], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    seen = 0
    for line in filter(None, out):
        name, *values = line.split()
        if name in STRUCTS:
            assert C.sizeof(STRUCTS[name]) == int(values[0]), name
        elif name in names:
            io = names[name]
            nr, direction, size = map(int, values)
            # _IOC_DIR: 1 write (to the kernel: our W), 2 read (our R)
            ours = (p.W if direction & 1 else 0) | (p.R if direction & 2 else 0)
            assert (io.code, io.direction, io.size) == (nr, ours, size), name
        else:
            field = {"m": v4l2.Buffer.m.offset, "ev": v4l2.Event.timestamp.offset,
                     "cb": v4l2.CreateBuffers.capabilities.offset}[values[0]]
            assert field == int(values[1]), line
        seen += 1
    assert seen == len(STRUCTS) + len(names) + 3


# -- capture -------------------------------------------------------------------------
@pytest.mark.parametrize("fourcc,size", [("YUYV", (1280, 720)), ("NV12", (640, 480)),
                                         ("YU12", (320, 240))])
def test_mmap_capture_is_bit_exact_with_sequence_and_monotonic_timestamps(rig, fourcc, size):
    c = rig.client
    s = c.open()
    f = c.s_fmt(s, fourcc, *size)
    fmt = ImageFormat(v4l2.fourcc(fourcc), *size)
    assert (f.fmt.pix.width, f.fmt.pix.height, f.fmt.pix.sizeimage) == (*size, fmt.sizeimage)
    assert c.reqbufs(s, 4).count == 4
    for i in range(4):
        b, _ = c.querybuf(s, i)
        status, addr, length = c.mmap(s, b.m.offset)
        assert (status, addr) == (0, b.m.offset) and length >= fmt.sizeimage
        assert length % 4096 == 0
        c.qbuf(s, i)
    c.stream(s, True)
    events = rig.events(4)
    assert [e.kind for e in events] == [p.Evt.DQBUF] * 4
    stamps = []
    for e in events:
        b = e.buffer
        assert e.session == s and b.bytesused == fmt.sizeimage
        assert b.flags & v4l2.BUF_FLAG_TIMESTAMP_MONOTONIC
        assert not b.flags & (v4l2.BUF_FLAG_QUEUED | v4l2.BUF_FLAG_ERROR)
        image = rig.image(e)
        assert read_counter(fmt, image) == b.sequence
        assert image == expected(fmt, b.sequence)
        stamps.append(b.timestamp.tv_sec * 1_000_000 + b.timestamp.tv_usec)
    assert [e.buffer.sequence for e in events] == [0, 1, 2, 3]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] >= 2 * 33_000 * 0.9
    c.qbuf(s, events[0].buffer.index)
    (more,) = rig.events(1)
    assert more.buffer.sequence >= 4
    assert rig.image(more) == expected(fmt, more.buffer.sequence)


def test_userptr_capture_over_scattered_guest_pages_is_bit_exact(rig):
    c = rig.client
    s = c.open()
    c.s_fmt(s, "NV12", 320, 240)
    fmt = ImageFormat(NV12, 320, 240)
    c.reqbufs(s, 2, memory=v4l2.MEMORY_USERPTR)
    # Pages in reverse order, the first one starting mid-page.
    pages = [(0x100000 - 4096 * i, 4096) for i in range(40)]
    pages[0] = (pages[0][0] + 100, 3996)
    sg = b"".join(p.SG_ENTRY.pack(a, n, 0) for a, n in pages)
    c.qbuf(s, 0, memory=v4l2.MEMORY_USERPTR, userptr=0x7f0000001064, length=fmt.sizeimage,
           sg=sg)
    c.stream(s, True)
    (e,) = rig.events(1)
    assert e.buffer.bytesused == fmt.sizeimage
    data = b"".join(bytes(rig.handle.ram[a:a + n]) for a, n in pages)[: fmt.sizeimage]
    assert data == expected(fmt, e.buffer.sequence)
    assert not rig.handle.mappings          # unmapped once back with the guest


def test_userptr_refused_when_short_or_outside_guest_ram(rig):
    c = rig.client
    s = c.open()
    c.s_fmt(s, "YUYV", 320, 240)
    c.reqbufs(s, 2, memory=v4l2.MEMORY_USERPTR)
    size = 320 * 240 * 2
    short = p.SG_ENTRY.pack(0x1000, size - 1, 0)
    with pytest.raises(IoctlFailed) as e:
        c.qbuf(s, 0, memory=v4l2.MEMORY_USERPTR, userptr=1, length=size, sg=short)
    assert e.value.status == errno.EINVAL
    outside = p.SG_ENTRY.pack(1 << 40, size, 0)
    with pytest.raises(IoctlFailed) as e:
        c.qbuf(s, 0, memory=v4l2.MEMORY_USERPTR, userptr=1, length=size, sg=outside)
    assert e.value.status == errno.EFAULT
    with pytest.raises(IoctlFailed) as e:
        c.qbuf(s, 0, memory=v4l2.MEMORY_USERPTR, userptr=1, length=size - 2,
               sg=p.SG_ENTRY.pack(0x1000, size, 0))
    assert e.value.status == errno.EINVAL
    assert not rig.handle.mappings


def test_streamoff_takes_buffers_back_without_events_and_qbuf_twice_is_einval(rig):
    c = rig.client
    s = c.open()
    c.reqbufs(s, 3)
    c.qbuf(s, 0)
    assert c.qbuf(s, 1).flags & v4l2.BUF_FLAG_QUEUED
    with pytest.raises(IoctlFailed) as e:
        c.qbuf(s, 1)
    assert e.value.status == errno.EINVAL
    c.stream(s, False)
    time.sleep(0.1)
    assert rig.events(1, timeout=0.2) == []
    b, _ = c.querybuf(s, 1)
    assert not b.flags & v4l2.BUF_FLAG_QUEUED
    c.qbuf(s, 1)                            # queued again after STREAMOFF


def start_capture(rig: Rig, fourcc: str, width: int, height: int, count: int,
                  queued: int | None = None) -> int:
    """A session streaming ``count`` MMAP buffers (``queued`` of them queued)."""
    c = rig.client
    s = c.open()
    c.s_fmt(s, fourcc, width, height)
    c.reqbufs(s, count)
    for i in range(count if queued is None else queued):
        c.qbuf(s, i)
    c.stream(s, True)
    return s


def raw_streamoff(rig: Rig, session: int):  # noqa: ANN201 - a FakeRequest
    """STREAMOFF(CAPTURE) sent, its answer not waited for, no event taken in."""
    t = v4l2.Int()
    t.value = CAP
    code = next(io.code for io in p.IOCTLS.values() if io.name == "streamoff")
    request = rig.handle.request([p.IOCTL.pack(p.Cmd.IOCTL, 0, session, code), bytes(t)],
                                 [p.HEADER.size], p.COMMAND_QUEUE)
    rig.handle.call(rig.dev, p.COMMAND_QUEUE, request)
    return request


def wait_until(check, timeout: float = 5.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition never came"
        time.sleep(0.002)


def test_streamoff_is_answered_after_the_driver_took_in_the_dqbuf_events_before_it(rig):
    """Linux's driver takes events in on a work item of its own and empties
    its list of done buffers when STREAMOFF's answer comes: a DQBUF event
    it took in after the answer would link a buffer twice (a kernel oops in
    DQBUF).  So the answer waits for the driver to post those event
    buffers again."""
    s = start_capture(rig, "YUYV", 160, 120, 4)
    wait_until(lambda: rig.dev.events.delivered >= 2)
    request = raw_streamoff(rig, s)
    time.sleep(0.2)
    assert not request.done                 # the events are out, not taken in
    got = rig.poll()                        # the driver acts on them, posts the buffers
    assert len(got) >= 2 and all(e.kind == p.Evt.DQBUF for e in got)
    wait_until(lambda: request.done)
    assert int.from_bytes(request.reply[:4], "little") == 0
    time.sleep(0.1)
    assert rig.poll() == []                 # nothing after the answer


def test_a_driver_that_keeps_its_event_buffers_gets_streamoff_answered_in_bounded_time(
        rig, monkeypatch):
    monkeypatch.setattr("pyemb.media.device.FENCE_TIMEOUT_S", 0.3)
    s = start_capture(rig, "YUYV", 160, 120, 2, queued=1)
    wait_until(lambda: rig.dev.events.delivered >= 1)
    start = time.monotonic()
    request = raw_streamoff(rig, s)
    wait_until(lambda: request.done)
    assert 0.25 <= time.monotonic() - start < 2


def test_dqbuf_events_waiting_for_event_buffers_go_at_streamoff_and_close():
    """A driver out of event buffers: what waits for one is not delivered
    once the stream it is of stopped (STREAMOFF took the buffers back) or
    its session closed; other sessions' events still are."""
    rig = Rig(event_buffers=0)
    try:
        c = rig.client
        b = c.open()
        sub = v4l2.EventSubscription()
        sub.type, sub.id = v4l2.EVENT_CTRL, v4l2.CID_BRIGHTNESS
        c.ioctl(b, "subscribe_event", sub)
        a = start_capture(rig, "YUYV", 160, 120, 3)
        wait_until(lambda: len(rig.dev.events.pending) >= 3)
        c.stream(a, False)
        assert not rig.dev.events.pending
        ctrl = v4l2.Control()
        ctrl.id, ctrl.value = v4l2.CID_BRIGHTNESS, 10
        c.ioctl(a, "s_ctrl", ctrl)          # an event for b
        c.close(a)
        for _ in range(4):
            rig.post_event_buffer()
        got = rig.events(4, timeout=0.3)
        assert [(e.kind, e.session) for e in got] == [(p.Evt.EVENT, b)]
    finally:
        rig.close()


def test_buffers_belong_to_one_session_and_format_is_busy_while_allocated(rig):
    c = rig.client
    a, b = c.open(), c.open()
    c.reqbufs(a, 2)
    for call in (lambda: c.reqbufs(b, 2), lambda: c.qbuf(b, 0),
                 lambda: c.s_fmt(a, "NV12", 1280, 720)):
        with pytest.raises(IoctlFailed) as e:
            call()
        assert e.value.status == errno.EBUSY
    c.s_fmt(b, "YUYV", 640, 480)            # the format in force: no change, allowed
    c.close(a)                              # its buffers go with it
    assert c.reqbufs(b, 2).count == 2


def test_formats_sizes_intervals_and_parm(rig):
    c = rig.client
    s = c.open()
    formats = [d.pixelformat for d in
               rig.enumerate(s, "enum_fmt", lambda i: v4l2.Fmtdesc(index=i, type=CAP))]
    assert formats == [YUYV, NV12, YU12]
    sizes = []
    for i in range(10):
        fs = v4l2.Frmsizeenum(index=i, pixel_format=NV12)
        if c.status(s, "enum_framesizes", fs):
            break
        out = c.ioctl(s, "enum_framesizes", fs)[0]
        assert out.type == v4l2.FRMSIZE_TYPE_DISCRETE
        sizes.append((out.u.discrete.width, out.u.discrete.height))
    assert (1920, 1080) in sizes and (640, 480) in sizes
    fi = c.ioctl(s, "enum_frameintervals", v4l2.Frmivalenum(index=0, pixel_format=NV12,
                                                            width=1920, height=1080))[0]
    assert (fi.u.discrete.numerator, fi.u.discrete.denominator) == (1, 15)
    assert c.status(s, "enum_frameintervals",
                    v4l2.Frmivalenum(index=0, pixel_format=NV12, width=1000, height=10)) \
        == errno.EINVAL
    parm = v4l2.StreamParm(type=CAP)
    parm.parm.capture.timeperframe.numerator, parm.parm.capture.timeperframe.denominator = 1, 59
    out = c.ioctl(s, "s_parm", parm)[0]
    assert out.parm.capture.timeperframe.denominator == 60
    assert out.parm.capture.capability == v4l2.CAP_TIMEPERFRAME
    t = c.ioctl(s, "try_fmt", c.s_fmt(s, "NV12", 1280, 720))[0]
    assert t.fmt.pix.pixelformat == NV12
    odd = v4l2.Format(type=CAP)
    odd.fmt.pix.width, odd.fmt.pix.height, odd.fmt.pix.pixelformat = 1900, 1000, 0x12345678
    t = c.ioctl(s, "try_fmt", odd)[0]
    assert (t.fmt.pix.width, t.fmt.pix.height, t.fmt.pix.pixelformat) == (1920, 1080, YUYV)
    assert c.status(s, "g_fmt", v4l2.Format(type=v4l2.BUF_TYPE_VIDEO_OUTPUT)) == errno.EINVAL


def test_controls_clamp_menus_ext_ctrls_and_events_to_other_sessions(rig):
    c = rig.client
    a, b = c.open(), c.open()
    names = []
    q = v4l2.QueryExtCtrl(id=v4l2.CTRL_FLAG_NEXT_CTRL)
    while not c.status(a, "query_ext_ctrl", q):
        q = c.ioctl(a, "query_ext_ctrl", q)[0]
        names.append(bytes(q.name).rstrip(b"\0").decode())
        q = v4l2.QueryExtCtrl(id=q.id | v4l2.CTRL_FLAG_NEXT_CTRL)
    assert names == ["User Controls", "Brightness", "Contrast", "Saturation",
                     "Image Processing Controls", "Test Pattern"]
    menu = c.ioctl(a, "querymenu", v4l2.Querymenu(id=v4l2.CID_TEST_PATTERN, index=1))[0]
    assert bytes(menu.u.name).rstrip(b"\0") == b"Moving Checkerboard"
    assert c.status(a, "querymenu", v4l2.Querymenu(id=v4l2.CID_TEST_PATTERN, index=3)) \
        == errno.EINVAL
    sub = v4l2.EventSubscription(type=v4l2.EVENT_CTRL, id=v4l2.CID_BRIGHTNESS)
    c.ioctl(b, "subscribe_event", sub)
    out = c.ioctl(a, "s_ctrl", v4l2.Control(id=v4l2.CID_BRIGHTNESS, value=1000))[0]
    assert out.value == 127                                     # clamped
    (event,) = rig.events(1)
    ev = event.v4l2_event
    assert (event.session, ev.type, ev.id) == (b, v4l2.EVENT_CTRL, v4l2.CID_BRIGHTNESS)
    assert int.from_bytes(bytes(ev.u.data)[8:12], "little", signed=True) == 127
    assert c.ioctl(b, "g_ctrl", v4l2.Control(id=v4l2.CID_BRIGHTNESS))[0].value == 127
    # Extended: the second control is a menu index out of range: nothing is set.
    ctrls = [v4l2.ExtControl(id=v4l2.CID_CONTRAST), v4l2.ExtControl(id=v4l2.CID_TEST_PATTERN)]
    ctrls[0].u.value, ctrls[1].u.value = 50, 7
    ec = v4l2.ExtControls(which=v4l2.CTRL_CLASS_USER & 0, count=2)
    status, out = c.raw_ioctl(a, 72, bytes(ec), C.sizeof(ec) + 40,
                              b"".join(map(bytes, ctrls)))
    assert status == errno.ERANGE
    assert c.ioctl(a, "g_ctrl", v4l2.Control(id=v4l2.CID_CONTRAST))[0].value == 128
    ctrls[1].u.value = 2
    out, rest = c.ioctl(a, "s_ext_ctrls", v4l2.ExtControls(count=2),
                        b"".join(map(bytes, ctrls)))
    assert v4l2.ExtControl.parse(rest[20:]).u.value == 2
    status, out = c.raw_ioctl(a, 71, bytes(v4l2.ExtControls(count=1)), 32 + 20,
                              bytes(v4l2.ExtControl(id=0x00981234)))
    assert status == errno.EINVAL and v4l2.ExtControls.parse(out).error_idx == 1
    status, out = c.raw_ioctl(a, 73, bytes(v4l2.ExtControls(count=1)), 32 + 20,
                              bytes(v4l2.ExtControl(id=0x00981234)))
    assert status == errno.EINVAL and v4l2.ExtControls.parse(out).error_idx == 0
    assert c.status(a, "g_ctrl", v4l2.Control(id=0x00981234)) == errno.EINVAL


def test_picture_controls_change_the_picture(rig):
    c = rig.client
    s = c.open()
    c.s_fmt(s, "NV12", 320, 240)
    c.ioctl(s, "s_ctrl", v4l2.Control(id=v4l2.CID_TEST_PATTERN, value=1))
    c.ioctl(s, "s_ctrl", v4l2.Control(id=v4l2.CID_BRIGHTNESS, value=10))
    c.reqbufs(s, 2)
    c.qbuf(s, 0)
    c.stream(s, True)
    (e,) = rig.events(1)
    image = np.frombuffer(rig.image(e), np.uint8)
    luma = image[: 320 * 240].reshape(240, 320)
    assert set(np.unique(luma[40:, :])) == {26, 245}      # checkerboard 16/235 + 10


def test_malformed_commands_get_errnos_and_the_device_keeps_serving(rig):
    c = rig.client
    s = c.open()
    assert c.raw_ioctl(s, 200, b"", 0)[0] == errno.ENOTTY               # unknown code
    assert c.raw_ioctl(s, 0, b"", 104, direction=p.R)[0] == errno.ENOTTY  # QUERYCAP
    assert c.raw_ioctl(s, 17, bytes(88), 88)[0] == errno.ENOTTY           # DQBUF
    assert c.raw_ioctl(s, 4, bytes(100), 208)[0] == errno.EINVAL          # short payload
    assert c.raw_ioctl(s + 100, 4, bytes(208), 208)[0] == errno.EINVAL    # no such session
    assert rig.send([b"\x09\0\0\0\0\0\0\0"], [8])[:4] == errno.ENOTTY.to_bytes(4, "little")
    assert rig.send([b"\x03\0"], [8])[:4] == errno.EINVAL.to_bytes(4, "little")
    assert rig.send([p.HEADER.pack(p.Cmd.OPEN, 0)], [4]) == b""           # no room: nothing
    planes = bytes(v4l2.Buffer(type=v4l2.BUF_TYPE_VIDEO_CAPTURE_MPLANE, length=9))
    assert c.raw_ioctl(s, 15, planes, 88)[0] == errno.EINVAL
    ec = bytes(v4l2.ExtControls(count=5000))
    assert c.raw_ioctl(s, 71, ec, 32)[0] == errno.EINVAL
    assert c.mmap(s, 12345)[0] == errno.EINVAL
    assert c.munmap(4096) == errno.EINVAL
    assert c.ioctl(s, "g_fmt", v4l2.Format(type=CAP))[0].fmt.pix.width == 640


def test_sessions_are_bounded():
    rig = Rig({"media": {"max_sessions": 3}})
    c = rig.client
    for _ in range(3):
        c.open()
    with pytest.raises(IoctlFailed) as e:
        c.open()
    assert e.value.status == errno.ENOMEM
    rig.close()


def test_region_full_is_enomem_and_orphaned_buffers_wait_for_munmap():
    rig = Rig(shm=8 << 20)
    c = rig.client
    s = c.open()
    c.s_fmt(s, "YUYV", 1280, 720)            # 1.8 MB a buffer: 4 fit in 8 MiB
    assert c.reqbufs(s, 8).count == 4
    b, _ = c.querybuf(s, 0)
    status, addr, _ = c.mmap(s, b.m.offset)
    assert status == 0
    c.reqbufs(s, 0)                          # freed, but buffer 0 is still mapped
    assert rig.dev.shm.used > 0
    assert c.reqbufs(s, 8).count == 3        # its block is not reused
    assert c.munmap(addr) == 0
    c.reqbufs(s, 0)
    assert rig.dev.shm.used == 0 and rig.discarded
    rig.close()


def test_no_region_means_no_mmap_but_userptr_works():
    rig = Rig(shm=0)
    c = rig.client
    s = c.open()
    with pytest.raises(IoctlFailed) as e:
        c.reqbufs(s, 2)
    assert e.value.status == errno.EINVAL
    r = c.reqbufs(s, 2, memory=v4l2.MEMORY_USERPTR)
    assert r.count == 2 and not r.capabilities & v4l2.BUF_CAP_SUPPORTS_MMAP
    rig.close()


def test_reset_stops_capture_and_forgets_sessions(rig):
    c = rig.client
    s = c.open()
    c.reqbufs(s, 2)
    c.qbuf(s, 0)
    c.qbuf(s, 1)
    c.stream(s, True)
    rig.handle.reset(rig.dev)
    assert rig.dev.sessions == {} and rig.dev.kind.pacer is None
    assert rig.dev.shm.used == 0
    assert c.raw_ioctl(s, 4, bytes(v4l2.Format(type=CAP)), 208)[0] == errno.EINVAL


def test_bad_config_is_one_line():
    with pytest.raises(ConfigError, match="camera.sizes"):
        Rig({"camera": {"sizes": ["big"]}})
    with pytest.raises(ConfigError, match="role must be"):
        MediaDevice(FakeHandle(), {}, role="printer")
    with pytest.raises(ConfigError, match="cannot import"):
        Rig({"camera": {"source": "nosuch.module:Thing"}})


def test_file_source_loops_the_clip_converted_to_the_guest_format(tmp_path):
    import av
    path = str(tmp_path / "clip.mp4")
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((240, 320, 3), 40 * i, np.uint8),
                                               format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with av.open(path) as container:
        clip = [f.reformat(width=640, height=480, format="yuyv422").to_ndarray().tobytes()
                for f in container.decode(video=0)]
    assert len(clip) == 5
    rig = Rig({"camera": {"source": "file", "path": path}})
    start_capture(rig, "YUYV", 640, 480, 8)
    events = rig.events(8)
    assert [rig.image(e) for e in events] == [clip[i % 5] for i in range(8)]
    assert len({e.buffer.sequence for e in events}) == 8
    rig.close()
    with pytest.raises(ConfigError, match="camera.path"):
        Rig({"camera": {"source": "file"}})


def test_what_v4l2_compliance_checks_of_buffers(rig):
    """CREATE_BUFS clears cache-hint flags and says ENOBUFS past the maximum;
    REQBUFS frees buffers still queued once streaming is off; a prepared
    USERPTR buffer's QBUF answers with the prepared pointer and length."""
    c = rig.client
    s = c.open()
    cb = v4l2.CreateBuffers(count=1, memory=v4l2.MEMORY_MMAP, flags=1)
    cb.format = c.ioctl(s, "g_fmt", v4l2.Format(type=CAP))[0]
    cb.format.fmt.pix.sizeimage = 0
    assert c.status(s, "create_bufs", cb) == errno.EINVAL      # too small for the format
    cb.format = c.ioctl(s, "g_fmt", v4l2.Format(type=CAP))[0]
    out = c.ioctl(s, "create_bufs", cb)[0]
    assert out.flags == 0 and out.count == 1 and out.max_num_buffers == 32
    cb.count = 31
    assert c.ioctl(s, "create_bufs", cb)[0].count == 31
    cb.count = 1
    assert c.status(s, "create_bufs", cb) == errno.ENOBUFS
    c.qbuf(s, 0)
    c.stream(s, False)
    assert c.reqbufs(s, 2).count == 2
    size = 640 * 480 * 2
    c.reqbufs(s, 2, memory=v4l2.MEMORY_USERPTR)
    b, _ = c.buffer(0, memory=v4l2.MEMORY_USERPTR)
    b.m.userptr, b.length = 0x7f0000000000, size
    c.ioctl(s, "prepare_buf", b, sg=p.SG_ENTRY.pack(0x100000, size, 0))
    assert c.status(s, "prepare_buf", b) == errno.EINVAL       # prepared already
    b.m.userptr, b.length = 0, 0
    out = c.ioctl(s, "qbuf", b)[0]
    assert (out.m.userptr, out.length) == (0x7f0000000000, size)
    assert out.flags & (v4l2.BUF_FLAG_QUEUED | v4l2.BUF_FLAG_PREPARED) == v4l2.BUF_FLAG_QUEUED


def test_class_controls_are_write_only_and_send_no_initial_event(rig):
    c = rig.client
    s = c.open()
    user_class = v4l2.CTRL_CLASS_USER | 1
    ctrl = v4l2.ExtControl(id=user_class)
    status, out = c.raw_ioctl(s, 71, bytes(v4l2.ExtControls(count=1)), 52, bytes(ctrl))
    assert status == errno.EACCES and v4l2.ExtControls.parse(out).error_idx == 1
    sub = v4l2.EventSubscription(type=v4l2.EVENT_CTRL, id=user_class,
                                 flags=v4l2.EVENT_SUB_FL_SEND_INITIAL)
    c.ioctl(s, "subscribe_event", sub)
    assert rig.events(1, timeout=0.2) == []
    sub.id = v4l2.CID_SATURATION
    c.ioctl(s, "subscribe_event", sub)
    (event,) = rig.events(1)
    assert event.v4l2_event.id == v4l2.CID_SATURATION


def test_a_host_camera_that_is_not_there_fails_streamon_with_eio_said_once(caplog):
    rig = Rig({"camera": {"source": "v4l2", "device": "/dev/no-such-camera"}})
    c = rig.client
    s = c.open()
    c.reqbufs(s, 2)
    c.qbuf(s, 0)
    for _ in range(2):
        t = v4l2.Int(value=CAP)
        assert c.status(s, "streamon", t) == errno.EIO
    assert sum("cannot start" in r.message for r in caplog.records) == 1
    assert c.ioctl(s, "g_fmt", v4l2.Format(type=CAP))[0].fmt.pix.width == 640
    rig.close()
