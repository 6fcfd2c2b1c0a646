"""virtio-media-py's decoder node in process (pure-Python tier): the stateful
decoder interface of dev-decoder.rst over the model, with stand-ins for
QEMU's requests, guest RAM and region 0, on the PyAV engine virtio-video-py
uses; pictures compared with PyAV decoding the same stream directly."""

from __future__ import annotations

import errno
import threading
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest

from pyemb.config import ConfigError
from pyemb.media import decoder as dec
from pyemb.media import protocol as p
from pyemb.media import v4l2
from pyemb.media.formats import NV12, YU12, ImageFormat
from pyemb.video.protocol import BufferFlag, Format
from pyemb.video_backend import DecodeError, DecodeSession, Picture, PyAVBackend
from tests.media_client import IoctlFailed, parse_event
from tests.media_rig import Rig
from tests.streams import encode, reference, shared_dir, split_frames

OUT = v4l2.BUF_TYPE_VIDEO_OUTPUT_MPLANE
CAP = v4l2.BUF_TYPE_VIDEO_CAPTURE_MPLANE
MMAP, USERPTR = v4l2.MEMORY_MMAP, v4l2.MEMORY_USERPTR
CROSVM = shared_dir() / "vectors" / "crosvm-test-25fps"
STEP_US = 40_000                   # record i is queued with timestamp i * STEP_US
PAGE = 4096


def crosvm() -> tuple[list[bytes], list[int]]:
    records = split_frames((CROSVM / "test-25fps.h264").read_bytes())
    crcs = [int(c, 16) for c in (CROSVM / "test-25fps.crc").read_text().split()]
    return records, crcs


def visible_crc(data: bytes, fmt: ImageFormat, width: int, height: int) -> int:
    """CRC-32 of the visible picture packed without padding, read from a
    buffer in V4L2's one-plane layout (what guest/v4l2_decode.c prints)."""
    a = np.frombuffer(data, np.uint8)
    cw, ch = (width + 1) // 2, (height + 1) // 2
    if fmt.fourcc == NV12:
        shapes = [(height, width), (ch, 2 * cw)]
    else:
        shapes = [(height, width), (ch, cw), (ch, cw)]
    out = b""
    for (offset, stride), (rows, row_bytes) in zip(fmt.layout(), shapes, strict=True):
        plane = a[offset:offset + stride * rows].reshape(rows, stride)
        out += plane[:, :row_bytes].tobytes()
    return zlib.crc32(out)


@dataclass
class Shot:
    """One CAPTURE buffer that came back."""

    index: int
    flags: int
    bytesused: int
    timestamp_us: int
    sequence: int
    crc: int | None
    size: tuple[int, int]


