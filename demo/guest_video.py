"""The video part of the demo, host side: the clip a guest decodes, the
check of what came back from its buffers, and the files a person looks at.

Each guest gets its own 720p H.264 clip (a moving scene with the guest's
number on it), made here with PyAV.  The guest's decoder client writes
every decoded NV12 picture, packed without padding, to a virtio-serial port
whose host side is a file; those bytes are compared with PyAV decoding the
same clip directly and turned into an MP4 (with the sound the guest
played, where it went into a WAV file) and a few PNG stills.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from pyemb.snd_backend import read_wav
from tests.streams import split_frames, visible

WIDTH, HEIGHT, FPS = 1280, 720, 25
FRAMES = 75                                     # three seconds

# 7-segment digits: segments a b c d e f g lit for each digit.
SEGMENTS = {1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc"}


def nv12_size(width: int = WIDTH, height: int = HEIGHT) -> int:
    """Bytes of one NV12 picture packed without padding."""
    return width * height + 2 * ((width + 1) // 2) * ((height + 1) // 2)


def _digit(mask: np.ndarray, digit: int, x: int, y: int, size: int) -> None:
    """Light ``digit`` as a 7-segment figure ``size`` high at (x, y) in ``mask``."""
    t, w, h = size // 8, size // 2, size // 2
    boxes = {"a": (x, y, w + t, t), "g": (x, y + h, w + t, t), "d": (x, y + 2 * h, w + t, t),
             "f": (x, y, t, h + t), "b": (x + w, y, t, h + t),
             "e": (x, y + h, t, h + t), "c": (x + w, y + h, t, h + t)}
    for seg in SEGMENTS[digit]:
        bx, by, bw, bh = boxes[seg]
        mask[by:by + bh, bx:bx + bw] = True


def scene(guest: int, index: int, width: int = WIDTH, height: int = HEIGHT,
          frames: int = FRAMES) -> av.VideoFrame:
    """Picture ``index`` of guest ``guest``'s clip: drifting colour bands,
    a bouncing ball, the guest's number and a progress bar."""
    direction = 1 if guest % 2 else -1
    phase = direction * index * 0.12
    x, cx = np.arange(width), np.arange((width + 1) // 2)
    rows, crows = np.arange(height), (height + 1) // 2
    y = 110 + 50 * np.outer(np.cos(rows / height * 2 * np.pi),
                            np.sin(x / width * 6 * np.pi + phase))
    hue = cx / len(cx) * 2 * np.pi + phase + guest * 2.1
    u = np.tile(128 + 60 * np.cos(hue), (crows, 1))
    v = np.tile(128 + 60 * np.sin(hue), (crows, 1))
    # The ball bounces off the edges; guest 2's starts elsewhere.
    r = height // 10
    span_x, span_y = width - 2 * r, height - 2 * r
    px = (index * 23 + (guest - 1) * span_x // 2) % (2 * span_x)
    py = (index * 17 + (guest - 1) * span_y // 3) % (2 * span_y)
    bx = r + (px if px < span_x else 2 * span_x - px)
    by = r + (py if py < span_y else 2 * span_y - py)
    digit = np.zeros((height, width), bool)
    _digit(digit, guest, width // 20, height // 12, height // 3)
    bar = np.zeros((height, width), bool)
    bar[height - height // 24:, :width * (index + 1) // frames] = True
    y[digit], y[bar] = 16, 220
    yy, xx = np.ogrid[0:height, 0:width]
    y[(xx - bx) ** 2 + (yy - by) ** 2 < r * r] = 235
    cyy, cxx = np.ogrid[0:crows, 0:len(cx)]
    grey = (cxx * 2 - bx) ** 2 + (cyy * 2 - by) ** 2 < r * r
    grey |= (digit | bar)[::2, ::2][:crows, :len(cx)]
    u[grey], v[grey] = 128, 128
    frame = av.VideoFrame(width, height, "yuv420p")
    for plane, data in zip(frame.planes, (y, u, v), strict=True):
        rows = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
        h, w = data.shape
        rows[:h, :w] = np.clip(data, 0, 255).astype(np.uint8)
    return frame


def clip(guest: int, width: int = WIDTH, height: int = HEIGHT,
         frames: int = FRAMES) -> bytes:
    """Guest ``guest``'s clip as an H.264 elementary stream (libx264, B-frames)."""
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
    ctx.time_base, ctx.framerate = Fraction(1, FPS), Fraction(FPS, 1)
    ctx.gop_size, ctx.max_b_frames = FPS, 2
    ctx.options = {"preset": "veryfast", "crf": "20"}
    out = []
    for i in range(frames):
        frame = scene(guest, i, width, height, frames)
        frame.pts = i
        out += [bytes(pkt) for pkt in ctx.encode(frame)]
    out += [bytes(pkt) for pkt in ctx.encode(None)]
    return b"".join(out)


def reference_pictures(stream: bytes) -> Iterator[bytes]:
    """Each picture of ``stream`` as PyAV decodes it, packed NV12."""
    ctx = av.CodecContext.create("h264", "r")
    for record in [*split_frames(stream), None]:
        packet = None if record is None else av.Packet(record)
        for frame in ctx.decode(packet):
            yield visible(frame)


def pictures(dump: bytes, width: int = WIDTH, height: int = HEIGHT) -> list[bytes]:
    """The packed NV12 pictures a guest wrote one after the other."""
    size = nv12_size(width, height)
    if len(dump) % size:
        raise ValueError(f"{len(dump)} bytes is not a whole number of "
                         f"{width}x{height} NV12 pictures ({size} bytes each)")
    return [dump[i:i + size] for i in range(0, len(dump), size)]


def compare(got: list[bytes], stream: bytes) -> tuple[int, int, list[int]]:
    """(pictures equal byte for byte, PyAV's picture count, indexes that differ)."""
    expected = list(reference_pictures(stream))
    differ = [i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b]
    return min(len(got), len(expected)) - len(differ), len(expected), differ


def crcs(got: list[bytes]) -> list[int]:
    return [zlib.crc32(picture) for picture in got]


def console_crcs(text: str) -> list[int]:
    """The CRC of each ``FRAME <index> <timestamp> <crc>`` line the guest's
    client printed."""
    return [int(c, 16) for c in re.findall(r"^FRAME \d+ \d+ ([0-9a-f]{8})$", text, re.M)]


def nv12_frame(data: bytes, width: int, height: int) -> av.VideoFrame:
    """A packed NV12 picture as a PyAV frame (whose planes may be padded)."""
    frame = av.VideoFrame(width, height, "nv12")
    y_size = width * height
    chroma_row = 2 * ((width + 1) // 2)
    for plane, chunk, rows, row_bytes in (
            (frame.planes[0], data[:y_size], height, width),
            (frame.planes[1], data[y_size:], (height + 1) // 2, chroma_row)):
        dst = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
        dst[:rows, :row_bytes] = np.frombuffer(chunk, np.uint8).reshape(rows, row_bytes)
    return frame


def write_video(path: Path, nv12: Iterable[bytes], width: int, height: int,
                audio: Path | None = None, fps: int = FPS) -> None:
    """An MP4 (H.264, and AAC from the WAV ``audio`` if given) of the pictures."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "veryfast", "crf": "18"}
        sound = None
        if audio is not None:
            wav = read_wav(audio)
            sound = container.add_stream("aac", rate=wav.rate, layout="stereo")
        for i, data in enumerate(nv12):
            frame = nv12_frame(data, width, height).reformat(format="yuv420p")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if sound is not None:
            samples = np.frombuffer(wav.data, "<i2").reshape(-1, wav.channels)
            if wav.channels == 1:
                samples = np.repeat(samples, 2, axis=1)
            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16",
                                               layout="stereo")
            frame.sample_rate, frame.pts = wav.rate, 0
            container.mux(sound.encode(frame))
            container.mux(sound.encode(None))


def write_png(path: Path, frame: av.VideoFrame) -> None:
    rgb = frame.reformat(format="rgb24")
    png = av.CodecContext.create("png", "w")
    png.width, png.height, png.pix_fmt = rgb.width, rgb.height, "rgb24"
    path.write_bytes(b"".join(bytes(pkt) for pkt in [*png.encode(rgb), *png.encode(None)]))
