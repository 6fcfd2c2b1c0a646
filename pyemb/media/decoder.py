"""The decoder node of virtio-media-py (``role=decoder``): a V4L2 stateful
video decoder, memory-to-memory and multi-planar, as the kernel's
``Documentation/userspace-api/media/v4l/dev-decoder.rst`` describes it.

It decodes on the engines of virtio-video-py (:mod:`pyemb.video_backend`):
PyAV by default, or the class ``backend=`` or ``[backend] class`` names,
built with the ``[backend]`` table; pictures are written into guest buffers
by the engine's own :meth:`~pyemb.video_backend.Picture.write_into`.

Each session (CMD_OPEN) is a decoding context of its own: an
OUTPUT_MPLANE queue of bitstream (the coded formats the engine has: H264,
HEVC, VP80, VP90, MPG2, MPG4), a CAPTURE_MPLANE queue of pictures (NV12 or
YU12 in one memory plane: Y rows of ``bytesperline`` = coded width, then
the chroma), its engine session and its worker thread.  What a session does:

- QBUF returns at once; an OUTPUT buffer comes back (a DQBUF event) once
  its bytes are in the engine, with ``V4L2_BUF_FLAG_ERROR`` if the engine
  failed on them (the stream goes on).  ``bytesused`` 0 is an empty chunk.
  H264, HEVC, MPG2 and MPG4 buffers may cut the stream anywhere
  (``V4L2_FMT_FLAG_CONTINUOUS_BYTESTREAM``); VP8 and VP9 take whole frames.
- Once the engine knows the stream's size (from its headers, or its first
  picture) a ``V4L2_EVENT_SOURCE_CHANGE`` (``V4L2_EVENT_SRC_CH_RESOLUTION``)
  goes to a session subscribed to it; G_FMT(CAPTURE) reports from then on
  the coded size (the visible size rounded up to 16), G_SELECTION's COMPOSE
  and CROP targets the visible rectangle.  Before that, both queues report
  the size S_FMT(OUTPUT) named (640x480 if none).
- CAPTURE buffers get the pictures in display order, the timestamp of the
  OUTPUT buffer the picture's first byte came from
  (``V4L2_BUF_FLAG_TIMESTAMP_COPY``), a sequence number counting pictures
  since STREAMON(CAPTURE), and KEYFRAME / PFRAME / BFRAME as the engine
  says.  A buffer too small for the picture comes back with ERROR and
  ``bytesused`` 0; the picture waits for the next one.
- A size change: a SOURCE_CHANGE is sent while CAPTURE streams (but not
  when the first size parsed fits the buffers made for the client's size
  hint): the last picture of the old size carries ``V4L2_BUF_FLAG_LAST``,
  or, if it is already out, an empty buffer (``bytesused`` 0) does; then
  the session is stopped until V4L2_DEC_CMD_START or STREAMOFF+STREAMON on
  CAPTURE (with buffers for the new size).  The pictures of the new size
  wait meanwhile.
- V4L2_DEC_CMD_STOP drains: the OUTPUT buffers queued before it are
  decoded, the engine flushed, every picture goes out, then an empty CAPTURE
  buffer (``bytesused`` 0) carries LAST, then ``V4L2_EVENT_EOS``; the session
  is stopped (OUTPUT buffers queued meanwhile wait) until V4L2_DEC_CMD_START
  or STREAMOFF+STREAMON on CAPTURE.  LAST is never on the last picture, as
  with crosvm's virtio-media decoder: the upstream virtio-media driver's
  poll() does not wake a client after a LAST buffer (vb2's answers EPOLLIN
  and DQBUF EPIPE), and GStreamer 1.22's v4l2 decoders, which poll for that
  EPIPE after a LAST picture, waited forever; an empty buffer is their EOS.
  A drain asked for while OUTPUT does not stream does nothing.
  TRY_DECODER_CMD takes START and STOP (their flags and data zeroed).
- STREAMOFF(OUTPUT) is a seek: the engine is reset, the bitstream and the
  pictures waiting are dropped, a drain in progress ends without LAST, and
  the OUTPUT buffers come back without events (the driver takes them back
  itself).  STREAMOFF(CAPTURE) takes its buffers back the same way; pictures
  already decoded wait for the next STREAMON(CAPTURE).
- REQBUFS(OUTPUT, 0) also forgets the stream's size: the next stream gets
  its first SOURCE_CHANGE again.
- An engine bug (an exception other than a decode error) ends the session:
  a virtio-media ERROR event, and EIO for its later ioctls.  Other sessions
  and QEMU go on.  ENOTTY for what a decoder does not do.

Threads and locks: ioctls run on QEMU's main loop under the session's lock,
and never wait on the engine.  The worker thread calls the engine and
writes pictures outside that lock, taking it for bookkeeping only; a buffer
whose memory it uses meanwhile is ``busy`` (see :mod:`pyemb.media.buffers`),
so that STREAMOFF or REQBUFS cannot unmap it under the worker, and a
command that takes it back cancels what the worker will do with it.
CMD_CLOSE and a device reset wait for such a copy to end (one picture,
bounded by :data:`STOP_TIMEOUT_S`), never for an engine call.

Bounds: ``[decoder] max_streams`` sessions (default 32) may decode at once,
each with its worker and engine session (STREAMON past it: EBUSY), whatever
``[media] max_sessions`` lets open.  Per session: 32 buffers a queue
(:data:`MAX_BUFFERS`); MMAP buffers
in region 0 (its size bounds them all); an OUTPUT buffer's ``sizeimage`` at
most :data:`MAX_OUTPUT_SIZEIMAGE`.  Host memory a session takes beyond its
region 0 buffers: one OUTPUT buffer's bitstream (copied while it is being
decoded: QBUF refuses a ``bytesused`` past :data:`MAX_OUTPUT_SIZEIMAGE`,
16 MiB, whatever the buffer's length), at most :data:`PICTURE_BACKLOG` decoded
pictures waiting for CAPTURE buffers plus those one engine call returns
(a packet's; the engine then stops taking bitstream), and what the engine
holds itself (for FFmpeg: its reference pictures and one picture a
decoding thread).  At 1080p that is about 3 MB a picture.
"""

