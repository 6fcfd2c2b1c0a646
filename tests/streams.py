"""Every test stream is made here, with PyAV's encoders, and decoded here
the reference way (PyAV directly) for comparison."""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from fractions import Fraction
from functools import cache
from pathlib import Path

import av
import numpy as np

from pyemb.video import protocol as p

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The team's shared/ folder: $PYEMB_SHARED, or beside the checkout (as
    CI and every session have it)."""
    for candidate in (os.environ.get("PYEMB_SHARED"), REPO.parent / "shared"):
        if candidate and (Path(candidate) / "vectors").is_dir():
            return Path(candidate)
    raise FileNotFoundError(f"no shared/vectors beside {REPO}; set PYEMB_SHARED")


# virtio-video coded format -> (PyAV encoder, FFmpeg decoder, splits at any byte)
CODECS = {
    "h264": (p.Format.H264, "libx264", "h264", True),
    "hevc": (p.Format.HEVC, "libx265", "hevc", True),
    "vp8": (p.Format.VP8, "libvpx", "vp8", False),
    "vp9": (p.Format.VP9, "libvpx-vp9", "vp9", False),
    "mpeg2": (p.Format.MPEG2, "mpeg2video", "mpeg2video", True),
    "mpeg4": (p.Format.MPEG4, "mpeg4", "mpeg4", True),
}

ENCODER_OPTIONS = {
    "libx264": {"preset": "veryfast"},
    "libx265": {"preset": "ultrafast", "x265-params": "log-level=error:bframes=2"},
    "libvpx": {"deadline": "realtime", "cpu-used": "8"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8"},
}


def picture(width: int, height: int, index: int, noise: int = 0) -> av.VideoFrame:
    """A moving pattern, so that every picture differs; ``noise`` adds
    camera-like grain (and so bits and decoding work) of that amplitude."""
    y = (np.add.outer(np.arange(height), np.arange(width)) * 2 + index * 7) % 256
    if noise:
        grain = np.random.default_rng(index).integers(-noise, noise + 1, y.shape)
        y = np.clip(y + grain, 0, 255)
    u = np.full(((height + 1) // 2, (width + 1) // 2), (index * 13) % 256)
    v = np.full_like(u, (255 - index * 5) % 256)
    frame = av.VideoFrame(width, height, "yuv420p")
    for plane, data in zip(frame.planes, (y, u, v), strict=True):
        rows = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
        h, w = data.shape
        rows[:h, :w] = data.astype(np.uint8)
    return frame


@cache
def encode(codec: str, width: int, height: int, frames: int, bframes: int = 2,
           start: int = 0, noise: int = 0,
           repeat_headers: bool = False) -> tuple[tuple[bytes, int], ...]:
    """Encoded packets in decode order, each with its display index (pts).
    ``repeat_headers`` (H.264): SPS and PPS before every keyframe, so that a
    decoder reset can resume at any of them (a seek)."""
    _, encoder, _, _ = CODECS[codec]
    ctx = av.CodecContext.create(encoder, "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
    ctx.time_base = Fraction(1, 25)
    ctx.framerate = Fraction(25, 1)
    ctx.gop_size = 12
    if codec in ("h264", "mpeg2", "mpeg4"):
        ctx.max_b_frames = bframes
    ctx.options = dict(ENCODER_OPTIONS.get(encoder, {}))
    if repeat_headers:
        ctx.options["x264-params"] = "repeat-headers=1"
    packets = []
    for i in range(frames):
        frame = picture(width, height, start + i, noise)
        frame.pts = i
        packets += [(bytes(pkt), pkt.pts) for pkt in ctx.encode(frame)]
    packets += [(bytes(pkt), pkt.pts) for pkt in ctx.encode(None)]
    return tuple(packets)


def visible(frame: av.VideoFrame, fmt: int = p.Format.NV12) -> bytes:
    name = "nv12" if fmt == p.Format.NV12 else "yuv420p"
    f = frame.reformat(format=name)
    w, h = f.width, f.height
    cw, ch = (w + 1) // 2, (h + 1) // 2
    shapes = [(h, w), (ch, 2 * cw)] if name == "nv12" else [(h, w), (ch, cw), (ch, cw)]
    out = b""
    for plane, (rows, row_bytes) in zip(f.planes, shapes, strict=True):
        a = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
        out += a[:rows, :row_bytes].tobytes()
    return out


def reference(codec: str, chunks: list[bytes], fmt: int = p.Format.NV12) -> list[int]:
    """CRC-32 of each picture, decoding ``chunks`` with PyAV directly."""
    _, _, decoder, _ = CODECS[codec]
    ctx = av.CodecContext.create(decoder, "r")
    crcs = []
    for chunk in [*chunks, None]:
        for pkt in ctx.parse(chunk):
            crcs += [zlib.crc32(visible(f, fmt)) for f in ctx.decode(pkt)]
    crcs += [zlib.crc32(visible(f, fmt)) for f in ctx.decode(None)]
    return crcs


def reference_md5(codec: str, chunks: list[bytes], fmt: int = p.Format.NV12) -> list[str]:
    """MD5 of each picture's visible bytes, decoding ``chunks`` with PyAV
    directly: what a guest with busybox md5sum (and no CRC-32 tool) can
    compare against."""
    ctx = av.CodecContext.create(CODECS[codec][2], "r")
    packets = [pkt for chunk in [*chunks, None] for pkt in ctx.parse(chunk)]
    return [hashlib.md5(visible(f, fmt)).hexdigest()
            for pkt in [*packets, None] for f in ctx.decode(pkt)]


# V4L2 fourcc of each coded format, as the guest's OUTPUT queue names it.
FOURCCS = {"h264": "H264", "hevc": "HEVC", "vp8": "VP80", "vp9": "VP90",
           "mpeg2": "MPG2", "mpeg4": "MPG4"}


def split_frames(data: bytes, codec: str = "h264") -> list[bytes]:
    """An elementary stream cut at frame boundaries by FFmpeg's parser (what
    a V4L2 client queues as one OUTPUT buffer each)."""
    ctx = av.CodecContext.create(CODECS[codec][2], "r")
    packets = [bytes(pkt) for pkt in ctx.parse(data)] + [bytes(pkt) for pkt in ctx.parse(None)]
    return [pkt for pkt in packets if pkt]


def frames_file(codec: str, width: int, height: int, records: list[bytes]) -> bytes:
    """The input of guest/v4l2_decode.c: magic, coded fourcc, size hint, then
    each OUTPUT buffer's bytes behind their le32 length."""
    head = b"PYF1" + FOURCCS[codec].encode() + width.to_bytes(4, "little")
    head += height.to_bytes(4, "little")
    return head + b"".join(len(r).to_bytes(4, "little") + r for r in records)


def ivf(codec: str, width: int, height: int, frames: list[bytes]) -> bytes:
    """VP8 or VP9 frames in an IVF file (what GStreamer's ivfparse reads),
    frame i stamped i at 25 fps."""
    head = b"DKIF" + struct.pack("<HH4sHHIIII", 0, 32, FOURCCS[codec].encode(), width, height,
                                 25, 1, len(frames), 0)
    return head + b"".join(struct.pack("<IQ", len(f), i) + f for i, f in enumerate(frames))
