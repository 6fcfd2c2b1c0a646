"""Encoding with FFmpeg's encoders through PyAV: the default encode engine.

Which FFmpeg encoder makes each coded format, and with which options, comes
from the device config (``[backend.encoders.<codec>]``, see
:func:`encoder_choices`); the defaults are FFmpeg's software encoders set up
for a VM's camera or screen stream: one packet out for each picture in, no
B-frames, no look-ahead.

The protocol's settings (bitrate, VBR or CBR, peak, profile, level) become
the encoder's AVOptions when a session opens; a session never changes them
afterwards, because PyAV can set only some of them on an open encoder and
the encoders apply even fewer (a measured fact: libx264, libx265 and libvpx
all went on at the old bitrate after ``bit_rate`` changed).  The device
opens a new session instead (:mod:`pyemb.video.encoder`).

H.264 and HEVC streams are made with the encoder's headers (SPS/PPS, and the
VPS of HEVC) kept apart (``GLOBAL_HEADER``) and put back here: in front of
the first packet of a session, and of every keyframe when the
PREPEND_SPSPPS_TO_IDR control asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from typing import Any

from pyemb.config import ConfigError
from pyemb.pyav_swscale import Converter
from pyemb.video.protocol import BufferFlag, Format
from pyemb.video_backend import EncoderSettings, EncodeSession, Packet, RawImage


class EncodeError(Exception):
    """The encoder refused a picture or its settings."""


# Config key -> coded format.
CODEC_KEYS = {"h264": Format.H264, "hevc": Format.HEVC, "vp8": Format.VP8, "vp9": Format.VP9}

# The default encoder of each format and its options.
DEFAULT_ENCODERS: dict[Format, tuple[str, dict[str, str]]] = {
    Format.H264: ("libx264", {"preset": "veryfast", "tune": "zerolatency"}),
    Format.HEVC: ("libx265", {"preset": "ultrafast", "tune": "zerolatency"}),
    Format.VP8: ("libvpx", {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}),
    Format.VP9: ("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8",
                                "lag-in-frames": "0", "row-mt": "1"}),
}

# What each known encoder makes of the PROFILE control (virtio-video value ->
# the encoder's "profile" option), from 8-bit 4:2:0 pictures.  The first one
# is a stream's default.
X264_PROFILES = {0x101: "main", 0x100: "baseline", 0x103: "high"}
X265_PROFILES = {0x200: "main"}
VP8_PROFILES = {0x300 + i: str(i) for i in range(4)}
VP9_PROFILES = {0x400: "0"}

# H.264 levels (Annex A, table A-1): virtio-video LEVEL value -> (name,
# max macroblocks per second, max frame size in macroblocks, max bitrate in
# kbit/s for Baseline and Main).
H264_LEVELS = {
    0x100: ("1", 1485, 99, 64), 0x101: ("1.1", 3000, 396, 192),
    0x102: ("1.2", 6000, 396, 384), 0x103: ("1.3", 11880, 396, 768),
    0x104: ("2", 11880, 396, 2000), 0x105: ("2.1", 19800, 792, 4000),
    0x106: ("2.2", 20250, 1620, 4000), 0x107: ("3", 40500, 1620, 10000),
    0x108: ("3.1", 108000, 3600, 14000), 0x109: ("3.2", 216000, 5120, 20000),
    0x10A: ("4", 245760, 8192, 20000), 0x10B: ("4.1", 245760, 8192, 50000),
    0x10C: ("4.2", 522240, 8704, 50000), 0x10D: ("5", 589824, 22080, 135000),
    0x10E: ("5.1", 983040, 36864, 240000),
}


def h264_level(settings: EncoderSettings) -> int:
    """The level a stream signals: the one asked for, or the lowest that
    holds its size, rate and bitrate where the one asked for cannot (the
    ChromeOS driver asks for 1.0, its menu's minimum, on every open)."""
    mbs = ((settings.width + 15) // 16) * ((settings.height + 15) // 16)
    rate = max(settings.bitrate, settings.peak_bitrate if not settings.cbr else 0)
    high = 1.25 if settings.profile == 0x103 else 1.0
    for value, (_, mbps, frame_mbs, kbps) in H264_LEVELS.items():
        if settings.level is not None and value < settings.level:
            continue
        if (mbs <= frame_mbs and mbs * settings.frame_rate <= mbps
                and rate <= kbps * 1000 * high):
            return value
    return max(H264_LEVELS)


@dataclass(frozen=True)
class EncoderChoice:
    """The FFmpeg encoder that makes one coded format, and how."""

    coded: Format
    codec: str                                  # FFmpeg encoder name
    options: dict[str, str] = field(default_factory=dict)
    threads: int = 0                            # 0: the encoder decides
    bframes: int = 0
    keyframe_interval: int = 0                  # pictures; 0: the encoder's default
    profiles: dict[int, str] = field(default_factory=dict)
    levels: tuple[int, ...] = ()

    @property
    def family(self) -> str:
        """How the protocol's settings map onto this encoder's options."""
        return {"libx264": "x264", "libx265": "x265", "libvpx": "vpx",
                "libvpx-vp9": "vpx"}.get(self.codec, "ffmpeg")


def _known_profiles(codec: str) -> dict[int, str]:
    return {"libx264": X264_PROFILES, "libx265": X265_PROFILES, "libvpx": VP8_PROFILES,
            "libvpx-vp9": VP9_PROFILES}.get(codec, {})


def _profiles_offered(codec: str, coded: Format) -> dict[int, str]:
    """The PROFILE values an encoder we do not know names among its own
    ``profile`` choices (x264's names), else its default alone."""
    names = {Format.H264: X264_PROFILES, Format.HEVC: X265_PROFILES}.get(coded, {})
    own = private_options(codec).get("profile", ())
    offered = {value: name for value, name in names.items() if name in own}
    return offered or {{Format.H264: 0x101, Format.HEVC: 0x200, Format.VP8: 0x300,
                        Format.VP9: 0x400}[coded]: ""}


def _encoder_exists(codec: str) -> bool:
    import av

    try:
        av.codec.Codec(codec, "w")
    except Exception:  # noqa: BLE001 - not in this FFmpeg build
        return False
    return True


def encoder_choices(table: Any) -> dict[Format, EncoderChoice]:
    """The encoders of the config's ``[backend.encoders]`` table, which
    holds one table per coded format (h264, hevc, vp8, vp9)::

        [backend.encoders.h264]
        codec = "libx264"                       # any FFmpeg encoder of H.264
        options = { preset = "veryfast", tune = "zerolatency" }   # its AVOptions
        threads = 0                             # 0: the encoder decides
        bframes = 0                             # B-frames (adds latency)
        keyframe_interval = 0                   # pictures; 0: the encoder's default

    A format without a table gets its default encoder where this FFmpeg has
    it (``codec = ""`` turns the format off).  A mistake raises
    :class:`ConfigError` with one line that says what to fix."""
    if not isinstance(table, dict):
        raise ConfigError("config: [backend.encoders] must be a table")
    unknown = set(table) - set(CODEC_KEYS)
    if unknown:
        raise ConfigError(f"config: backend.encoders.{sorted(unknown)[0]}: not one of "
                          f"{', '.join(CODEC_KEYS)}")
    choices = {}
    for key, coded in CODEC_KEYS.items():
        where = f"backend.encoders.{key}"
        entry = table.get(key, {})
        if not isinstance(entry, dict):
            raise ConfigError(f"config: [{where}] must be a table")
        default_codec, default_options = DEFAULT_ENCODERS[coded]
        codec = entry.get("codec", default_codec)
        if not isinstance(codec, str):
            raise ConfigError(f"config: {where}.codec must be an FFmpeg encoder name")
        if not codec:
            continue
        if not _encoder_exists(codec):
            if "codec" in entry:
                raise ConfigError(f"config: {where}.codec: this FFmpeg has no encoder {codec}")
            continue                            # a default this FFmpeg build lacks
        options = entry.get("options", default_options if codec == default_codec else {})
        if not isinstance(options, dict) or not all(
                isinstance(v, (str, int, float)) and not isinstance(v, bool)
                for v in options.values()):
            raise ConfigError(f"config: {where}.options must be a table of strings or numbers")
        numbers = {}
        for name, hi in (("threads", 64), ("bframes", 16), ("keyframe_interval", 100000)):
            value = entry.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
                raise ConfigError(f"config: {where}.{name} must be an integer from 0 to {hi}")
            numbers[name] = value
        profiles = _known_profiles(codec) or _profiles_offered(codec, coded)
        levels = tuple(H264_LEVELS) if coded == Format.H264 else ()
        choices[coded] = EncoderChoice(coded, codec, {k: str(v) for k, v in options.items()},
                                       profiles=profiles, levels=levels, **numbers)
    return choices


def _rate_control(choice: EncoderChoice, s: EncoderSettings) -> dict[str, str]:
    """The AVOptions that give the stream its bitrate."""
    rate, peak = str(s.bitrate), str(max(s.peak_bitrate, s.bitrate))
    options = {"b": rate}
    if s.cbr:
        options.update(maxrate=rate, bufsize=rate)
        if choice.family in ("vpx", "ffmpeg"):
            options["minrate"] = rate            # libvpx's CBR: min = max = target
    else:
        options.update(maxrate=peak, bufsize=peak)
    return options


def _params(options: dict[str, str], key: str, extra: str) -> None:
    """Append ``extra`` to an x264-params / x265-params option."""
    options[key] = f"{options[key]}:{extra}" if options.get(key) else extra


@cache
def private_options(codec: str) -> dict[str, tuple[str, ...]]:
    """An FFmpeg encoder's own AVOptions and the named choices of each."""
    import av

    ctx = av.CodecContext.create(codec, "w")
    return {o.name: tuple(c.name for c in (getattr(o, "choices", None) or ()))
            for o in ctx.supported_options.private}


def encoder_options(choice: EncoderChoice,
                    settings: EncoderSettings) -> tuple[dict[str, str], int | None]:
    """The AVOptions an encoder is opened with (the config's, then what the
    protocol's settings make of them), and the profile to set on the codec
    context where the encoder takes it from there (libvpx).  For an encoder
    that is not one of the four known ones (h264_nvenc, say), its own
    options are looked up: ``rc`` (cbr / vbr), ``forced-idr`` and
    ``profile`` where it has them."""
    options = dict(choice.options)
    context_profile = None
    options.update(_rate_control(choice, settings))
    profile = choice.profiles.get(settings.profile or -1, "")
    if choice.family == "x264":
        options["forced-idr"] = "1"          # a forced keyframe is an IDR
        if profile:
            options["profile"] = profile
        options["level"] = H264_LEVELS[h264_level(settings)][0]
        if settings.cbr:
            _params(options, "x264-params", "nal-hrd=cbr")
    elif choice.family == "x265":
        options["forced-idr"] = "1"
        _params(options, "x265-params", "log-level=none")   # x265 writes to stderr
        if profile:
            options["profile"] = profile
        if settings.cbr:
            _params(options, "x265-params", "strict-cbr=1")
    elif choice.family == "vpx":
        if profile:
            context_profile = int(profile)
    else:
        own = private_options(choice.codec)
        mode = "cbr" if settings.cbr else "vbr"
        if mode in own.get("rc", ()):
            options["rc"] = mode
        if "forced-idr" in own:
            options["forced-idr"] = "1"
        if profile and profile in own.get("profile", ()):
            options["profile"] = profile
    return options, context_profile


class PyAVEncodeSession(EncodeSession):
    """One FFmpeg encoder, opened with fixed settings."""

    def __init__(self, choice: EncoderChoice, settings: EncoderSettings) -> None:
        import av

        self._av = av
        self.settings = settings
        codec = av.codec.Codec(choice.codec, "w")
        formats = [f.name for f in codec.video_formats or ()]
        # NV12 where the encoder takes it (libx264 keeps NV12 inside): the
        # picture is copied once, never converted twice.
        self.pix_fmt = "nv12" if "nv12" in formats else "yuv420p"
        ctx = av.CodecContext.create(codec, "w")
        ctx.width, ctx.height, ctx.pix_fmt = settings.width, settings.height, self.pix_fmt
        ctx.time_base = Fraction(1, settings.frame_rate)
        ctx.framerate = Fraction(settings.frame_rate, 1)
        ctx.bit_rate = settings.bitrate
        ctx.max_b_frames = choice.bframes
        ctx.thread_count = choice.threads
        if choice.keyframe_interval:
            ctx.gop_size = choice.keyframe_interval
        self.has_headers = settings.coded in (Format.H264, Format.HEVC)
        if self.has_headers:
            ctx.flags |= av.codec.context.Flags.global_header
        options, context_profile = encoder_options(choice, settings)
        if context_profile is not None:
            ctx.profile = context_profile
        ctx.options = options
        try:
            ctx.open()
        except av.error.FFmpegError as e:
            raise EncodeError(f"{choice.codec}: {e}") from e
        self.ctx = ctx
        self.headers = bytes(ctx.extradata or b"") if self.has_headers else b""
        self.converter = Converter()
        self.next_pts = 0
        self.timestamps: dict[int, int] = {}
        self.latest_pts = -1                     # of the packets out so far
        self.first = True

    def take(self, image: RawImage) -> Any:
        frame = self._av.VideoFrame(image.width, image.height, self.pix_fmt)
        source = "nv12" if image.fmt == Format.NV12 else "yuv420p"
        if not self.converter.read(source, image.width, image.height, image.address,
                                   image.size, image.layout, frame):
            frame = self._take_slowly(image, source)
        return frame

    def _take_slowly(self, image: RawImage, source: str) -> Any:
        """Without libswscale's entry points: through numpy and PyAV."""
        import ctypes

        import numpy as np

        from pyemb.pyav_swscale import layout_fits, plane_shapes

        shapes = plane_shapes(source, image.width, image.height)
        if not layout_fits(image.layout, shapes, image.size):
            raise ValueError("picture planes do not fit the buffer")
        memory = np.ctypeslib.as_array((ctypes.c_uint8 * image.size).from_address(image.address))
        rows = [memory[off:off + stride * h].reshape(h, stride)[:, :w]
                if h > 1 else memory[off:off + w].reshape(1, w)
                for (off, stride), (h, w) in zip(image.layout, shapes, strict=True)]
        frame = self._av.VideoFrame(image.width, image.height, source)
        for plane, data in zip(frame.planes, rows, strict=True):
            view = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
            view[:data.shape[0], :data.shape[1]] = data
        return frame if source == self.pix_fmt else frame.reformat(format=self.pix_fmt)

    def encode(self, picture: Any, timestamp: int, keyframe: bool) -> list[Packet]:
        picture.pts = self.next_pts
        self.timestamps[self.next_pts] = timestamp
        self.next_pts += 1
        if keyframe:
            picture.pict_type = self._av.video.frame.PictureType.I
        return self._packets(picture)

    def flush(self) -> list[Packet]:
        return self._packets(None)

    def _packets(self, picture: Any) -> list[Packet]:
        try:
            packets = self.ctx.encode(picture)
        except self._av.error.FFmpegError as e:
            raise EncodeError(str(e)) from e
        out = []
        for packet in packets:
            pts = packet.pts if packet.pts is not None else self.latest_pts + 1
            if packet.is_keyframe:
                flags = BufferFlag.IFRAME
            elif pts < self.latest_pts:
                flags = BufferFlag.BFRAME          # shown before one already out
            else:
                flags = BufferFlag.PFRAME
            self.latest_pts = max(self.latest_pts, pts)
            data = bytes(packet)
            if self.has_headers and (self.first or (packet.is_keyframe
                                                    and self.settings.prepend_headers)):
                data = self.headers + data
            self.first = False
            out.append(Packet(data, self.timestamps.pop(pts, 0), flags))
        return out

    def close(self) -> None:
        self.ctx = None
        self.converter.close()