from __future__ import annotations

import errno
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

from pyemb import log
from pyemb.config import ConfigError, get_int, section
from pyemb.media import protocol as p
from pyemb.media import v4l2
from pyemb.media.buffers import MAX_BUFFERS, Buffer, BufferQueue, scatter
from pyemb.media.controls import ControlSet, ControlSpec
from pyemb.media.formats import NV12, RAW_FORMATS, YU12, ImageFormat
from pyemb.media.protocol import V4L2Error
from pyemb.media.session import Session
from pyemb.memory import give_back_free_memory
from pyemb.threadname import set_native_name
from pyemb.video.protocol import BufferFlag, Format, QueueType
from pyemb.video_backend import (
    DEFAULT_SIZE,
    INPUT_BUFFER_SIZE,
    DecodeError,
    DecodeSession,
    Picture,
    PyAVBackend,
    VideoBackend,
    align,
)

if TYPE_CHECKING:
    from pyemb.media.device import MediaDevice

OUTPUT = v4l2.BUF_TYPE_VIDEO_OUTPUT_MPLANE
CAPTURE = v4l2.BUF_TYPE_VIDEO_CAPTURE_MPLANE
# The engine keeps its own reference pictures: a picture is copied into a
# CAPTURE buffer and the buffer goes back at once, so one buffer is enough.
MIN_CAPTURE_BUFFERS = 1
# Decoded pictures that wait for CAPTURE buffers before the worker stops
# taking bitstream.
PICTURE_BACKLOG = 4
MIN_OUTPUT_SIZEIMAGE = 4096
# The largest colorspace, xfer_func, ycbcr_enc and quantization values
# videodev2.h defines (DCI-P3, SMPTE 2084, SMPTE 240M, limited range).
MAX_COLORSPACE, MAX_XFER_FUNC, MAX_YCBCR_ENC, MAX_QUANTIZATION = 12, 7, 8, 2
MAX_OUTPUT_SIZEIMAGE = 16 << 20
# The longest CMD_CLOSE or a reset waits for the worker to finish copying a
# picture into, or bitstream out of, a buffer.
STOP_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class CodedFormat:
    fourcc: str
    description: str
    continuous: bool          # buffers may cut the stream anywhere (the engine parses it)


CODED = {
    Format.H264: CodedFormat("H264", "H.264", True),
    Format.HEVC: CodedFormat("HEVC", "HEVC", True),
    Format.VP8: CodedFormat("VP80", "VP8", False),
    Format.VP9: CodedFormat("VP90", "VP9", False),
    Format.MPEG2: CodedFormat("MPG2", "MPEG-2 ES", True),
    Format.MPEG4: CodedFormat("MPG4", "MPEG-4 Part 2 ES", True),
}
RAW = {Format.NV12: NV12, Format.YUV420: YU12}       # engine format -> V4L2 fourcc
PICTURE_FLAGS = {BufferFlag.IFRAME: v4l2.BUF_FLAG_KEYFRAME,
                 BufferFlag.PFRAME: v4l2.BUF_FLAG_PFRAME,
                 BufferFlag.BFRAME: v4l2.BUF_FLAG_BFRAME,
                 BufferFlag.ERR: v4l2.BUF_FLAG_ERROR}
SELECTION_TARGETS = (v4l2.SEL_TGT_CROP, v4l2.SEL_TGT_CROP_DEFAULT, v4l2.SEL_TGT_CROP_BOUNDS,
                     v4l2.SEL_TGT_COMPOSE, v4l2.SEL_TGT_COMPOSE_DEFAULT,
                     v4l2.SEL_TGT_COMPOSE_BOUNDS, v4l2.SEL_TGT_COMPOSE_PADDED)


class Decoder:
    """The node kind: the engine, and what every session offers."""

    card = "pyemb decoder"
    device_caps = v4l2.CAP_VIDEO_M2M_MPLANE | v4l2.CAP_STREAMING | v4l2.CAP_EXT_PIX_FORMAT

    def __init__(self, device: MediaDevice, config: Mapping[str, Any],
                 backend_class: type | None) -> None:
        self.device = device
        backend_class = backend_class or PyAVBackend
        if not issubclass(backend_class, VideoBackend):
            raise ConfigError(f"backend {backend_class.__name__} is not a pyemb VideoBackend")
        self.backend = backend_class(section(config, "backend"))
        self.coded = [f for f in self.backend.coded_formats() if f in CODED]
        self.raw = [f for f in self.backend.raw_formats() if f in RAW]
        if not self.coded or not self.raw:
            raise ConfigError(f"backend {backend_class.__name__} decodes no coded format "
                              "virtio-media names into NV12 or YU12")
        # Sessions with a worker and an engine session (STREAMON once): each
        # is a thread (and the engine's own), so they are bounded apart from
        # [media] max_sessions, which v4l2-compliance wants large.
        table = section(config, "decoder")
        self.max_streams = get_int(table, "max_streams", 32, 1, 1024, "decoder")
        self.streaming: set[int] = set()
        # Sizes the engine decodes, from its virtio-video capabilities.
        self.sizes: dict[int, tuple[int, int, int, int]] = {}
        for desc in self.backend.capabilities(QueueType.INPUT):
            if desc.frames:
                w, h = desc.frames[0].width, desc.frames[0].height
                self.sizes[desc.format] = (w.min, w.max, h.min, h.max)

    def size_range(self, coded: int) -> tuple[int, int, int, int]:
        return self.sizes.get(coded, (16, 4096, 16, 4096))

    def open_session(self, session_id: int) -> DecoderSession:
        return DecoderSession(self.device, session_id, self)

    def close_session(self, session: Session) -> None:
        session.close()
        self.streaming.discard(session.id)

    def close(self) -> None:
        self.backend.close()