@dataclass
class Guest:
    """A V4L2 client of one decoder session, as dev-decoder.rst has it:
    S_FMT(OUTPUT), OUTPUT buffers, SOURCE_CHANGE -> capture setup, decode,
    resolution changes, drain.  It works the event queue itself, like the
    guest driver does for DQBUF and DQEVENT."""

    rig: Rig
    codec: str = "H264"
    hint: tuple[int, int] = (0, 0)
    raw: str = "NV12"
    out_count: int = 4
    cap_count: int = 0             # 0: the decoder's minimum + 3
    cap_memory: int = MMAP
    out_memory: int = MMAP
    userptr_base: int = 0x100000    # guest RAM for USERPTR buffers
    session: int = 0
    out_free: list[int] = field(default_factory=list)
    out_done: list = field(default_factory=list)     # (index, flags, timestamp) in order
    shots: list[Shot] = field(default_factory=list)
    events: list = field(default_factory=list)        # (type, changes) of V4L2 events
    log: list[str] = field(default_factory=list)      # "E<type>", "C<index>", "O<index>"
    fmt: ImageFormat | None = None
    visible: tuple[int, int] = (0, 0)
    cap_streaming: bool = False
    last_seen: bool = False
    eos: bool = False
    pending_change: bool = False
    changes: int = 0                  # SOURCE_CHANGE events seen
    out_lengths: list[int] = field(default_factory=list)
    # What the device holds: a DQBUF of another buffer was raised before a
    # STREAMOFF that took it back, and is ignored (see the report on
    # completions that reach the used ring after a command's reply).
    out_queued: set[int] = field(default_factory=set)
    cap_queued: set[int] = field(default_factory=set)
    stale: int = 0
    hold_capture: bool = False        # CAPTURE buffers are not queued again
    cap_pages: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    offsets: dict[int, int] = field(default_factory=dict)
    other_events: list = field(default_factory=list)  # for other sessions

    def __post_init__(self) -> None:
        c = self.rig.client
        self.session = c.open()
        for kind in (v4l2.EVENT_SOURCE_CHANGE, v4l2.EVENT_EOS):
            c.ioctl(self.session, "subscribe_event", v4l2.EventSubscription(type=kind))
        f = c.s_fmt(self.session, self.codec, *self.hint, buf_type=OUT)
        assert f.fmt.pix_mp.pixelformat == v4l2.fourcc(self.codec)
        r = c.reqbufs(self.session, self.out_count, OUT, self.out_memory)
        self.out_count = r.count
        self.out_free = list(range(r.count))
        size = f.fmt.pix_mp.plane_fmt[0].sizeimage
        for i in range(r.count):
            if self.out_memory == MMAP:
                b, planes = c.querybuf(self.session, i, OUT)
                self.offsets[("out", i)] = planes[0].m.mem_offset
                assert planes[0].length >= size
            self.out_lengths.append(size)
        c.stream(self.session, True, OUT)

    # -- OUTPUT -------------------------------------------------------------------------
    def queue(self, data: bytes, timestamp_us: int) -> None:
        index = self.out_free.pop(0)
        c = self.rig.client
        if self.out_memory == MMAP:
            offset = self.offsets[("out", index)]
            self.rig.handle.shared_memory[offset:offset + len(data)] = data
            c.qbuf(self.session, index, OUT, bytesused=len(data), timestamp_us=timestamp_us)
        else:
            base = self.userptr_base + 0x400000 + index * (2 << 20)
            self.rig.handle.ram[base:base + len(data)] = data
            length = self.out_lengths[index]
            c.qbuf(self.session, index, OUT, USERPTR, bytesused=len(data),
                   timestamp_us=timestamp_us, userptr=0x7000_0000 + base, length=length,
                   sg=p.SG_ENTRY.pack(base, length, 0))
        self.out_queued.add(index)
        self.log.append(f"Q{index}")

    # -- CAPTURE --------------------------------------------------------------------------
    def read_format(self) -> None:
        c = self.rig.client
        f = c.ioctl(self.session, "g_fmt", v4l2.Format(type=CAP))[0]
        mp = f.fmt.pix_mp
        self.fmt = ImageFormat(mp.pixelformat, mp.width, mp.height)
        assert mp.num_planes == 1
        assert mp.plane_fmt[0].bytesperline == mp.width
        assert mp.plane_fmt[0].sizeimage == self.fmt.sizeimage
        sel = v4l2.Selection(type=v4l2.BUF_TYPE_VIDEO_CAPTURE, target=v4l2.SEL_TGT_COMPOSE)
        r = c.ioctl(self.session, "g_selection", sel)[0].r
        assert (r.left, r.top) == (0, 0) and r.width <= mp.width and r.height <= mp.height
        self.visible = (r.width, r.height)

    def setup_capture(self) -> None:
        c = self.rig.client
        f = c.ioctl(self.session, "g_fmt", v4l2.Format(type=CAP))[0]
        f.fmt.pix_mp.pixelformat = v4l2.fourcc(self.raw)
        c.ioctl(self.session, "s_fmt", f)
        self.read_format()
        minimum = c.ioctl(self.session, "g_ctrl",
                          v4l2.Control(id=v4l2.CID_MIN_BUFFERS_FOR_CAPTURE))[0].value
        count = self.cap_count or minimum + 3
        r = c.reqbufs(self.session, count, CAP, self.cap_memory)
        assert r.count >= max(minimum, 1)
        self.cap_count = r.count
        for i in range(0 if self.hold_capture else r.count):
            self.queue_capture(i)
        c.stream(self.session, True, CAP)
        self.cap_streaming = True
        self.last_seen = False

    def queue_capture(self, index: int) -> None:
        c = self.rig.client
        assert self.fmt is not None
        self.cap_queued.add(index)
        if self.cap_memory == MMAP:
            b, planes = c.querybuf(self.session, index, CAP)
            self.offsets[("cap", index)] = planes[0].m.mem_offset
            c.qbuf(self.session, index, CAP)
            return
        # USERPTR over pages in reverse order, the first starting mid-page.
        size = self.fmt.sizeimage
        base = self.userptr_base + index * (size + 3 * PAGE) // PAGE * PAGE
        count = (size + 100 + PAGE - 1) // PAGE + 1
        pages = [(base + PAGE * (count - 1 - i), PAGE) for i in range(count)]
        pages[0] = (pages[0][0] + 100, PAGE - 100)
        self.cap_pages[index] = pages
        sg = b"".join(p.SG_ENTRY.pack(a, n, 0) for a, n in pages)
        c.qbuf(self.session, index, CAP, USERPTR, userptr=0x7f00_0000_0000 + index * (1 << 24),
               length=size, sg=sg)

    def picture_bytes(self, index: int, bytesused: int) -> bytes:
        if self.cap_memory == MMAP:
            offset = self.offsets[("cap", index)]
            return bytes(self.rig.handle.shared_memory[offset:offset + bytesused])
        ram = self.rig.handle.ram
        return b"".join(bytes(ram[a:a + n]) for a, n in self.cap_pages[index])[:bytesused]

    def reconfigure(self) -> None:
        c = self.rig.client
        c.stream(self.session, False, CAP)
        self.cap_queued.clear()
        c.reqbufs(self.session, 0, CAP, self.cap_memory)
        self.cap_streaming = False
        self.pending_change = False
        self.setup_capture()

    def fits(self) -> bool:
        """Whether the buffers in use take the format G_FMT(CAPTURE) says now
        (Capture Setup step 6: then decoding resumes at once)."""
        c = self.rig.client
        mp = c.ioctl(self.session, "g_fmt", v4l2.Format(type=CAP))[0].fmt.pix_mp
        assert self.fmt is not None
        return (mp.pixelformat == self.fmt.fourcc
                and mp.plane_fmt[0].sizeimage <= self.fmt.sizeimage)

    # -- events -----------------------------------------------------------------------
    def handle(self, events) -> None:
        """Act on events as the driver and the client do."""
        for e in events:
            if e.session != self.session:
                self.other_events.append(e)
                continue
            if e.kind == p.Evt.EVENT:
                ev = e.v4l2_event
                self.events.append((ev.type, ev.u.changes))
                self.log.append(f"E{ev.type}")
                if ev.type == v4l2.EVENT_EOS:
                    self.eos = True
                elif ev.type == v4l2.EVENT_SOURCE_CHANGE:
                    assert ev.u.changes == v4l2.EVENT_SRC_CH_RESOLUTION
                    self.changes += 1
                    if not self.cap_streaming:
                        self.setup_capture()
                    elif self.last_seen:
                        self.reconfigure()
                    elif self.changes == 1 and self.fits():
                        # Buffers set up from the size hint take the stream.
                        self.read_format()
                        cmd = v4l2.DecoderCmd(cmd=v4l2.DEC_CMD_START)
                        status = self.rig.client.status(self.session, "decoder_cmd", cmd)
                        assert status in (0, errno.EBUSY)    # EBUSY: a drain goes on
                    else:
                        self.pending_change = True
            elif e.kind == p.Evt.DQBUF:
                b = e.buffer
                plane = e.planes[0]
                queued = self.out_queued if b.type == OUT else self.cap_queued
                if b.index not in queued:
                    self.stale += 1
                    continue
                queued.discard(b.index)
                if b.type == OUT:
                    self.out_free.append(b.index)
                    self.out_done.append((b.index, b.flags, b.timestamp.tv_sec * 1_000_000
                                          + b.timestamp.tv_usec))
                    self.log.append(f"O{b.index}")
                    continue
                assert b.type == CAP
                self.on_capture(b, plane)
            else:
                raise AssertionError(f"session error event {e.body[:8].hex()}")

    def on_capture(self, b: v4l2.Buffer, plane: v4l2.Plane) -> None:
        assert self.fmt is not None
        self.log.append(f"C{b.index}")
        crc = None
        if plane.bytesused and not b.flags & v4l2.BUF_FLAG_ERROR:
            assert plane.bytesused == self.fmt.sizeimage
            crc = visible_crc(self.picture_bytes(b.index, plane.bytesused), self.fmt,
                              *self.visible)
        self.shots.append(Shot(b.index, b.flags, plane.bytesused,
                               b.timestamp.tv_sec * 1_000_000 + b.timestamp.tv_usec,
                               b.sequence, crc, self.visible))
        assert b.flags & v4l2.BUF_FLAG_TIMESTAMP_COPY
        if b.flags & v4l2.BUF_FLAG_LAST:
            self.last_seen = True
            if self.pending_change:
                self.reconfigure()
            return
        if not self.hold_capture:
            self.queue_capture(b.index)

    # -- whole runs ---------------------------------------------------------------------
    def step(self) -> None:
        self.handle(self.rig.poll())

    def feed(self, records: list[bytes], start_us: int = 0, until=None,
             timeout: float = 10.0) -> None:
        """Queue every record (record i at start_us + i * STEP_US) as OUTPUT
        buffers come back; ``until()`` may stop it early."""
        deadline = time.monotonic() + timeout
        i = 0
        while i < len(records):
            if until is not None and until():
                return
            while self.out_free and i < len(records):
                self.queue(records[i], start_us + i * STEP_US)
                i += 1
            self.step()
            assert time.monotonic() < deadline, f"stuck after {i} records: {self.log[-20:]}"
            time.sleep(0.001)

    def wait(self, condition, what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self.step()
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.log[-20:]}"
            time.sleep(0.001)

    def drain(self, timeout: float = 10.0) -> None:
        """V4L2_DEC_CMD_STOP once every OUTPUT buffer is back, then dequeue
        up to the LAST buffer and the EOS event."""
        self.wait(lambda: len(self.out_free) == self.out_count, "OUTPUT buffers", timeout)
        self.wait(lambda: self.cap_streaming, "the capture setup", timeout)
        self.last_seen = self.eos = False
        cmd = v4l2.DecoderCmd(cmd=v4l2.DEC_CMD_STOP)
        self.rig.client.ioctl(self.session, "decoder_cmd", cmd)
        self.wait(lambda: self.eos and self.last_seen and not self.pending_change,
                  "LAST and EOS", timeout)

    def decode(self, records: list[bytes], start_us: int = 0) -> list[Shot]:
        self.feed(records, start_us)
        self.drain()
        return self.pictures()

    def pictures(self) -> list[Shot]:
        return [s for s in self.shots if s.bytesused]

    def close(self) -> None:
        self.rig.client.close(self.session)


