"""Video engines for virtio-video-py.

A backend reports what it can do (``capabilities``, ``profiles``, ``levels``)
and opens one :class:`DecodeSession` per decoder stream and one
:class:`EncodeSession` per encoder stream.  A decode session turns
bitstream chunks into :class:`Picture` objects; an encode session turns
:class:`RawImage` pictures into :class:`Packet` objects.  The device models
(:mod:`pyemb.video.decoder`, :mod:`pyemb.video.encoder`) own the protocol,
the buffers and the threads.  The default engine is PyAV (FFmpeg, the
encoders in :mod:`pyemb.pyav_encoder`); another engine is one class.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyemb.config import ConfigError
from pyemb.pyav_swscale import Converter, plane_shapes
from pyemb.video.protocol import (
    BufferFlag,
    Format,
    FormatDesc,
    FormatFrame,
    QueueType,
    Range,
)


class DecodeError(Exception):
    """The bitstream chunk could not be decoded."""


# What the stateful decoders (virtio-video's and virtio-media's) say of
# sizes: the coded size is the visible one rounded up to whole macroblocks;
# before the stream or the client names a size, both queues report
# DEFAULT_SIZE (V4L2 clients and v4l2-compliance refuse a 0x0 format); a
# bitstream buffer holds INPUT_BUFFER_SIZE bytes unless the client asks.
ALIGN = 16
DEFAULT_SIZE = (640, 480)
INPUT_BUFFER_SIZE = 1 << 20


def align(v: int, a: int = ALIGN) -> int:
    return (v + a - 1) // a * a


# FFmpeg's parsers read up to AV_INPUT_BUFFER_PADDING_SIZE bytes past the
# end of their input (av_parser_parse2: "the full buffer size is assumed to
# be buf_size + AV_INPUT_BUFFER_PADDING_SIZE"), and PyAV's parse() hands
# them the buffer it is given as is.
PARSER_PADDING = 64


def padded(data) -> memoryview:
    """``data`` as a view whose memory goes on for PARSER_PADDING zero bytes
    (make sanitize: ASan saw the parsers read 64 bytes past a bytes object)."""
    buf = bytearray(len(data) + PARSER_PADDING)
    buf[:len(data)] = data
    return memoryview(buf)[:len(data)]


@dataclass
class Picture:
    """A decoded picture, visible size, with the timestamp of the input
    buffer its first byte came from."""

    width: int
    height: int
    timestamp: int
    flags: int                      # BufferFlag.IFRAME / PFRAME / BFRAME
    frame: Any                      # engine-specific

    def planes(self, fmt: Format) -> list[np.ndarray]:
        """The visible picture as 2-D uint8 arrays, one per plane of ``fmt``
        (NV12: Y, interleaved UV; YUV420: Y, U, V)."""
        raise NotImplementedError

    def write_into(self, fmt: Format, target: np.ndarray,
                   layout: list[tuple[int, int]]) -> None:
        """Write the visible picture as ``fmt`` into the flat uint8 array
        ``target``, each plane at its (offset, stride).  An engine that can
        convert straight into the target overrides this."""
        fill(target, layout, self.planes(fmt))


def fill(target: np.ndarray, layout: list[tuple[int, int]], planes: list[np.ndarray]) -> None:
    """Copy each plane's rows to ``target`` at (offset, stride)."""
    for (offset, stride), rows in zip(layout, planes, strict=True):
        height, width = rows.shape
        if offset < 0 or stride < width:
            raise ValueError("plane layout does not fit the picture")
        target[offset:offset + stride * height].reshape(height, stride)[:, :width] = rows