class Marker(Enum):
    EOS = "eos"            # picture queue: the drain's end (LAST, then V4L2_EVENT_EOS)


@dataclass(eq=False)
class Job:
    """The OUTPUT buffer the worker is decoding; a seek takes it away."""

    buf: Buffer
    length: int                       # bytesused: the bitstream is [data_offset, length)
    data_offset: int
    timestamp: int
    fmt: Format                       # the coded format when it was taken
    reset: bool                       # the engine is reset first (a seek came before)
    pictures: Iterator[Picture] | None = None
    error: bool = False


@dataclass(eq=False)
class Write:
    """A picture the worker is copying into a CAPTURE buffer."""

    picture: Picture
    buf: Buffer
    fmt: ImageFormat
    views: list[memoryview] = field(default_factory=list)
    cancelled: bool = False          # the buffer was taken back meanwhile
    stale: bool = False              # a seek came: the picture is not kept


class DecoderSession(Session):
    event_types = (v4l2.EVENT_EOS, v4l2.EVENT_SOURCE_CHANGE)

    def __init__(self, device: MediaDevice, session_id: int, decoder: Decoder) -> None:
        super().__init__(device, session_id)
        self.decoder = decoder
        self.shm = device.shm
        copy = v4l2.BUF_FLAG_TIMESTAMP_COPY
        self.output = BufferQueue(OUTPUT, device.handle, device.shm, timestamp_flag=copy)
        self.capture = BufferQueue(CAPTURE, device.handle, device.shm, timestamp_flag=copy)
        self._controls = ControlSet([ControlSpec(
            v4l2.CID_MIN_BUFFERS_FOR_CAPTURE, "Min Number of Capture Buffers",
            v4l2.CTRL_TYPE_INTEGER, 1, MAX_BUFFERS, 1, MIN_CAPTURE_BUFFERS,
            v4l2.CTRL_FLAG_READ_ONLY | v4l2.CTRL_FLAG_VOLATILE)])
        # Formats.
        self.coded: Format = decoder.coded[0]
        self.hint = DEFAULT_SIZE                 # OUTPUT width x height from the client
        self.out_sizeimage = INPUT_BUFFER_SIZE
        self.raw: Format = decoder.raw[0]
        self.colorimetry = (v4l2.COLORSPACE_REC709, 0, 0, 0)
        self.geometry = DEFAULT_SIZE             # visible size of the CAPTURE format
        self.known = False                       # the stream's size was parsed
        self.cap_alloc_size = 0                  # sizeimage the CAPTURE buffers were made for
        # The worker's state, under self.lock.
        self.cond = threading.Condition(self.lock)
        self.thread: threading.Thread | None = None
        self.job: Job | None = None
        self.pictures: deque[Picture | Marker] = deque()
        self.writing: Write | None = None
        # After a LAST buffer ("drain" or "resolution"): nothing is decoded
        # or output until V4L2_DEC_CMD_START or STREAMON(CAPTURE).
        self.stopped: str | None = None
        self.need_last = False        # a size change wants an empty LAST buffer
        self.draining = False         # DEC_CMD_STOP until its LAST
        self.drain_left: int | None = None    # OUTPUT buffers to decode before the flush
        self.drain_id = 0
        self.epoch = 0                # seeks so far: engine results of before one are dropped
        self.reset_engine = False
        self.failed = False
        self.out_sequence = 0
        self.cap_sequence = 0
        self.warned: set[str] = set()
        self.acted = False            # the worker's _next_step completed or raised something
        self.unpushed = False         # the worker's batch holds completions (see answer_later)
        self.deferred: list[Callable[[], None]] = []     # ioctl answers the worker sends
        # The worker's own.
        self.engine: DecodeSession | None = None
        self.engine_format: Format | None = None

    def controls(self) -> ControlSet:
        return self._controls

    def ioctl(self, io: p.Ioctl, payload: v4l2.Struct, extra: bytes) -> bytes | None:
        if self.failed:
            raise V4L2Error(errno.EIO, "the decoder failed")
        return super().ioctl(io, payload, extra)

    def warn(self, kind: str, message: str) -> None:
        """Log what a guest caused once per session and kind, within the
        device's budget (a guest can open sessions without end)."""
        if kind not in self.warned:
            self.warned.add(kind)
            self.device.guest_log.warning(f"virtio-media decoder session {self.id}: {message} "
                                          "(logged once per session)")

    # -- formats ------------------------------------------------------------------------
    def _queue(self, buf_type: int) -> BufferQueue:
        if buf_type == OUTPUT:
            return self.output
        if buf_type == CAPTURE:
            return self.capture
        raise V4L2Error(errno.EINVAL, f"buffer type {buf_type}")

    def cap_format(self, size: tuple[int, int] | None = None) -> ImageFormat:
        w, h = size or self.geometry
        return ImageFormat(RAW[self.raw], align(w), align(h))

    def ioctl_enum_fmt(self, f: v4l2.Fmtdesc, extra: bytes) -> None:
        self._queue(f.type)
        if f.type == OUTPUT:
            if f.index >= len(self.decoder.coded):
                raise V4L2Error(errno.EINVAL, "no more formats")
            coded = CODED[self.decoder.coded[f.index]]
            code, name = v4l2.fourcc(coded.fourcc), coded.description
            flags = v4l2.FMT_FLAG_COMPRESSED | v4l2.FMT_FLAG_DYN_RESOLUTION
            if coded.continuous:
                flags |= v4l2.FMT_FLAG_CONTINUOUS_BYTESTREAM
        else:
            if f.index >= len(self.decoder.raw):
                raise V4L2Error(errno.EINVAL, "no more formats")
            code = RAW[self.decoder.raw[f.index]]
            name, flags = RAW_FORMATS[code], 0
        f.flags = flags
        f.description = (v4l2.C.c_uint8 * 32)(*v4l2.cstr(name))
        f.pixelformat, f.mbus_code = code, 0
        f.reserved[0] = f.reserved[1] = f.reserved[2] = 0

    def _coded_of(self, fourcc: int) -> Format | None:
        for fmt in self.decoder.coded:
            if v4l2.fourcc(CODED[fmt].fourcc) == fourcc:
                return fmt
        return None

    def _raw_of(self, fourcc: int) -> Format | None:
        for fmt in self.decoder.raw:
            if RAW[fmt] == fourcc:
                return fmt
        return None

    @staticmethod
    def _colorimetry(mp: v4l2.PixFormatMplane) -> tuple[int, int, int, int]:
        """The OUTPUT format's colorspace, transfer function, Y'CbCr encoding
        and quantization: the client's where V4L2 defines them, else Rec. 709
        and the defaults.  CAPTURE reports the same (a decoder converts none)."""
        return (mp.colorspace if 1 <= mp.colorspace <= MAX_COLORSPACE else v4l2.COLORSPACE_REC709,
                mp.xfer_func if mp.xfer_func <= MAX_XFER_FUNC else 0,
                mp.ycbcr_enc if mp.ycbcr_enc <= MAX_YCBCR_ENC else 0,
                mp.quantization if mp.quantization <= MAX_QUANTIZATION else 0)

    def _try_output(self, mp: v4l2.PixFormatMplane) -> tuple[Format, tuple[int, int], int]:
        coded = self._coded_of(mp.pixelformat) or self.decoder.coded[0]
        wmin, wmax, hmin, hmax = self.decoder.size_range(coded)
        size = ((min(max(mp.width, wmin), wmax), min(max(mp.height, hmin), hmax))
                if mp.width and mp.height else DEFAULT_SIZE)
        want = mp.plane_fmt[0].sizeimage if mp.num_planes else 0
        sizeimage = (min(max(want, MIN_OUTPUT_SIZEIMAGE), MAX_OUTPUT_SIZEIMAGE) if want
                     else INPUT_BUFFER_SIZE)
        return coded, size, sizeimage

    @staticmethod
    def _fill_colorimetry(mp: v4l2.PixFormatMplane, colorimetry: tuple[int, int, int, int]
                          ) -> None:
        mp.colorspace, mp.xfer_func, mp.ycbcr_enc, mp.quantization = colorimetry

    def _fill_output(self, f: v4l2.Format, coded: Format, size: tuple[int, int],
                     sizeimage: int, colorimetry: tuple[int, int, int, int]) -> None:
        mp = f.fmt.pix_mp
        v4l2.C.memset(v4l2.C.addressof(f.fmt), 0, v4l2.C.sizeof(f.fmt))
        mp.width, mp.height = size
        mp.pixelformat = v4l2.fourcc(CODED[coded].fourcc)
        mp.field = v4l2.FIELD_NONE
        mp.num_planes = 1
        mp.plane_fmt[0].sizeimage = sizeimage
        self._fill_colorimetry(mp, colorimetry)

    def _fill_capture(self, f: v4l2.Format, raw: Format) -> None:
        v4l2.C.memset(v4l2.C.addressof(f.fmt), 0, v4l2.C.sizeof(f.fmt))
        w, h = self.geometry
        ImageFormat(RAW[raw], align(w), align(h)).fill_pix_mp(f.fmt.pix_mp)
        self._fill_colorimetry(f.fmt.pix_mp, self.colorimetry)

    def ioctl_g_fmt(self, f: v4l2.Format, extra: bytes) -> None:
        if self._queue(f.type) is self.output:
            size = self.geometry if self.known else self.hint
            self._fill_output(f, self.coded, size, self.out_sizeimage, self.colorimetry)
        else:
            self._fill_capture(f, self.raw)

    def ioctl_try_fmt(self, f: v4l2.Format, extra: bytes) -> None:
        if self._queue(f.type) is self.output:
            self._fill_output(f, *self._try_output(f.fmt.pix_mp),
                              self._colorimetry(f.fmt.pix_mp))
        else:
            self._fill_capture(f, self._raw_of(f.fmt.pix_mp.pixelformat) or self.raw)

    def ioctl_s_fmt(self, f: v4l2.Format, extra: bytes) -> None:
        if self._queue(f.type) is self.output:
            coded, size, sizeimage = self._try_output(f.fmt.pix_mp)
            if ((coded, size, sizeimage) != (self.coded, self.hint, self.out_sizeimage)
                    and (self.output.buffers or self.capture.buffers)):
                raise V4L2Error(errno.EBUSY, "buffers allocated")
            self.coded, self.hint, self.out_sizeimage = coded, size, sizeimage
            self.colorimetry = self._colorimetry(f.fmt.pix_mp)
            if not self.known:
                self.geometry = size           # the derived CAPTURE format
            self._fill_output(f, coded, size, sizeimage, self.colorimetry)
            return
        raw = self._raw_of(f.fmt.pix_mp.pixelformat) or self.raw
        if raw != self.raw and self.capture.buffers:
            raise V4L2Error(errno.EBUSY, "buffers allocated")
        self.raw = raw
        self._fill_capture(f, raw)

    def ioctl_enum_framesizes(self, f: v4l2.Frmsizeenum, extra: bytes) -> None:
        coded = self._coded_of(f.pixel_format)
        raw = self._raw_of(f.pixel_format)
        if f.index != 0 or (coded is None and raw is None):
            raise V4L2Error(errno.EINVAL, "no more sizes")
        wmin, wmax, hmin, hmax = self.decoder.size_range(coded if coded is not None
                                                         else self.coded)
        step = 1 if coded is not None else 16      # pictures: whole macroblocks
        f.type = v4l2.FRMSIZE_TYPE_STEPWISE
        v4l2.C.memset(v4l2.C.addressof(f.u), 0, v4l2.C.sizeof(f.u))
        s = f.u.stepwise
        s.min_width, s.max_width, s.step_width = align(wmin, step), align(wmax, step), step
        s.min_height, s.max_height, s.step_height = align(hmin, step), align(hmax, step), step
        f.reserved[0] = f.reserved[1] = 0

    def _rect(self, target: int) -> tuple[int, int]:
        if target == v4l2.SEL_TGT_CROP_BOUNDS:
            fmt = self.cap_format()
            return fmt.width, fmt.height
        return self.geometry

    def ioctl_g_selection(self, s: v4l2.Selection, extra: bytes) -> None:
        # Selection takes the single-planar type names for both APIs.
        if s.type not in (v4l2.BUF_TYPE_VIDEO_CAPTURE, CAPTURE):
            raise V4L2Error(errno.EINVAL, "selection is on CAPTURE")
        if s.target not in SELECTION_TARGETS:
            raise V4L2Error(errno.EINVAL, f"target {s.target}")
        s.r.left = s.r.top = 0
        s.r.width, s.r.height = self._rect(s.target)

    def ioctl_s_selection(self, s: v4l2.Selection, extra: bytes) -> None:
        """Read-only rectangles: COMPOSE and CROP are what they are."""
        if s.target not in (v4l2.SEL_TGT_COMPOSE, v4l2.SEL_TGT_CROP):
            raise V4L2Error(errno.EINVAL, f"target {s.target}")
        self.ioctl_g_selection(s, extra)

    # -- buffers ------------------------------------------------------------------------
    @staticmethod
    def _planes(b: v4l2.Buffer, extra: bytes) -> tuple[list[v4l2.Plane], bytes]:
        """The planes after a v4l2_buffer, and what follows them (USERPTR lists).
        Only a multi-planar buffer has them (the device checked its count);
        a single-planar one's ``length`` is bytes, which a guest may make
        anything: counting planes by it held QEMU's main loop for seconds."""
        if b.type not in v4l2.MPLANE_TYPES:
            return [], extra
        size = v4l2.C.sizeof(v4l2.Plane)
        n = b.length
        return [v4l2.Plane.parse(extra[i * size:]) for i in range(n)], extra[n * size:]

    def ioctl_reqbufs(self, req: v4l2.RequestBuffers, extra: bytes) -> None:
        queue = self._queue(req.type)
        if queue is self.output:
            queue.reqbufs(req, self.out_sizeimage)
            if req.count == 0:
                self._seek()
                self.known = False           # back to initialization
                if not self.capture.buffers:
                    self.geometry = self.hint
        else:
            size = self.cap_format().sizeimage
            queue.reqbufs(req, size, MIN_CAPTURE_BUFFERS)
            self.cap_alloc_size = size

    def ioctl_create_bufs(self, cb: v4l2.CreateBuffers, extra: bytes) -> None:
        queue = self._queue(cb.format.type)
        mp = cb.format.fmt.pix_mp
        asked = mp.plane_fmt[0].sizeimage
        if queue is self.output:
            needed, largest = self.out_sizeimage, MAX_OUTPUT_SIZEIMAGE
        else:
            wmin, wmax, hmin, hmax = self.decoder.size_range(self.coded)
            needed = self.cap_format().sizeimage
            largest = ImageFormat(RAW[self.raw], align(wmax), align(hmax)).sizeimage
        if cb.count and (mp.num_planes != 1 or asked < needed):
            # vb2's rule: buffers for the format, or larger.
            raise V4L2Error(errno.EINVAL, f"CREATE_BUFS of {mp.num_planes} planes, "
                            f"{asked} bytes for a {needed}-byte format")
        size = min(asked, largest)
        queue.create_bufs(cb, size)
        if cb.count and queue is self.capture:
            self.cap_alloc_size = min(self.cap_alloc_size or size, size)

    def ioctl_querybuf(self, b: v4l2.Buffer, extra: bytes) -> bytes:
        planes, _ = self._planes(b, extra)
        self._queue(b.type).querybuf(b, planes)
        return b"".join(map(bytes, planes))

    def _min_size(self, queue: BufferQueue) -> int:
        return self.cap_alloc_size if queue is self.capture else 1

    def _checked(self, b: v4l2.Buffer, extra: bytes) -> tuple[BufferQueue, list[v4l2.Plane],
                                                               bytes]:
        """The queue, planes and USERPTR lists of a buffer being queued."""
        planes, sg = self._planes(b, extra)
        queue = self._queue(b.type)
        prepared = b.index < len(queue.buffers) and queue.buffers[b.index].prepared
        if (queue is self.output and planes and not prepared
                and planes[0].bytesused > MAX_OUTPUT_SIZEIMAGE):
            # What the worker copies out of a buffer: at most this.
            raise V4L2Error(errno.EINVAL, f"more than {MAX_OUTPUT_SIZEIMAGE} bytes")
        return queue, planes, sg

    def ioctl_prepare_buf(self, b: v4l2.Buffer, extra: bytes) -> bytes:
        queue, planes, sg = self._checked(b, extra)
        buf = queue.prepare(b, planes, sg, self._min_size(queue))
        queue.fill(buf, b, planes)
        return b"".join(map(bytes, planes))

    def ioctl_qbuf(self, b: v4l2.Buffer, extra: bytes) -> bytes:
        queue, planes, sg = self._checked(b, extra)
        queue.qbuf(b, planes, sg, self._min_size(queue))
        self.cond.notify_all()
        return b"".join(map(bytes, planes))

    def ioctl_streamon(self, t: v4l2.Int, extra: bytes) -> None:
        queue = self._queue(t.value)
        if queue.streaming:
            return
        decoder = self.decoder
        if self.thread is None and len(decoder.streaming) >= decoder.max_streams:
            raise V4L2Error(errno.EBUSY, f"{decoder.max_streams} sessions decode already")
        queue.streamon()
        if queue is self.output:
            self.out_sequence = 0
        else:
            self.cap_sequence = 0
            self.stopped = None             # an implicit V4L2_DEC_CMD_START
        self._start_worker()
        self.cond.notify_all()

    def ioctl_streamoff(self, t: v4l2.Int, extra: bytes) -> None:
        queue = self._queue(t.value)
        if queue is self.output:
            queue.streamoff()
            self._seek()
            return
        queue.streamoff()
        if self.writing is not None:
            self.writing.cancelled = True
        self.need_last = False              # no LAST owed to a queue that is off
        if self.draining and not self.stopped:
            self._end_drain()               # the client gave up the drain

    def _seek(self) -> None:
        """STREAMOFF(OUTPUT): forget the bitstream, the pictures and a drain."""
        self.job = None                     # the worker drops what it decodes from it
        self.epoch += 1
        self.reset_engine = True
        self.pictures.clear()
        if self.writing is not None:
            self.writing.stale = True
        self._end_drain()
        self.stopped = None
        self.cond.notify_all()

    def _end_drain(self) -> None:
        self.draining = False
        self.drain_left = None
        self.drain_id += 1
        if Marker.EOS in self.pictures:
            self.pictures = deque(pic for pic in self.pictures if pic is not Marker.EOS)

    # -- decoder commands ---------------------------------------------------------------
    @staticmethod
    def _check_cmd(cmd: v4l2.DecoderCmd) -> None:
        if cmd.cmd not in (v4l2.DEC_CMD_START, v4l2.DEC_CMD_STOP):
            raise V4L2Error(errno.EINVAL, f"decoder command {cmd.cmd}")
        cmd.flags = 0
        v4l2.C.memset(v4l2.C.addressof(cmd.raw), 0, v4l2.C.sizeof(cmd.raw))

    def ioctl_try_decoder_cmd(self, cmd: v4l2.DecoderCmd, extra: bytes) -> None:
        self._check_cmd(cmd)

    def ioctl_decoder_cmd(self, cmd: v4l2.DecoderCmd, extra: bytes) -> None:
        self._check_cmd(cmd)
        # A drain stopped by a size change on its way goes on once resumed.
        busy = self.draining and self.stopped != "resolution"
        if busy:
            raise V4L2Error(errno.EBUSY, "a drain is in progress")
        if cmd.cmd == v4l2.DEC_CMD_STOP:
            if self.draining or self.stopped == "drain" or not self.output.streaming:
                return                      # nothing (more) to drain
            self.draining = True
            self.drain_id += 1
            self.drain_left = len(self.output.pending)
        else:
            self.stopped = None
        self.cond.notify_all()

    # -- lifecycle ----------------------------------------------------------------------
    def _start_worker(self) -> None:
        if self.thread is not None:
            return
        self.decoder.streaming.add(self.id)
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"pyemb-media-decoder{self.id}")
        self.thread.start()

    def close(self) -> None:
        """CMD_CLOSE or a device reset: the worker ends after its engine call;
        a copy into or out of a buffer is waited for (briefly), then every
        buffer goes."""
        with self.lock:
            if self.closed:
                return
            super().close()
            self.job = None
            self.pictures.clear()
            if self.writing is not None:
                self.writing.cancelled = self.writing.stale = True
            self.cond.notify_all()
            self.cond.wait_for(lambda: not any(b.busy for b in self.output.buffers
                                               + self.capture.buffers), STOP_TIMEOUT_S)
            self.output.free()
            self.capture.free()

    # -- the worker thread ----------------------------------------------------------------
    def answer_later(self, send: Callable[[], None]) -> bool:
        with self.lock:
            if not self.unpushed:
                return False
            self.deferred.append(send)
            return True

    def _pushed(self) -> None:
        """The worker's batch is on the used ring: the answers that waited
        for it go out."""
        with self.lock:
            self.unpushed = False
            deferred, self.deferred = self.deferred, []
        for send in deferred:
            send()

    def _completing(self) -> None:
        """Under the lock, before the worker completes a buffer or raises
        an event (the main loop's are pushed at once)."""
        if threading.current_thread() is self.thread:
            self.acted = self.unpushed = True

    def _run(self) -> None:
        """The worker: a step at a time, each with the lock only for
        bookkeeping.  What a step completes goes out in a batch
        (``handle.batch()``), pushed when the step ends, never while the
        worker holds the lock; ioctl answers that must not overtake it
        (answer_later) are sent after it."""
        set_native_name(f"pyemb-mdec-{self.id}")
        batch = self.device.handle.batch
        try:
            while True:
                with batch():
                    step = self._next_step()
                    if step is not None:
                        step()
                self._pushed()
                if step is None:
                    break
        except Exception as e:  # noqa: BLE001 - an engine or model bug ends this session only
            log.exception(self.device.handle.name, f"decoder session {self.id}", e)
            with batch():
                with self.lock:
                    self._fail()
        finally:
            self._pushed()
            if self.engine is not None:
                self.engine.close()
                self.engine = None
            give_back_free_memory()

    def _fail(self) -> None:
        if self.closed:
            return
        self.failed = True
        for queue in (self.output, self.capture):
            for b in queue.buffers:
                if b.busy:
                    queue.settle(b)
        self.writing = None
        self.cond.notify_all()
        self._completing()
        self.device.events.post(p.error_event(self.id, errno.EIO))

    def _next_step(self) -> Callable[[], None] | None:
        """Under the lock: wait for something to do; None ends the worker.
        Having completed a buffer or raised an event itself, it returns a
        step that does nothing, so that its batch is pushed before it waits."""
        with self.lock:
            while not self.closed:
                self.acted = False
                self._settle()
                write = None if self.acted else self._take_write()
                if write is not None:
                    return lambda: self._write_step(write)
                if self.acted:
                    return lambda: None
                if self._may_decode():
                    job = self.job or self._take_job()
                    if job is not None:
                        return lambda: self._decode_step(job)
                if self.drain_left == 0 and self.job is None and not self.stopped:
                    self.drain_left = None
                    epoch, drain_id, reset = self.epoch, self.drain_id, self.reset_engine
                    self.reset_engine = False
                    return lambda: self._flush_step(epoch, drain_id, reset)
                self.cond.wait()
            return None

    def _may_decode(self) -> bool:
        if self.stopped or len(self.pictures) >= PICTURE_BACKLOG:
            return False
        return self.job is not None or self.drain_left is None or self.drain_left > 0

    def _take_job(self) -> Job | None:
        buf = self.output.take()
        if buf is None:
            return None
        if self.drain_left is not None:
            self.drain_left -= 1
        buf.busy = True
        plane = buf.planes[0]
        self.job = Job(buf, plane.bytesused, plane.data_offset, buf.timestamp_us, self.coded,
                       self.reset_engine)
        self.reset_engine = False
        return self.job

    def _settle(self) -> None:
        """Under the lock: what needs no picture copy: a size change at the
        head of the pictures, an empty LAST buffer owed."""
        pictures = self.pictures
        if (pictures and pictures[0] is not Marker.EOS and not self.need_last
                and (not self.known or pictures[0].width != self.geometry[0]
                     or pictures[0].height != self.geometry[1])):
            self._source_change((pictures[0].width, pictures[0].height))
        if not self.capture.streaming:
            return
        if self.need_last:
            buf = self.capture.take()
            if buf is not None:
                self.need_last = False
                self.stopped = "resolution"
                self._complete_capture(buf, v4l2.BUF_FLAG_LAST, 0, 0)
        elif pictures and pictures[0] is Marker.EOS and not self.stopped:
            buf = self.capture.take()
            if buf is not None:
                pictures.popleft()
                self._complete_capture(buf, v4l2.BUF_FLAG_LAST, 0, 0)
                self._drain_done()

    def post_event(self, event: v4l2.Event) -> None:
        self._completing()
        super().post_event(event)

    def _source_change(self, size: tuple[int, int], last_here: bool = False) -> None:
        """The stream's size is ``size`` from the next picture on: the CAPTURE
        format says so and subscribers hear of it.  If CAPTURE streams, the
        pictures of the old size end with a LAST buffer (``last_here``: the
        one being completed) and the session stops, unless this is the first
        size and the client's buffers, made for its hint, fit it."""
        first = not self.known
        fits = align(size[0]) == align(self.geometry[0]) and align(size[1]) == align(
            self.geometry[1])
        self.geometry, self.known = size, True
        event = v4l2.Event(type=v4l2.EVENT_SOURCE_CHANGE)
        event.u.changes = v4l2.EVENT_SRC_CH_RESOLUTION
        self.post_event(event)
        if not self.capture.streaming or (first and fits):
            return
        if last_here:
            self.stopped = "resolution"
        else:
            self.need_last = True

    def _drain_done(self) -> None:
        self.draining = False
        self.stopped = "drain"
        self.post_event(v4l2.Event(type=v4l2.EVENT_EOS))

    def _complete_capture(self, buf: Buffer, flags: int, bytesused: int,
                          timestamp: int) -> None:
        buf.flags = flags
        buf.planes[0].bytesused = bytesused
        buf.timestamp_us = timestamp
        buf.sequence = self.cap_sequence
        if bytesused:
            self.cap_sequence += 1
        self._completing()
        done = self.capture.dequeue(buf)
        if done is not None:
            self.post_dqbuf(*done)

    def _take_write(self) -> Write | None:
        """Under the lock: the next picture and the CAPTURE buffer for it."""
        while (self.pictures and self.pictures[0] is not Marker.EOS and self.known
               and not self.stopped and not self.need_last and self.capture.streaming):
            pic = self.pictures[0]
            if (pic.width, pic.height) != self.geometry:
                return None                 # _settle announces it first
            buf = self.capture.take()
            if buf is None:
                return None
            fmt = self.cap_format((pic.width, pic.height))
            if buf.planes[0].length < fmt.sizeimage:
                self.warn("small", f"CAPTURE buffer {buf.index} of {buf.planes[0].length} "
                          f"bytes for a {fmt.sizeimage}-byte picture")
                self._complete_capture(buf, v4l2.BUF_FLAG_ERROR, 0, pic.timestamp)
                continue
            self.pictures.popleft()
            buf.busy = True
            self.writing = Write(pic, buf, fmt, buf.views(self.shm))
            return self.writing
        return None

    def _write_step(self, write: Write) -> None:
        """Without the lock: copy the picture; then complete its buffer."""
        error = None
        try:
            self._render(write)
        except ValueError as e:
            error = str(e)
        with self.lock:
            self.capture.settle(write.buf)
            self.writing = None
            self.cond.notify_all()
            if self.closed:
                return
            pic = write.picture
            if write.cancelled:
                if not write.stale:
                    self.pictures.appendleft(pic)   # it waits for the next buffer
                return
            if error is not None:
                self.warn("write", f"writing a picture: {error}")
                self._complete_capture(write.buf, v4l2.BUF_FLAG_ERROR, 0, pic.timestamp)
                return
            flags = 0
            for flag, v4l2_flag in PICTURE_FLAGS.items():
                if pic.flags & flag:
                    flags |= v4l2_flag
            # The drain's end (Marker.EOS) is not marked here: _settle
            # gives it an empty buffer of its own (see the module docstring).
            following = self.pictures[0] if self.pictures else None
            if (following is not None and following is not Marker.EOS
                    and (following.width, following.height) != (pic.width, pic.height)):
                self._source_change((following.width, following.height), last_here=True)
                if self.stopped:
                    flags |= v4l2.BUF_FLAG_LAST
            self._complete_capture(write.buf, flags, write.fmt.sizeimage, pic.timestamp)

    def _render(self, write: Write) -> None:
        fmt, views = write.fmt, write.views
        name = Format.NV12 if fmt.fourcc == NV12 else Format.YUV420
        size = fmt.sizeimage
        if len(views) == 1 and len(views[0]) >= size:
            target = np.frombuffer(views[0], np.uint8, size)
            write.picture.write_into(name, target, fmt.layout())
            del target
        else:
            scratch = np.zeros(size, np.uint8)
            write.picture.write_into(name, scratch, fmt.layout())
            scatter(views, scratch)

    def _engine_for(self, fmt: Format, reset: bool) -> DecodeSession:
        """On the worker: the engine session for ``fmt``, reset if asked."""
        if self.engine is not None and self.engine_format != fmt:
            self.engine.close()
            self.engine = None
        if self.engine is None:
            self.engine = self.decoder.backend.open_session(fmt)
            self.engine_format = fmt
        elif reset:
            self.engine.reset()
        return self.engine

    def _decode_step(self, job: Job) -> None:
        """Without the lock: feed the job's bitstream to the engine (first
        time), take one picture from it; then keep it, and hand the OUTPUT
        buffer back once all its pictures are out."""
        if job.pictures is None:
            data = job.buf.read(self.shm, job.length)[job.data_offset:] if job.length else b""
            with self.lock:
                self.output.settle(job.buf)
                self.cond.notify_all()
                if self.job is not job:
                    return
            engine = self._engine_for(job.fmt, job.reset)
            job.pictures = iter(())         # an empty buffer (FFmpeg's parser would flush)
            if data:
                try:
                    job.pictures = engine.decode_each(data, job.timestamp)
                except DecodeError as e:
                    self._decode_failed(job, e)
        engine = self.engine
        assert engine is not None
        picture, done = None, False
        try:
            picture = next(job.pictures)
        except StopIteration:
            done = True
        except DecodeError as e:
            self._decode_failed(job, e)
            done = True
        size = engine.size
        with self.lock:
            if self.job is not job or self.closed:
                return
            if picture is not None:
                self.pictures.append(picture)
            if not self.known and not self.pictures and size is not None:
                # Headers seen, no picture yet (a reordering decoder
                # holds the first ones back): announce the size now.
                self._source_change(size)
            if done:
                self.job = None
                buf = job.buf
                buf.flags = v4l2.BUF_FLAG_ERROR if job.error else 0
                buf.sequence = self.out_sequence
                self.out_sequence += 1
                self._completing()
                finished = self.output.dequeue(buf)
                if finished is not None:
                    self.post_dqbuf(*finished)

    def _decode_failed(self, job: Job, e: DecodeError) -> None:
        job.error = True
        self.warn("corrupt", f"corrupt bitstream in OUTPUT buffer {job.buf.index}: {e}")

    def _flush_step(self, epoch: int, drain_id: int, reset: bool) -> None:
        """Without the lock: every picture left in the engine; then the
        drain's end marker behind them."""
        pictures: list[Picture] = []
        if self.engine is not None and reset:
            self.engine.reset()             # a seek came: nothing of before it is left
        elif self.engine is not None:
            try:
                pictures = self.engine.flush()
            except DecodeError as e:
                self.warn("corrupt", f"corrupt bitstream at the drain: {e}")
        with self.lock:
            if self.epoch != epoch or self.closed:
                return
            self.pictures.extend(pictures)
            if self.draining and self.drain_id == drain_id:
                self.pictures.append(Marker.EOS)
            self.cond.notify_all()