@pytest.fixture
def rig():
    r = Rig(role="decoder", config={"backend": {"threads": 1}})
    yield r
    r.close()


def ns_of(shots: list[Shot]) -> list[int]:
    return [s.timestamp_us for s in shots]


# -- the conformance vector -------------------------------------------------------------
def test_crosvm_vector_is_bit_exact_with_timestamps_sequence_last_and_eos(rig):
    records, crcs = crosvm()
    g = Guest(rig, hint=(0, 0))
    shots = g.decode(records)
    assert [s.crc for s in shots] == crcs                       # all 250, in order
    # Each record is one frame: every timestamp comes back once (display order).
    assert sorted(ns_of(shots)) == [i * STEP_US for i in range(250)]
    assert [s.sequence for s in shots] == list(range(250))
    assert shots[0].flags & v4l2.BUF_FLAG_KEYFRAME
    assert all(s.flags & v4l2.BUF_FLAG_TIMESTAMP_COPY for s in g.shots)
    # LAST once, on the last CAPTURE buffer (the final picture, or an empty one).
    assert [s.flags & v4l2.BUF_FLAG_LAST != 0 for s in g.shots] == \
        [False] * (len(g.shots) - 1) + [True]
    assert g.events[0] == (v4l2.EVENT_SOURCE_CHANGE, v4l2.EVENT_SRC_CH_RESOLUTION)
    assert g.events.count((v4l2.EVENT_SOURCE_CHANGE, 1)) == 1
    assert g.events[-1][0] == v4l2.EVENT_EOS
    # EOS comes after the LAST buffer.
    assert g.log.index(f"E{v4l2.EVENT_EOS}") > g.log.index(f"C{g.shots[-1].index}")
    # Every OUTPUT buffer came back, in order, none with ERROR, timestamps as queued.
    assert [t for _, _, t in g.out_done] == [i * STEP_US for i in range(250)]
    assert not any(f & v4l2.BUF_FLAG_ERROR for _, f, _ in g.out_done)
    assert g.fmt == ImageFormat(NV12, 320, 240) and g.visible == (320, 240)