class DecodeSession:
    """One stream's decoder.  Called from the stream's worker thread only."""

    def decode(self, data: bytes, timestamp: int) -> list[Picture]:
        """Feed a chunk of bitstream (any size, not necessarily whole frames)."""
        raise NotImplementedError

    def decode_each(self, data: bytes, timestamp: int) -> Iterator[Picture]:
        """:meth:`decode`, the pictures handed out one at a time: an engine
        that can decode lazily does so as they are asked for, so a caller
        that stops taking them (its pictures wait for guest buffers) holds
        only the chunk's undecoded bitstream.  The chunk is taken at once;
        the iterator must be used up (or dropped, before :meth:`reset`)
        before the next call.  By default, :meth:`decode`'s list."""
        return iter(self.decode(data, timestamp))

    def flush(self) -> list[Picture]:
        """End of stream: every picture still inside the decoder."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything fed so far (QUEUE_CLEAR of the input queue)."""

    @property
    def profile_level(self) -> tuple[int | None, int | None]:
        """The stream's PROFILE and LEVEL control values once its headers
        were seen (None where unknown)."""
        return None, None

    @property
    def size(self) -> tuple[int, int] | None:
        """The stream's visible size once the headers were seen, else None.
        Lets the device announce the resolution before the first picture
        (which a reordering decoder may hold back)."""
        return None

    def close(self) -> None:
        pass

@dataclass(frozen=True)
class EncoderSettings:
    """What an encode session is opened with; a change of any of them takes
    effect at the next picture, in a new session (its first picture a
    keyframe with its headers)."""

    coded: Format
    width: int
    height: int
    frame_rate: int               # pictures per second
    bitrate: int                  # bits per second: the target (VBR) or the rate (CBR)
    peak_bitrate: int             # VBR's ceiling
    cbr: bool
    profile: int | None = None    # virtio-video PROFILE value; None: the engine's default
    level: int | None = None      # virtio-video LEVEL value (H.264); a floor, see h264_level
    prepend_headers: bool = False  # headers (SPS/PPS) before every keyframe, not just the first


@dataclass
class RawImage:
    """A raw picture in memory the device owns (a guest buffer, or the copy
    of a scattered one): ``fmt`` (NV12 or YUV420) of ``width`` x
    ``height``, each plane at (offset, stride) from ``address``, all within
    ``size`` bytes.  Valid only during :meth:`EncodeSession.take`."""

    fmt: Format
    width: int
    height: int
    address: int
    size: int
    layout: list[tuple[int, int]]


@dataclass
class Packet:
    """One encoded frame (a whole access unit), with the timestamp of the
    picture it encodes."""

    data: bytes
    timestamp: int
    flags: int                    # BufferFlag.IFRAME / PFRAME / BFRAME


class EncodeSession:
    """One stream's encoder.  Called from the stream's worker thread only."""

    def take(self, image: RawImage) -> Any:
        """Copy ``image`` into the engine's own picture (the guest buffer is
        handed back right after); returns what :meth:`encode` takes."""
        raise NotImplementedError

    def encode(self, picture: Any, timestamp: int, keyframe: bool) -> list[Packet]:
        """Encode a picture from :meth:`take`; ``keyframe`` forces it to be one."""
        raise NotImplementedError

    def flush(self) -> list[Packet]:
        """End of stream: every packet still inside the encoder."""
        raise NotImplementedError

    def close(self) -> None:
        pass


# Coded formats and the FFmpeg decoder that handles each.
FFMPEG_DECODERS = {
    Format.H264: "h264",
    Format.HEVC: "hevc",
    Format.VP8: "vp8",
    Format.VP9: "vp9",
    Format.MPEG2: "mpeg2video",
    Format.MPEG4: "mpeg4",
}
RAW_OUTPUTS = (Format.NV12, Format.YUV420)

# Sizes FFmpeg's software decoders handle, any width and height in between
# (odd sizes decode too: the visible rectangle of an aligned coded size).  The
# ChromeOS driver reports a range as V4L2_FRMSIZE_TYPE_CONTINUOUS, which
# requires steps of 1.
FRAME = FormatFrame(width=Range(16, 4096, 1), height=Range(16, 4096, 1),
                    frame_rates=(Range(1, 120, 1),))
# Sizes the encoders take: even ones (x264 and x265 refuse odd 4:2:0 sizes).
ENCODE_FRAME = FormatFrame(width=Range(16, 4096, 2), height=Range(16, 4096, 2),
                           frame_rates=(Range(1, 120, 1),))


class VideoBackend:
    """Interface of a video engine.  Construct with the device's config."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = config or {}

    def coded_formats(self) -> list[Format]:
        """Bitstream formats this engine decodes (or encodes to)."""
        raise NotImplementedError

    def raw_formats(self) -> list[Format]:
        """Picture formats it writes (or reads)."""
        return list(RAW_OUTPUTS)

    def capabilities(self, queue_type: QueueType) -> list[FormatDesc]:
        """QUERY_CAPABILITY for a decoder: coded formats on INPUT, raw on
        OUTPUT, every input compatible with every output."""
        coded, raw = self.coded_formats(), self.raw_formats()
        if queue_type == QueueType.INPUT:
            mask = (1 << len(raw)) - 1
            return [FormatDesc(f, mask=mask, frames=(FRAME,)) for f in coded]
        mask = (1 << len(coded)) - 1
        return [FormatDesc(f, mask=mask, frames=(FRAME,)) for f in raw]

    def profiles(self, fmt: Format) -> list[int]:
        """PROFILE control values supported for a coded format."""
        return list(PROFILES.get(fmt, ()))

    def levels(self, fmt: Format) -> list[int]:
        """LEVEL control values supported for a coded format."""
        return list(LEVELS.get(fmt, ()))

    def open_session(self, fmt: Format) -> DecodeSession:
        """A decoder for one stream of coded format ``fmt``."""
        raise NotImplementedError

    # -- encoding (an engine that does not encode keeps these) -------------------------
    def encoded_formats(self) -> list[Format]:
        """Bitstream formats this engine encodes to."""
        return []

    def encoder_capabilities(self, queue_type: QueueType) -> list[FormatDesc]:
        """QUERY_CAPABILITY for an encoder: raw formats on INPUT, coded on
        OUTPUT, every input compatible with every output."""
        coded, raw = self.encoded_formats(), self.raw_formats()
        if queue_type == QueueType.INPUT:
            mask = (1 << len(coded)) - 1
            return [FormatDesc(f, mask=mask, frames=(ENCODE_FRAME,)) for f in raw]
        mask = (1 << len(raw)) - 1
        return [FormatDesc(f, mask=mask, frames=(ENCODE_FRAME,)) for f in coded]

    def encoder_profiles(self, fmt: Format) -> list[int]:
        """PROFILE values an encoder of ``fmt`` produces; the first is the default."""
        return []

    def encoder_levels(self, fmt: Format) -> list[int]:
        """LEVEL values an encoder of ``fmt`` may be asked for."""
        return []

    def open_encoder(self, settings: EncoderSettings) -> EncodeSession:
        """An encoder for one stream (a new one whenever the settings change)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release everything; the device is going away."""


# What FFmpeg's software decoders handle (virtio-video profile values):
# H.264 without EXTENDED (no data partitioning) and without the SVC/MVC
# profiles; every HEVC, VP8 and VP9 profile of the enumeration.
PROFILES = {
    Format.H264: (0x100, 0x101, 0x103, 0x104, 0x105, 0x106),
    Format.HEVC: (0x200, 0x201, 0x202),
    Format.VP8: (0x300, 0x301, 0x302, 0x303),
    Format.VP9: (0x400, 0x401, 0x402, 0x403),
}
LEVELS = {Format.H264: tuple(range(0x100, 0x10F))}

PICT_FLAGS = {1: BufferFlag.IFRAME, 2: BufferFlag.PFRAME, 3: BufferFlag.BFRAME}

# FFmpeg's profile names -> virtio-video PROFILE values.
PROFILE_NAMES = {
    "h264": {"Baseline": 0x100, "Constrained Baseline": 0x100, "Main": 0x101,
             "Extended": 0x102, "High": 0x103, "High 10": 0x104, "High 4:2:2": 0x105,
             "High 4:4:4 Predictive": 0x106},
    "hevc": {"Main": 0x200, "Main 10": 0x201, "Main Still Picture": 0x202},
    "vp9": {f"Profile {i}": 0x400 + i for i in range(4)},
    "vp8": {},
}
# H.264 level_idc -> virtio-video LEVEL values (1.0 .. 5.1)
H264_LEVELS = {10: 0x100, 11: 0x101, 12: 0x102, 13: 0x103, 20: 0x104, 21: 0x105, 22: 0x106,
               30: 0x107, 31: 0x108, 32: 0x109, 40: 0x10A, 41: 0x10B, 42: 0x10C, 50: 0x10D,
               51: 0x10E}


class PyAVPicture(Picture):
    converter: Converter | None = None      # the session's, set when it has one

    def write_into(self, fmt: Format, target: np.ndarray,
                   layout: list[tuple[int, int]]) -> None:
        name = "nv12" if fmt == Format.NV12 else "yuv420p"
        if self.converter is not None and self.converter.write(
                self.frame, name, self.width, self.height, target.ctypes.data, target.nbytes,
                layout):
            return
        super().write_into(fmt, target, layout)

    def planes(self, fmt: Format) -> list[np.ndarray]:
        name = "nv12" if fmt == Format.NV12 else "yuv420p"
        frame = self.frame
        if frame.format.name != name:
            frame = frame.reformat(format=name, threads=1)
        out = []
        for plane, (rows, row_bytes) in zip(frame.planes,
                                            plane_shapes(name, self.width, self.height),
                                            strict=True):
            a = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
            out.append(a[:rows, :row_bytes])
        return out


class PyAVSession(DecodeSession):
    """Parse with the codec's parser (chunks need not be whole frames), then
    decode.  A packet gets the timestamp of the input chunk that holds its
    first byte; FFmpeg carries it through reordering to the picture."""

    def __init__(self, codec_name: str, threads: int = 0) -> None:
        import av

        self._av = av
        self.codec_name = codec_name
        self.threads = threads
        self.converter = Converter()
        self._open()

    def _open(self) -> None:
        ctx = self._av.CodecContext.create(self.codec_name, "r")
        ctx.thread_type = "AUTO"           # SLICE alone stays single-threaded
        ctx.thread_count = self.threads
        self.ctx = ctx
        self.fed = 0                         # bitstream bytes fed to the parser
        self.emitted = 0                     # bytes handed out in packets
        self.chunks: deque[tuple[int, int]] = deque()   # (start offset, timestamp)
        self.next_pts = 0
        self.timestamps: dict[int, int] = {}

    def _timestamp_at(self, offset: int) -> int:
        while len(self.chunks) > 1 and self.chunks[1][0] <= offset:
            self.chunks.popleft()
        return self.chunks[0][1] if self.chunks else 0

    def _pictures(self, packets) -> Iterator[Picture]:
        """Decode ``packets`` as the pictures are asked for."""
        for packet in packets:
            if packet is not None:
                pts = self.next_pts
                self.next_pts += 1
                self.timestamps[pts] = self._timestamp_at(self.emitted)
                self.emitted += packet.size
                packet.pts = packet.dts = pts
            try:
                frames = self.ctx.decode(packet)
            except self._av.error.FFmpegError as e:
                raise DecodeError(str(e)) from e
            for frame in frames:
                ts = self.timestamps.pop(frame.pts, 0) if frame.pts is not None else 0
                picture = PyAVPicture(frame.width, frame.height, ts,
                                      PICT_FLAGS.get(int(frame.pict_type), 0), frame)
                picture.converter = self.converter
                yield picture

    def _decode_packets(self, packets) -> list[Picture]:
        return list(self._pictures(packets))

    def decode(self, data: bytes, timestamp: int) -> list[Picture]:
        return list(self.decode_each(data, timestamp))

    def decode_each(self, data: bytes, timestamp: int) -> Iterator[Picture]:
        self.chunks.append((self.fed, timestamp))
        self.fed += len(data)
        try:
            packets = self.ctx.parse(padded(data))
        except self._av.error.FFmpegError as e:
            raise DecodeError(str(e)) from e
        return self._pictures(packets)

    def flush(self) -> list[Picture]:
        pictures = self._decode_packets(self.ctx.parse(None))
        pictures += self._decode_packets([None])
        # Ready for more after a drain: the parser is flushed, the decoder
        # too; a VP9 one is made anew (the pictures out keep what they refer
        # to).  FFmpeg 8's frame-threaded VP9 decoder, reused after EOF and
        # avcodec_flush_buffers, jumped to a null pointer at the next inter
        # frame: a guest's drain and more input killed QEMU (SIGSEGV; found
        # by the protocol fuzzer).  A VP9 stream resumes at a keyframe, which
        # carries its headers; H.264 and HEVC keep their parameter sets.
        if self.codec_name == "vp9":
            self._open()
        else:
            self.ctx.flush_buffers()
            self.timestamps.clear()
        return pictures

    def reset(self) -> None:
        self.ctx.flush_buffers()
        self._open()

    @property
    def profile_level(self) -> tuple[int | None, int | None]:
        if self.ctx is None:
            return None, None
        profile = PROFILE_NAMES.get(self.codec_name, {}).get(self.ctx.profile or "")
        level = (H264_LEVELS.get(getattr(self.ctx, "level", -1))
                 if self.codec_name == "h264" else None)
        return profile, level

    @property
    def size(self) -> tuple[int, int] | None:
        if self.ctx is not None and self.ctx.width and self.ctx.height:
            return (self.ctx.width, self.ctx.height)
        return None

    def close(self) -> None:
        self.ctx = None
        self.converter.close()


class PyAVBackend(VideoBackend):
    """FFmpeg through PyAV.  Options (``[backend]`` table): ``threads``,
    decoder threads per stream (0: FFmpeg's choice), and ``[backend.encoders.<codec>]``
    tables (see :mod:`pyemb.pyav_encoder`): which FFmpeg encoder makes each
    coded format, with its options."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        from pyemb.pyav_encoder import encoder_choices

        # Checked now: a bad encoder table stops QEMU before the guest starts.
        self.encoders = encoder_choices(self.config.get("encoders", {}))

    def encoded_formats(self) -> list[Format]:
        return list(self.encoders)

    def encoder_profiles(self, fmt: Format) -> list[int]:
        choice = self.encoders.get(fmt)
        return list(choice.profiles) if choice is not None else []

    def encoder_levels(self, fmt: Format) -> list[int]:
        choice = self.encoders.get(fmt)
        return list(choice.levels) if choice is not None else []

    def open_encoder(self, settings: EncoderSettings) -> EncodeSession:
        from pyemb.pyav_encoder import PyAVEncodeSession

        if settings.coded not in self.encoders:
            raise ConfigError(f"no encoder for {settings.coded.name}")
        return PyAVEncodeSession(self.encoders[settings.coded], settings)

    def open_session(self, fmt: Format) -> DecodeSession:
        return PyAVSession(FFMPEG_DECODERS[fmt], int(self.config.get("threads", 0)))

    def coded_formats(self) -> list[Format]:
        import av

        found = []
        for fmt, name in FFMPEG_DECODERS.items():
            try:
                av.codec.Codec(name, "r")
            except Exception:  # noqa: BLE001 - codec missing from this FFmpeg build
                continue
            found.append(fmt)
        return found