def test_bitstream_cut_anywhere_and_userptr_buffers_on_both_queues(rig):
    """CONTINUOUS_BYTESTREAM: OUTPUT buffers that do not follow frames; a
    picture gets the timestamp of the buffer its first byte was in."""
    records, crcs = crosvm()
    data = b"".join(records)
    chunks = [data[i:i + 3001] for i in range(0, len(data), 3001)]
    g = Guest(rig, cap_memory=USERPTR, out_memory=USERPTR, out_count=3)
    shots = g.decode(chunks)
    assert [s.crc for s in shots] == crcs
    starts = np.cumsum([0] + [len(r) for r in records])[:-1]
    expected = sorted((int(s) // 3001) * STEP_US for s in starts)
    assert sorted(ns_of(shots)) == expected
    assert rig.handle.mappings                  # the CAPTURE buffers still queued
    rig.client.stream(g.session, False, CAP)
    assert not rig.handle.mappings              # every USERPTR buffer unmapped once back
    f = rig.client.ioctl(g.session, "enum_fmt", v4l2.Fmtdesc(index=0, type=OUT))[0]
    assert f.flags & v4l2.FMT_FLAG_CONTINUOUS_BYTESTREAM


def test_yu12_odd_size_is_cropped_from_an_aligned_coded_size(rig):
    packets = [d for d, _ in encode("h264", 94, 50, 12)]
    g = Guest(rig, raw="YU12", hint=(94, 50))
    shots = g.decode(packets)
    assert g.fmt == ImageFormat(YU12, 96, 64) and g.visible == (94, 50)
    assert [s.crc for s in shots] == reference("h264", packets, Format.YUV420)
    sel = rig.client.ioctl(g.session, "g_selection",
                           v4l2.Selection(type=CAP, target=v4l2.SEL_TGT_CROP_BOUNDS))[0]
    assert (sel.r.width, sel.r.height) == (96, 64)


@pytest.mark.parametrize("codec,fourcc", [("hevc", "HEVC"), ("vp9", "VP90"), ("mpeg2", "MPG2")])
def test_other_coded_formats(rig, codec, fourcc):
    packets = [d for d, _ in encode(codec, 128, 96, 8)]
    g = Guest(rig, codec=fourcc, hint=(128, 96))
    assert [s.crc for s in g.decode(packets)] == reference(codec, packets)


# -- sequences ------------------------------------------------------------------------------
def test_drain_midway_then_start_resumes_and_drains_again(rig):
    packets = [d for d, _ in encode("h264", 128, 96, 24, bframes=0)]   # IDR every 12
    g = Guest(rig)
    first = g.decode(packets[:12])
    assert [s.crc for s in first] == reference("h264", packets[:12])
    assert g.shots[-1].flags & v4l2.BUF_FLAG_LAST
    c = rig.client
    # Drained and stopped: STOP again does nothing (no second LAST or EOS).
    c.ioctl(g.session, "decoder_cmd", v4l2.DecoderCmd(cmd=v4l2.DEC_CMD_STOP))
    # Stopped: a queued OUTPUT buffer is accepted but not decoded.
    g.queue(packets[12], 12 * STEP_US)
    time.sleep(0.05)
    g.step()
    assert len(g.out_free) == g.out_count - 1
    # TRY takes START and STOP (flags zeroed), nothing else.
    t = c.ioctl(g.session, "try_decoder_cmd", v4l2.DecoderCmd(cmd=v4l2.DEC_CMD_STOP, flags=3))[0]
    assert t.flags == 0
    for cmd in (v4l2.DEC_CMD_PAUSE, v4l2.DEC_CMD_RESUME, 9):
        assert c.status(g.session, "try_decoder_cmd", v4l2.DecoderCmd(cmd=cmd)) == errno.EINVAL
    c.ioctl(g.session, "decoder_cmd", v4l2.DecoderCmd(cmd=v4l2.DEC_CMD_START))
    g.last_seen = False
    g.feed(packets[13:], start_us=13 * STEP_US)
    g.drain()
    second = g.pictures()[12:]
    assert [s.crc for s in second] == reference("h264", packets[12:])
    assert sorted(ns_of(second)) == [i * STEP_US for i in range(12, 24)]
    assert [e for e, _ in g.events].count(v4l2.EVENT_EOS) == 2


def test_stop_while_draining_is_ebusy_and_streamoff_capture_ends_the_drain_not_the_pictures(rig):
    c = rig.client
    idle = c.open()
    c.s_fmt(idle, "H264", 0, 0, buf_type=OUT)
    c.ioctl(idle, "decoder_cmd", v4l2.DecoderCmd(cmd=v4l2.DEC_CMD_STOP))   # nothing to drain
    c.ioctl(idle, "decoder_cmd", v4l2.DecoderCmd(cmd=v4l2.DEC_CMD_STOP))
    packets = [d for d, _ in encode("h264", 128, 96, 6)]
    g = Guest(rig, hold_capture=True)       # CAPTURE streams, no buffer queued
    g.feed(packets)
    g.wait(lambda: g.cap_streaming, "the capture setup")
    c.ioctl(g.session, "decoder_cmd", v4l2.DecoderCmd(cmd=v4l2.DEC_CMD_STOP))
    for cmd in (v4l2.DEC_CMD_STOP, v4l2.DEC_CMD_START):
        assert c.status(g.session, "decoder_cmd", v4l2.DecoderCmd(cmd=cmd)) == errno.EBUSY
    # STREAMOFF(CAPTURE) gives the drain up; the pictures decoded stay.
    c.stream(g.session, False, CAP)
    c.stream(g.session, True, CAP)
    g.hold_capture = False
    for i in range(g.cap_count):
        g.queue_capture(i)
    g.wait(lambda: len(g.pictures()) >= 3, "pictures")
    time.sleep(0.05)
    g.step()
    assert not g.last_seen and not g.eos
    g.drain()                               # a new STOP
    assert [s.crc for s in g.pictures()] == reference("h264", packets)
    assert [e for e, _ in g.events].count(v4l2.EVENT_EOS) == 1
    assert sum(1 for s in g.shots if s.flags & v4l2.BUF_FLAG_LAST) == 1
    assert all(e.session != idle for e in rig.posted)


def test_stop_right_after_the_last_qbuf_decodes_every_buffer_queued_before_it(rig):
    packets = [d for d, _ in encode("h264", 128, 96, 12)]
    g = Guest(rig, out_count=12, hint=(128, 96))
    g.setup_capture()
    for i, packet in enumerate(packets):
        g.queue(packet, i * STEP_US)
    rig.client.ioctl(g.session, "decoder_cmd", v4l2.DecoderCmd(cmd=v4l2.DEC_CMD_STOP))
    g.wait(lambda: g.eos and g.last_seen, "LAST and EOS")
    assert [s.crc for s in g.pictures()] == reference("h264", packets)
    assert g.shots[-1].flags & v4l2.BUF_FLAG_LAST and len(g.out_done) == 12


@pytest.mark.parametrize("cap_count", [0, 1], ids=["min+3", "one"])
def test_the_drain_ends_with_an_empty_last_buffer_after_every_picture(rig, cap_count):
    """LAST is never on the drain's last picture but on an empty CAPTURE
    buffer after it (as crosvm's virtio-media decoder does).  After a
    picture marked LAST, GStreamer 1.22's v4l2 decoders poll() for the
    EPIPE that ends their drain; vb2 answers EPOLLIN there, the upstream
    virtio-media driver (virtio_media_device_poll) never wakes while other
    CAPTURE buffers are queued, and gst-launch hung at EOS.  An empty
    CAPTURE buffer is their EOS, and DQBUF finds it without that wake-up."""
    packets = [d for d, _ in encode("h264", 128, 96, 12)]
    g = Guest(rig, hint=(128, 96), cap_count=cap_count)
    assert [s.crc for s in g.decode(packets)] == reference("h264", packets)
    last = g.shots[-1]
    assert last.flags & v4l2.BUF_FLAG_LAST and last.bytesused == 0
    assert not last.flags & v4l2.BUF_FLAG_ERROR
    assert not any(s.flags & v4l2.BUF_FLAG_LAST for s in g.shots[:-1])
    assert [s.sequence for s in g.pictures()] == list(range(12))
    # EOS after the LAST buffer, which came after the last picture.
    log = g.log
    assert log.index(f"E{v4l2.EVENT_EOS}") > len(log) - 1 - log[::-1].index(f"C{last.index}")
    # After START, a drain of one record (its picture comes out at the flush).
    c = rig.client
    c.ioctl(g.session, "decoder_cmd", v4l2.DecoderCmd(cmd=v4l2.DEC_CMD_START))
    g.queue_capture(last.index)             # the client takes the LAST buffer back
    g.feed(packets[:1], start_us=50 * STEP_US)
    g.drain()
    assert len(g.pictures()) == 13 and not g.pictures()[-1].flags & v4l2.BUF_FLAG_LAST
    assert g.shots[-1].bytesused == 0 and g.shots[-1].flags & v4l2.BUF_FLAG_LAST
    assert [e for e, _ in g.events].count(v4l2.EVENT_EOS) == 2


def test_pictures_waiting_for_buffers_are_bounded_and_a_seek_drops_them():
    rig = scripted_rig()
    g = Guest(rig, hint=(16, 16), out_count=8, hold_capture=True)
    g.setup_capture()                       # streaming, but no CAPTURE buffer queued
    for i in range(8):
        g.queue(bytes([i]), i * STEP_US)
    session = rig.dev.sessions[g.session]
    g.wait(lambda: len(session.pictures) == dec.PICTURE_BACKLOG, "the backlog")
    time.sleep(0.05)
    g.step()
    # The worker stopped decoding: the chunk of the last picture waits to be
    # gone through, the other OUTPUT buffers to be taken.
    assert len(session.pictures) == dec.PICTURE_BACKLOG
    assert len(g.out_done) == dec.PICTURE_BACKLOG - 1
    seek(g)
    assert not session.pictures
    g.hold_capture = False
    for i in range(g.cap_count):
        g.queue_capture(i)
    shots = g.decode([b"\x60", b"\x70"], start_us=10 * STEP_US)
    assert [s.timestamp_us for s in shots] == [10 * STEP_US, 11 * STEP_US]
    rig.close()


def output_events_since(rig: Rig, session: int, mark: int) -> list:
    return [e for e in rig.posted[mark:] if e.session == session and e.kind == p.Evt.DQBUF
            and e.buffer.type == OUT]


def seek(g: Guest) -> None:
    """STREAMOFF + STREAMON(OUTPUT): the buffers queued come back without
    events; nothing is queued again yet."""
    rig, c = g.rig, g.rig.client
    c.stream(g.session, False, OUT)
    mark = len(rig.posted)
    g.handle(rig.poll(before=rig.reply_at))      # what the driver had before the reply
    g.out_queued.clear()                        # ... and then cleared
    g.out_free = list(range(g.out_count))
    c.stream(g.session, True, OUT)
    time.sleep(0.05)
    assert output_events_since(rig, g.session, mark) == []
    g.step()
    # Every OUTPUT buffer done before the STREAMOFF was on the used ring
    # before its answer: none comes back after it.
    assert g.stale == 0


def test_seek_to_the_start_drops_what_was_queued_and_pictures_resume(rig):
    records, crcs = crosvm()
    g = Guest(rig)
    g.feed(records[:60], until=lambda: len(g.pictures()) >= 10)
    seek(g)
    seek_us = 10_000_000
    shots = [s for s in g.decode(records, start_us=seek_us)]
    old = [s for s in shots if s.timestamp_us < seek_us]
    new = [s for s in shots if s.timestamp_us >= seek_us]
    assert [s.crc for s in old] == crcs[:len(old)]     # pictures of before: in order
    assert shots[:len(old)] == old                     # ... and all before the new ones
    assert [s.crc for s in new] == crcs
    assert sorted(ns_of(new)) == [seek_us + i * STEP_US for i in range(250)]


def test_seek_to_a_keyframe_midway(rig):
    packets = [d for d, _ in encode("h264", 128, 96, 36, bframes=0, repeat_headers=True)]
    g = Guest(rig)
    g.feed(packets[:16])
    seek(g)
    shots = g.decode(packets[24:], start_us=24 * STEP_US)
    after = [s for s in shots if s.timestamp_us >= 24 * STEP_US]
    assert [s.crc for s in after] == reference("h264", packets[24:])
    assert all(s.timestamp_us < 16 * STEP_US for s in shots[:len(shots) - len(after)])


def test_resolution_change_midway_ends_old_pictures_with_last_then_source_change(rig):
    first = [d for d, _ in encode("h264", 160, 96, 8)]
    second = [d for d, _ in encode("h264", 128, 144, 8, start=8)]
    g = Guest(rig)
    shots = g.decode(first + second)
    assert [s.size for s in shots] == [(160, 96)] * 8 + [(128, 144)] * 8
    assert [s.crc for s in shots] == reference("h264", first + second)
    changes = [i for i, e in enumerate(g.log) if e == f"E{v4l2.EVENT_SOURCE_CHANGE}"]
    assert len(changes) == 2
    # Between them: the old pictures, the last one (or an empty buffer after
    # it) marked LAST; then the event; no new picture before the new buffers.
    last = [s for s in g.shots if s.flags & v4l2.BUF_FLAG_LAST]
    assert len(last) == 2 and last[0].size == (160, 96)
    assert last[0].bytesused in (0, ImageFormat(NV12, 160, 96).sizeimage)
    old = [s for s in g.shots[:g.shots.index(last[0]) + 1] if s.bytesused]
    assert len(old) == 8
    assert g.fmt == ImageFormat(NV12, 128, 144)
    assert [s.sequence for s in shots[8:]] == list(range(8))   # counted anew


def test_first_size_that_fits_buffers_made_for_the_hint_needs_no_restart(rig):
    """A client that named the right size and set CAPTURE up early gets the
    SOURCE_CHANGE but no LAST: the pictures flow into its buffers."""
    packets = [d for d, _ in encode("h264", 128, 96, 10)]
    g = Guest(rig, hint=(128, 96))
    g.setup_capture()                         # before any bitstream
    shots = g.decode(packets)
    assert [s.crc for s in shots] == reference("h264", packets)
    assert g.events[0] == (v4l2.EVENT_SOURCE_CHANGE, v4l2.EVENT_SRC_CH_RESOLUTION)
    assert sum(1 for s in g.shots if s.flags & v4l2.BUF_FLAG_LAST) == 1     # the drain's


def test_early_capture_of_the_wrong_size_gets_an_empty_last_buffer_first(rig):
    packets = [d for d, _ in encode("h264", 128, 96, 10)]
    g = Guest(rig, hint=(320, 240))
    g.setup_capture()
    shots = g.decode(packets)
    assert [s.crc for s in shots] == reference("h264", packets)
    assert g.shots[0].flags & v4l2.BUF_FLAG_LAST and g.shots[0].bytesused == 0
    assert g.fmt == ImageFormat(NV12, 128, 96)


# -- errors ---------------------------------------------------------------------------------
def test_corrupt_bitstream_marks_an_output_buffer_error_and_the_stream_goes_on(rig):
    records, crcs = crosvm()
    broken = list(records)
    broken[5] = b"\0\0\1\x65" + b"\xff" * 3000           # a slice of garbage
    g = Guest(rig)
    shots = g.decode(broken)
    errors = [i for i, (_, f, _) in enumerate(g.out_done) if f & v4l2.BUF_FLAG_ERROR]
    assert errors and errors[0] >= 5
    assert len(shots) >= 240
    # Pictures before the damage are intact, and so are those of later records.
    assert [s.crc for s in shots[:5]] == crcs[:5]
    assert shots[-1].timestamp_us == 249 * STEP_US or shots[-2].timestamp_us == 249 * STEP_US


class ScriptedSession(DecodeSession):
    """One 16x16 picture per chunk (luma = the chunk's first byte); a chunk
    starting with 0xEE fails to decode, one starting with 0xDD is an engine
    bug, one with 0xCC waits at ``gate`` inside the picture copy."""

    gate: threading.Event | None = None
    entered = threading.Event()

    def decode(self, data: bytes, timestamp: int) -> list[Picture]:
        if data[:1] == b"\xee":
            raise DecodeError("scripted")
        if data[:1] == b"\xdd":
            raise RuntimeError("scripted engine bug")
        side = 16 * (data[1] if len(data) > 1 else 1)
        return [GrayPicture(side, side, timestamp, BufferFlag.IFRAME, data[0])]

    def flush(self) -> list[Picture]:
        return []


class GrayPicture(Picture):
    def planes(self, fmt: int) -> list[np.ndarray]:
        if self.frame == 0xCC and ScriptedSession.gate is not None:
            ScriptedSession.entered.set()
            ScriptedSession.gate.wait(10)
        w, h = self.width, self.height
        chroma = (h // 2, w) if fmt == Format.NV12 else (h // 2, w // 2)
        planes = [np.full((h, w), self.frame, np.uint8), np.full(chroma, 128, np.uint8)]
        return planes if fmt == Format.NV12 else planes + [np.full(chroma, 128, np.uint8)]


class ScriptedBackend(PyAVBackend):
    def open_session(self, fmt: Format) -> DecodeSession:
        return ScriptedSession()


def scripted_rig() -> Rig:
    return Rig(role="decoder", backend_class=ScriptedBackend)


def test_decode_error_flags_exactly_that_output_buffer():
    rig = scripted_rig()
    g = Guest(rig, hint=(16, 16))
    shots = g.decode([b"\x10", b"\xee", b"\x20"])
    assert [f & v4l2.BUF_FLAG_ERROR != 0 for _, f, _ in g.out_done] == [False, True, False]
    assert [s.timestamp_us for s in shots] == [0, 2 * STEP_US]
    assert all(s.flags & v4l2.BUF_FLAG_KEYFRAME for s in shots)
    rig.close()


def test_sessions_opened_one_after_another_cannot_flood_the_log(caplog):
    """Each session says a corrupt input once; the device's GuestLog bounds
    them all (a guest opens sessions without end): 20 lines, then one a
    minute."""
    rig = scripted_rig()
    try:
        with caplog.at_level("WARNING", logger="pyemb"):
            for _ in range(30):
                g = Guest(rig, hint=(16, 16))
                g.decode([b"\x10", b"\xee"])
                g.close()
    finally:
        rig.close()
    said = [r for r in caplog.records if "corrupt bitstream" in r.getMessage()]
    assert len(said) == 20


def test_an_engine_bug_ends_its_session_only():
    rig = scripted_rig()
    good, bad = Guest(rig, hint=(16, 16)), Guest(rig, hint=(16, 16))
    bad.queue(b"\xdd", 0)
    events = rig.events(1)
    assert [(e.kind, e.session) for e in events] == [(p.Evt.ERROR, bad.session)]
    assert int.from_bytes(events[0].body[:4], "little") == errno.EIO
    assert rig.client.status(bad.session, "g_fmt", v4l2.Format(type=CAP)) == errno.EIO
    assert [s.timestamp_us for s in good.decode([b"\x10", b"\x20"])] == [0, STEP_US]
    bad.close()
    rig.close()


def test_a_picture_bigger_than_the_buffers_gets_error_buffers_and_waits_for_new_ones():
    """A client that resumes after a size change without new buffers: each
    of its buffers comes back with ERROR and bytesused 0; the picture waits
    for buffers that take it."""
    rig = scripted_rig()
    g = Guest(rig, hint=(16, 16))
    reallocate = g.reconfigure

    started = []

    def start_anyway() -> None:             # keeps its 16x16 buffers
        g.pending_change = g.last_seen = False
        rig.client.ioctl(g.session, "decoder_cmd", v4l2.DecoderCmd(cmd=v4l2.DEC_CMD_START))
        started.append(True)
        for i in set(range(g.cap_count)) - g.cap_queued:
            g.queue_capture(i)              # the LAST one
        g.hold_capture = True               # each comes back once

    g.reconfigure = start_anyway
    g.feed([b"\x10\x01", b"\x20\x02"])       # 16x16, then 32x32
    g.wait(lambda: started and not g.cap_queued, "the 16x16 buffers back")
    errors = [s for s in g.shots if s.flags & v4l2.BUF_FLAG_ERROR]
    assert len(errors) == g.cap_count
    assert all(s.bytesused == 0 and s.timestamp_us == STEP_US for s in errors)
    g.hold_capture = False
    reallocate()
    g.wait(lambda: len(g.pictures()) == 2, "the 32x32 picture")
    assert g.stale == 0
    assert g.fmt == ImageFormat(NV12, 32, 32)
    big = g.pictures()[1]
    assert big.timestamp_us == STEP_US and big.size == (32, 32)
    assert big.crc == zlib.crc32(b"\x20" * 32 * 32 + b"\x80" * 16 * 32)
    rig.close()


# -- sessions ------------------------------------------------------------------------------
def test_two_sessions_decode_at_once_each_bit_exact(rig):
    records, crcs = crosvm()
    packets = [d for d, _ in encode("h264", 160, 96, 30)]
    a, b = Guest(rig), Guest(rig, raw="YU12")
    ia = ib = 0
    deadline = time.monotonic() + 20
    while ia < len(records) or ib < len(packets):
        events = rig.poll()
        a.handle([e for e in events if e.session == a.session])
        b.handle([e for e in events if e.session == b.session])
        while a.out_free and ia < len(records):
            a.queue(records[ia], ia * STEP_US)
            ia += 1
        while b.out_free and ib < len(packets):
            b.queue(packets[ib], ib * STEP_US)
            ib += 1
        assert time.monotonic() < deadline
        time.sleep(0.001)
    for g in (a, b):
        g.other_events = []
    a.drain()
    b.handle(a.other_events)
    b.drain()
    assert [s.crc for s in a.pictures()] == crcs
    assert [s.crc for s in b.pictures()] == reference("h264", packets, Format.YUV420)


def test_close_while_decoding_frees_everything_and_others_go_on(rig):
    records, crcs = crosvm()
    g, other = Guest(rig, cap_memory=USERPTR), Guest(rig)
    g.feed(records[:100], until=lambda: len(g.pictures()) >= 3)
    used = rig.dev.shm.used
    thread = rig.dev.sessions[g.session].thread
    g.close()
    mark = len(rig.posted)
    assert g.session not in rig.dev.sessions
    thread.join(5)
    assert not thread.is_alive()
    assert rig.dev.shm.used < used and not rig.handle.mappings
    # No event for the closed session from now on.
    time.sleep(0.05)
    assert all(e.session != g.session for e in rig.posted[mark:])
    assert [s.crc for s in other.decode(records[:30])] == reference("h264", records[:30])


def test_a_closed_session_gives_the_memory_its_engine_freed_back(rig, monkeypatch):
    """As virtio-video's streams: once the session's engine is closed, on its
    worker (pyemb.memory)."""
    calls = []
    monkeypatch.setattr("pyemb.media.decoder.give_back_free_memory",
                        lambda: calls.append(threading.current_thread()))
    records, _ = crosvm()
    g = Guest(rig)
    g.feed(records[:20], until=lambda: len(g.pictures()) >= 1)
    session = rig.dev.sessions[g.session]
    g.close()
    session.thread.join(5)
    assert calls == [session.thread] and session.engine is None


def test_close_waits_for_a_picture_copy_in_flight_and_nothing_is_written_after():
    rig = scripted_rig()
    ScriptedSession.gate = threading.Event()
    ScriptedSession.entered.clear()
    try:
        g = Guest(rig, hint=(16, 16))
        g.setup_capture()
        g.queue(b"\xcc", 0)
        assert ScriptedSession.entered.wait(5)
        threading.Timer(0.1, ScriptedSession.gate.set).start()
        start = time.monotonic()
        g.close()
        mark = len(rig.posted)
        assert 0.05 < time.monotonic() - start < dec.STOP_TIMEOUT_S
        assert rig.dev.shm.used == 0
        time.sleep(0.05)
        assert all(e.session != g.session for e in rig.posted[mark:])
    finally:
        ScriptedSession.gate.set()
        ScriptedSession.gate = None
    rig.close()


def test_streamoff_capture_during_a_copy_takes_the_buffer_back_and_keeps_the_picture():
    rig = scripted_rig()
    ScriptedSession.gate = threading.Event()
    ScriptedSession.entered.clear()
    try:
        g = Guest(rig, hint=(16, 16), cap_memory=USERPTR)
        g.setup_capture()
        g.queue(b"\xcc", 0)
        assert ScriptedSession.entered.wait(5)
        rig.client.stream(g.session, False, CAP)          # answered at once
        mark = len(rig.posted)
        assert rig.handle.mappings                         # still pinned by the copy
        ScriptedSession.gate.set()
        time.sleep(0.05)
        assert not rig.handle.mappings and rig.handle.kept_views == 0
        assert [e for e in rig.posted[mark:]
                if e.kind == p.Evt.DQBUF and e.buffer.type == CAP] == []
        g.cap_streaming = False
        g.cap_queued.clear()
        for i in range(g.cap_count):
            g.queue_capture(i)
        rig.client.stream(g.session, True, CAP)
        g.cap_streaming = True
        g.wait(lambda: g.pictures(), "the picture")
        assert g.pictures()[0].timestamp_us == 0
    finally:
        ScriptedSession.gate.set()
        ScriptedSession.gate = None
    rig.close()


def test_a_streamoff_answer_never_overtakes_a_dqbuf_raised_before_it():
    """QEMU's main loop is busy (the test holds its lock) when the worker
    hands a CAPTURE buffer back: its batch waits to be pushed.  A STREAMOFF
    answered meanwhile must reach the used ring after that DQBUF, or the
    driver would see the DQBUF after it has taken the buffers back."""
    rig = scripted_rig()
    g = Guest(rig, hint=(16, 16))
    g.queue(b"\x10", 0)
    g.wait(lambda: len(g.pictures()) == 1 and len(g.out_free) == g.out_count, "a picture")
    rig.handle.batch_waits_for_bql.clear()
    with rig.handle.bql:
        g.queue(b"\x20", STEP_US)
        assert rig.handle.batch_waits_for_bql.wait(5)       # completed, not pushed
        io = p.IOCTLS[19]                                     # VIDIOC_STREAMOFF
        streamoff = rig.handle.request(
            [p.IOCTL.pack(p.Cmd.IOCTL, 0, g.session, io.code), bytes(v4l2.Int(value=CAP))],
            [p.HEADER.size], p.COMMAND_QUEUE)
        rig.handle.call(rig.dev, p.COMMAND_QUEUE, streamoff)
    g.wait(lambda: streamoff.done, "the STREAMOFF answer")
    time.sleep(0.02)
    with rig.handle.bql:
        used = list(rig.handle.used)
    events = [(i, parse_event(r.reply)) for i, r in enumerate(used)
              if r.queue == p.EVENT_QUEUE]
    picture = [i for i, e in events if e.kind == p.Evt.DQBUF and e.buffer.type == CAP
               and e.buffer.timestamp.tv_usec == STEP_US]
    assert len(picture) == 1 and picture[0] < used.index(streamoff)
    assert p.HEADER.unpack(streamoff.reply)[0] == 0
    rig.close()


def test_device_reset_while_decoding(rig):
    records, _ = crosvm()
    g = Guest(rig)
    g.feed(records[:100], until=lambda: len(g.pictures()) >= 3)
    threads = [s.thread for s in rig.dev.sessions.values()]
    rig.handle.reset(rig.dev)
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert rig.dev.sessions == {} and rig.dev.shm.used == 0 and not rig.handle.mappings


# -- the ioctls -----------------------------------------------------------------------------
def test_formats_sizes_controls_and_caps(rig):
    c = rig.client
    s = c.open()
    assert p.CONFIG.unpack(rig.dev.read_config())[0] == (
        v4l2.CAP_VIDEO_M2M_MPLANE | v4l2.CAP_STREAMING | v4l2.CAP_EXT_PIX_FORMAT)
    coded = rig.enumerate(s, "enum_fmt", lambda i: v4l2.Fmtdesc(index=i, type=OUT))
    names = [v4l2.fourcc_str(d.pixelformat) for d in coded]
    assert names == ["H264", "HEVC", "VP80", "VP90", "MPG2", "MPG4"]
    for d, name in zip(coded, names, strict=True):
        assert d.flags & v4l2.FMT_FLAG_COMPRESSED and d.flags & v4l2.FMT_FLAG_DYN_RESOLUTION
        assert bool(d.flags & v4l2.FMT_FLAG_CONTINUOUS_BYTESTREAM) == (name not in
                                                                       ("VP80", "VP90"))
    raw = rig.enumerate(s, "enum_fmt", lambda i: v4l2.Fmtdesc(index=i, type=CAP))
    assert [d.pixelformat for d in raw] == [NV12, YU12]
    # Before any stream: 640x480 both ways, CAPTURE derived from OUTPUT.
    cap = c.ioctl(s, "g_fmt", v4l2.Format(type=CAP))[0].fmt.pix_mp
    assert (cap.width, cap.height, cap.pixelformat) == (640, 480, NV12)
    f = c.s_fmt(s, "VP90", 1000, 562, buf_type=OUT)
    assert (f.fmt.pix_mp.width, f.fmt.pix_mp.height) == (1000, 562)
    assert f.fmt.pix_mp.plane_fmt[0].sizeimage == 1 << 20
    cap = c.ioctl(s, "g_fmt", v4l2.Format(type=CAP))[0].fmt.pix_mp
    assert (cap.width, cap.height) == (1008, 576)
    sel = c.ioctl(s, "g_selection", v4l2.Selection(type=CAP, target=v4l2.SEL_TGT_COMPOSE))[0]
    assert (sel.r.width, sel.r.height) == (1000, 562)
    big = v4l2.Format(type=OUT)
    big.fmt.pix_mp.pixelformat, big.fmt.pix_mp.num_planes = 0x12345678, 1
    big.fmt.pix_mp.width, big.fmt.pix_mp.height = 9000, 9000
    big.fmt.pix_mp.plane_fmt[0].sizeimage = 1 << 30
    t = c.ioctl(s, "try_fmt", big)[0].fmt.pix_mp
    assert (v4l2.fourcc_str(t.pixelformat), t.width, t.height) == ("H264", 4096, 4096)
    assert t.plane_fmt[0].sizeimage == dec.MAX_OUTPUT_SIZEIMAGE
    fs = c.ioctl(s, "enum_framesizes", v4l2.Frmsizeenum(pixel_format=v4l2.fourcc("H264")))[0]
    assert fs.type == v4l2.FRMSIZE_TYPE_STEPWISE
    assert (fs.u.stepwise.min_width, fs.u.stepwise.max_width) == (16, 4096)
    fs = c.ioctl(s, "enum_framesizes", v4l2.Frmsizeenum(pixel_format=NV12))[0]
    assert fs.u.stepwise.step_width == 16
    assert c.status(s, "enum_framesizes", v4l2.Frmsizeenum(index=1, pixel_format=NV12)) \
        == errno.EINVAL
    # MIN_BUFFERS_FOR_CAPTURE: read-only.
    assert c.ioctl(s, "g_ctrl", v4l2.Control(id=v4l2.CID_MIN_BUFFERS_FOR_CAPTURE))[0].value \
        == dec.MIN_CAPTURE_BUFFERS
    assert c.status(s, "s_ctrl", v4l2.Control(id=v4l2.CID_MIN_BUFFERS_FOR_CAPTURE, value=5)) \
        == errno.EACCES
    q = c.ioctl(s, "queryctrl", v4l2.Queryctrl(id=v4l2.CID_MIN_BUFFERS_FOR_CAPTURE))[0]
    assert q.flags & v4l2.CTRL_FLAG_READ_ONLY
    # Buffers allocated: the OUTPUT format is fixed (the same one is fine).
    c.reqbufs(s, 2, OUT)
    assert c.status(s, "s_fmt", c.s_fmt(s, "VP90", 1000, 562, buf_type=OUT)) == 0
    with pytest.raises(IoctlFailed) as e:
        c.s_fmt(s, "H264", 1000, 562, buf_type=OUT)
    assert e.value.status == errno.EBUSY


def test_malformed_ioctls_get_errnos_and_the_session_keeps_working(rig):
    c = rig.client
    s = c.open()
    c.s_fmt(s, "H264", 0, 0, buf_type=OUT)
    for name, payload in [("g_fmt", v4l2.Format(type=v4l2.BUF_TYPE_VIDEO_CAPTURE)),
                          ("enum_fmt", v4l2.Fmtdesc(type=v4l2.BUF_TYPE_VIDEO_OUTPUT)),
                          ("reqbufs", v4l2.RequestBuffers(count=2, type=3, memory=MMAP)),
                          ("reqbufs", v4l2.RequestBuffers(count=2, type=OUT, memory=4)),
                          ("g_selection", v4l2.Selection(type=OUT, target=0x100)),
                          ("g_selection", v4l2.Selection(type=CAP, target=0x999)),
                          ("streamon", v4l2.Int(value=OUT)),            # no buffers
                          ("querybuf", v4l2.Buffer(index=0, type=OUT, length=1)),
                          ("decoder_cmd", v4l2.DecoderCmd(cmd=v4l2.DEC_CMD_PAUSE))]:
        extra = bytes(v4l2.Plane()) if name == "querybuf" else b""
        assert c.status(s, name, payload, extra) == errno.EINVAL, name
    for name in ("g_parm", "enuminput", "g_std", "s_input"):
        assert c.status(s, name) == errno.ENOTTY, name
    c.reqbufs(s, 2, OUT)
    b, planes = c.querybuf(s, 0, OUT)
    too_much = planes[0].length + 1
    with pytest.raises(IoctlFailed) as e:
        c.qbuf(s, 0, OUT, bytesused=too_much)
    assert e.value.status == errno.EINVAL
    with pytest.raises(IoctlFailed) as e:
        c.qbuf(s, 7, OUT, bytesused=1)
    assert e.value.status == errno.EINVAL
    # A multi-planar buffer without planes, or claiming nine.
    assert c.raw_ioctl(s, 15, bytes(v4l2.Buffer(type=OUT, length=0)), 88)[0] == errno.EINVAL
    assert c.raw_ioctl(s, 15, bytes(v4l2.Buffer(type=OUT, length=9)), 88)[0] == errno.EINVAL
    # Planes promised but missing.
    assert c.raw_ioctl(s, 15, bytes(v4l2.Buffer(type=OUT, length=2, memory=MMAP)),
                       88)[0] == errno.EINVAL
    # A USERPTR OUTPUT buffer with more bitstream than the device copies out.
    c.reqbufs(s, 0, OUT)
    c.reqbufs(s, 1, OUT, USERPTR)
    huge = dec.MAX_OUTPUT_SIZEIMAGE + 1
    with pytest.raises(IoctlFailed) as e:
        c.qbuf(s, 0, OUT, USERPTR, bytesused=huge, userptr=0x1000, length=huge,
               sg=p.SG_ENTRY.pack(0x100000, huge, 0))
    assert e.value.status == errno.EINVAL
    c.reqbufs(s, 0, OUT)
    c.reqbufs(s, 2, OUT)
    # A USERPTR CAPTURE buffer shorter than the format's sizeimage.
    c.reqbufs(s, 2, CAP, USERPTR)
    size = ImageFormat(NV12, 640, 480).sizeimage
    with pytest.raises(IoctlFailed) as e:
        c.qbuf(s, 0, CAP, USERPTR, userptr=0x1000, length=size - 1,
               sg=p.SG_ENTRY.pack(0x100000, size, 0))
    assert e.value.status == errno.EINVAL and not rig.handle.mappings
    c.qbuf(s, 0, OUT, bytesused=4)
    c.stream(s, True, OUT)
    assert c.status(s, "reqbufs", v4l2.RequestBuffers(count=0, type=OUT, memory=MMAP)) \
        == errno.EBUSY
    # Garbage bitstream of any size: the buffer comes back, the session lives.
    off = c.querybuf(s, 1, OUT)[1][0].m.mem_offset
    rig.handle.shared_memory[off:off + 64] = bytes(range(64))
    c.qbuf(s, 1, OUT, bytesused=64)
    done = rig.events(2)
    assert sorted(e.buffer.index for e in done) == [0, 1]
    assert c.ioctl(s, "g_fmt", v4l2.Format(type=OUT))[0].fmt.pix_mp.pixelformat == \
        v4l2.fourcc("H264")
    c.close(s)


def test_what_v4l2_compliance_asks_of_an_m2m_decoder(rig):
    """Colorimetry goes from OUTPUT to CAPTURE; CREATE_BUFS wants one plane of
    at least the format's size; data_offset must be inside bytesused, and QBUF
    of a prepared buffer keeps what PREPARE_BUF checked; mmap() of offset 0
    finds no buffer even with MMAP buffers on the other queue."""
    c = rig.client
    s = c.open()
    f = v4l2.Format(type=OUT)
    mp = f.fmt.pix_mp
    mp.pixelformat, mp.width, mp.height, mp.num_planes = v4l2.fourcc("H264"), 320, 240, 1
    mp.colorspace, mp.xfer_func, mp.ycbcr_enc, mp.quantization = 10, 2, 1, 1
    out = c.ioctl(s, "s_fmt", f)[0].fmt.pix_mp
    cap = c.ioctl(s, "g_fmt", v4l2.Format(type=CAP))[0].fmt.pix_mp
    for got in (out, cap):
        assert (got.colorspace, got.xfer_func, got.ycbcr_enc, got.quantization) == (10, 2, 1, 1)
    mp.colorspace, mp.xfer_func = 99, 99                # not V4L2's: the defaults
    out = c.ioctl(s, "try_fmt", f)[0].fmt.pix_mp
    assert (out.colorspace, out.xfer_func) == (v4l2.COLORSPACE_REC709, 0)
    cb = v4l2.CreateBuffers(count=1, memory=MMAP)
    cb.format = c.ioctl(s, "g_fmt", v4l2.Format(type=CAP))[0]
    size = cb.format.fmt.pix_mp.plane_fmt[0].sizeimage
    for planes, sizeimage in ((0, size), (1, size // 2)):
        cb.format.fmt.pix_mp.num_planes = planes
        cb.format.fmt.pix_mp.plane_fmt[0].sizeimage = sizeimage
        assert c.status(s, "create_bufs", cb) == errno.EINVAL
    cb.format.fmt.pix_mp.num_planes, cb.format.fmt.pix_mp.plane_fmt[0].sizeimage = 1, size * 2
    made = c.ioctl(s, "create_bufs", cb)[0]
    assert made.count == 1 and c.querybuf(s, 0, CAP)[1][0].length == size * 2
    assert c.mmap(s, 0)[0] == errno.EINVAL
    assert c.mmap(s, c.querybuf(s, 0, CAP)[1][0].m.mem_offset)[0] == 0
    # OUTPUT: the bitstream starts at data_offset.
    c.reqbufs(s, 2, OUT)
    b, planes = c.buffer(0, OUT)
    plane = v4l2.Plane(bytesused=100, data_offset=100)
    assert c.status(s, "prepare_buf", b, bytes(plane)) == errno.EINVAL
    plane.data_offset = 40
    b.timestamp.tv_usec = 7
    prepared = c.ioctl(s, "prepare_buf", b, bytes(plane))[0]
    assert prepared.timestamp.tv_usec == 0          # taken at QBUF, not before
    plane.bytesused = plane.data_offset = 0xDEADBEEF
    b.timestamp.tv_usec = 9
    done, queued = c.ioctl(s, "qbuf", b, bytes(plane))
    assert (v4l2.Plane.parse(queued).bytesused, v4l2.Plane.parse(queued).data_offset) == (100, 40)
    assert done.timestamp.tv_usec == 9


def test_data_offset_skips_the_head_of_an_output_buffer():
    rig = scripted_rig()
    g = Guest(rig, hint=(16, 16))
    g.setup_capture()
    c = rig.client
    off = g.offsets[("out", 0)]
    rig.handle.shared_memory[off:off + 8] = b"\xdd\xdd\xdd\xdd\x42\x00\x00\x00"
    b, _ = c.buffer(0, OUT)
    g.out_free.remove(0)
    g.out_queued.add(0)
    c.ioctl(g.session, "qbuf", b, bytes(v4l2.Plane(bytesused=5, data_offset=4)))
    g.wait(lambda: g.pictures(), "the picture")     # 0xdd would be an engine bug
    assert g.pictures()[0].crc == zlib.crc32(b"\x42" * 256 + b"\x80" * 128)
    rig.close()


def test_sessions_that_decode_are_bounded_apart_from_those_open():
    rig = Rig(role="decoder", config={"decoder": {"max_streams": 1}})
    first = Guest(rig)                      # STREAMON(OUTPUT): decoding
    c = rig.client
    second = c.open()
    c.s_fmt(second, "H264", 0, 0, buf_type=OUT)
    c.reqbufs(second, 2, OUT)
    t = v4l2.Int(value=OUT)
    assert c.status(second, "streamon", t) == errno.EBUSY
    assert c.ioctl(second, "g_fmt", v4l2.Format(type=OUT))[0].fmt.pix_mp.width == 640
    first.close()
    c.ioctl(second, "streamon", t)
    rig.close()
    with pytest.raises(ConfigError, match="decoder.max_streams"):
        Rig(role="decoder", config={"decoder": {"max_streams": 0}})


def test_backend_is_chosen_and_configured_as_virtio_video_does():
    rig = Rig(role="decoder", config={"backend": {"threads": 2}})
    assert isinstance(rig.dev.kind.backend, PyAVBackend)
    assert rig.dev.kind.backend.config == {"threads": 2}
    rig.close()
    with pytest.raises(ConfigError, match="not a pyemb VideoBackend"):
        Rig(role="decoder", backend_class=int)



def test_a_single_planar_buffer_with_a_huge_length_is_refused_at_once(rig):
    """Found by the protocol fuzzer: the decoder counted planes by a
    single-planar v4l2_buffer's ``length`` (bytes, any value a guest
    likes) before refusing its type, so QBUF/QUERYBUF/PREPARE_BUF of
    type 1 with length 2^24 held QEMU's main loop up for minutes."""
    c = rig.client
    s = c.open()
    for code in (9, 15, 93):                    # QUERYBUF, QBUF, PREPARE_BUF
        t0 = time.monotonic()
        status, _ = c.raw_ioctl(s, code, bytes(v4l2.Buffer(type=v4l2.BUF_TYPE_VIDEO_CAPTURE,
                                                           length=1 << 24)), 88)
        assert status == errno.EINVAL
        assert time.monotonic() - t0 < 0.5
