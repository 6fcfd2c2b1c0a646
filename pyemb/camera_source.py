"""Camera sources for virtio-media-py's camera: where its pictures come from.

A source renders picture number ``sequence`` in the format the guest chose
straight into the buffer it goes to (:meth:`CameraSource.render`).  Sources
are chosen in the device's config, ``[camera] source = ...``:

- ``"pattern"`` (default): :class:`TestPattern`, a moving test pattern with
  the picture number drawn in it, bit-exact and reproducible;
- ``"file"``: a video file looped through PyAV (``path = ...``);
- ``"v4l2"``: a host V4L2 camera through PyAV's ``v4l2`` input
  (``device = "/dev/video0"``);
- ``"module:Class"``: a :class:`CameraSource` of your own.

The picture controls (brightness, contrast, saturation) are applied after
the source, by :func:`adjust`, whatever the source.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pyemb.config import ConfigError
from pyemb.media.formats import NV12, RAW_FORMATS, YU12, YUYV, ImageFormat

DEFAULT_SIZES = [(320, 240), (640, 480), (1280, 720), (1920, 1080)]
DEFAULT_RATES = [15, 25, 30, 60]


class CameraSource:
    """Interface of a camera source.  Constructed with its config table."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = config or {}
        self.fmt = ImageFormat(YUYV, 640, 480)      # set by start()

    def formats(self) -> list[int]:
        """V4L2 fourccs it renders (see :mod:`pyemb.media.formats`)."""
        return list(RAW_FORMATS)

    def sizes(self) -> list[tuple[int, int]]:
        return _sizes(self.config)

    def frame_rates(self) -> list[int]:
        return _rates(self.config)

    def patterns(self) -> list[str]:
        """Entries of the test-pattern menu control; none: no such control."""
        return []

    def start(self, fmt: ImageFormat, fps: int) -> None:
        """Streaming begins with these settings."""
        self.fmt = fmt

    def render(self, sequence: int, target: np.ndarray, pattern: int = 0) -> None:
        """Write picture ``sequence`` into ``target`` (``fmt.sizeimage``
        uint8 bytes, laid out as :meth:`ImageFormat.layout` says)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Streaming ended."""

    def close(self) -> None:
        self.stop()


def _sizes(config: dict[str, Any]) -> list[tuple[int, int]]:
    sizes = config.get("sizes")
    if sizes is None:
        return list(DEFAULT_SIZES)
    try:
        out = [(int(w), int(h)) for w, h in (s.split("x") for s in sizes)]
    except (AttributeError, ValueError, TypeError):
        raise ConfigError('config: camera.sizes must list sizes like "1280x720"') from None
    if not out or any(not (16 <= w <= 4096 and 16 <= h <= 4096 and w % 2 == 0 and h % 2 == 0)
                      for w, h in out):
        raise ConfigError("config: camera.sizes must be even sizes from 16x16 to 4096x4096")
    return out


def _rates(config: dict[str, Any]) -> list[int]:
    rates = config.get("frame_rates", DEFAULT_RATES)
    if (not isinstance(rates, list) or not rates
            or any(isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 240
                   for r in rates)):
        raise ConfigError("config: camera.frame_rates must list integers from 1 to 240")
    return sorted(set(rates))


# -- writing YUV planes into a target ------------------------------------------------
def write_planes(fmt: ImageFormat, target: np.ndarray, y: np.ndarray, u: np.ndarray,
                 v: np.ndarray) -> None:
    """Pack full-resolution Y and chroma planes (already subsampled to the
    format's chroma size: 4:2:2 for YUYV, 4:2:0 otherwise) into ``target``."""
    w, h = fmt.width, fmt.height
    if fmt.fourcc == YUYV:
        packed = target[: 2 * w * h].reshape(h, w // 2, 4)
        packed[:, :, 0] = y[:, 0::2]
        packed[:, :, 1] = u
        packed[:, :, 2] = y[:, 1::2]
        packed[:, :, 3] = v
        return
    target[: w * h].reshape(h, w)[:] = y
    if fmt.fourcc == NV12:
        uv = target[w * h: w * h * 3 // 2].reshape(h // 2, w // 2, 2)
        uv[:, :, 0] = u
        uv[:, :, 1] = v
    else:
        q = (w // 2) * (h // 2)
        target[w * h: w * h + q].reshape(h // 2, w // 2)[:] = u
        target[w * h + q: w * h + 2 * q].reshape(h // 2, w // 2)[:] = v


# BT.601 limited-range Y, Cb, Cr of 75 % colour bars.
BARS = [(180, 128, 128), (162, 44, 142), (131, 156, 44), (112, 72, 58),
        (84, 184, 198), (65, 100, 212), (35, 212, 114), (16, 128, 128)]
COUNTER_BITS = 32


class TestPattern(CameraSource):
    """Colour bars, a checkerboard or a gradient, moving 2 pixels left per
    picture, with the picture's sequence number as 32 black/white blocks
    along the top (most significant bit first).

    Each pattern is drawn once per format, twice as wide as the picture, so
    a picture is one shifted copy of it plus the counter."""

    PATTERNS = ["Moving Colour Bars", "Moving Checkerboard", "Moving Gradient"]

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        self._cache: dict[tuple[ImageFormat, int], tuple[np.ndarray, ...]] = {}

    def patterns(self) -> list[str]:
        return list(self.PATTERNS)

    def _base(self, fmt: ImageFormat, pattern: int) -> tuple[np.ndarray, ...]:
        key = (fmt, pattern)
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[key] = self._draw(fmt.width, fmt.height, pattern)
        return self._cache[key]

    @staticmethod
    def _draw(w: int, h: int, pattern: int) -> tuple[np.ndarray, ...]:
        """Y (h, 2w), Cb and Cr (h, w) at 4:2:2 horizontally: doubled width."""
        xs = np.arange(2 * w)
        x = xs % w
        if pattern == 1:
            ys = np.arange(h)[:, None]
            on = ((x[None, :] // 32) + (ys // 32)) % 2 == 0
            y = np.where(on, 235, 16).astype(np.uint8)
            cb = np.full((h, w), 128, np.uint8)
            cr = np.full((h, w), 128, np.uint8)
            return y, cb, cr
        if pattern == 2:
            ramp = (16 + x * 219 // max(w - 1, 1)).astype(np.uint8)
            y = np.broadcast_to(ramp, (h, 2 * w)).copy()
            rows = (16 + np.arange(h) * 224 // max(h - 1, 1)).astype(np.uint8)[:, None]
            cb = np.broadcast_to(rows, (h, w)).copy()
            cr = np.broadcast_to(ramp[0::2][None, :], (h, w)).copy()
            return y, cb, cr
        bar = np.minimum(x * 8 // w, 7)
        table = np.array(BARS, np.uint8)
        y = np.broadcast_to(table[bar, 0], (h, 2 * w)).copy()
        cb = np.broadcast_to(table[bar[0::2], 1], (h, w)).copy()
        cr = np.broadcast_to(table[bar[0::2], 2], (h, w)).copy()
        return y, cb, cr

    def render(self, sequence: int, target: np.ndarray, pattern: int = 0) -> None:
        fmt = self.fmt
        w = fmt.width
        y2, cb2, cr2 = self._base(fmt, pattern % len(self.PATTERNS))
        shift = (2 * sequence) % w
        y = y2[:, shift:shift + w]
        cb = cb2[:, shift // 2: shift // 2 + w // 2]
        cr = cr2[:, shift // 2: shift // 2 + w // 2]
        if fmt.fourcc != YUYV:
            cb, cr = cb[0::2], cr[0::2]
        write_planes(fmt, target, y, cb, cr)
        self._counter(fmt, target, sequence)

    @staticmethod
    def _counter(fmt: ImageFormat, target: np.ndarray, sequence: int) -> None:
        w, h = fmt.width, fmt.height
        block = max(2, (w // COUNTER_BITS) & ~1)
        rows = min(block, h)
        bits = [(sequence >> (COUNTER_BITS - 1 - i)) & 1 for i in range(COUNTER_BITS)]
        luma = np.repeat(np.where(np.array(bits, bool), 235, 16).astype(np.uint8), block)
        span = luma.size
        if fmt.fourcc == YUYV:
            packed = target[: 2 * w * h].reshape(h, 2 * w)
            packed[:rows, 0:2 * span:2] = luma
            packed[:rows, 1:2 * span:2] = 128
            return
        target[: w * h].reshape(h, w)[:rows, :span] = luma
        crow = rows // 2
        if fmt.fourcc == NV12:
            target[w * h: w * h * 3 // 2].reshape(h // 2, w)[:crow, :span] = 128
        else:
            q = (w // 2) * (h // 2)
            target[w * h: w * h + q].reshape(h // 2, w // 2)[:crow, :span // 2] = 128
            target[w * h + q: w * h + 2 * q].reshape(h // 2, w // 2)[:crow, :span // 2] = 128


def read_counter(fmt: ImageFormat, image: bytes) -> int:
    """The sequence number a :class:`TestPattern` picture carries."""
    w = fmt.width
    block = max(2, (w // COUNTER_BITS) & ~1)
    data = np.frombuffer(image, np.uint8)
    value = 0
    for i in range(COUNTER_BITS):
        x = i * block + block // 2
        luma = data[2 * x] if fmt.fourcc == YUYV else data[x]
        value = value << 1 | int(luma > 128)
    return value


def adjust(fmt: ImageFormat, target: np.ndarray, brightness: int, contrast: int,
           saturation: int) -> None:
    """Apply the picture controls in place (V4L2 defaults 0, 128, 128 leave
    the picture untouched)."""
    if (brightness, contrast, saturation) == (0, 128, 128):
        return
    w, h = fmt.width, fmt.height
    levels = np.arange(256, dtype=np.int32)
    luma_lut = np.clip((levels - 16) * contrast // 128 + 16 + brightness, 0, 255).astype(np.uint8)
    chroma_lut = np.clip((levels - 128) * saturation // 128 + 128, 0, 255).astype(np.uint8)
    if fmt.fourcc == YUYV:
        packed = target[: 2 * w * h]
        packed[0::2] = luma_lut[packed[0::2]]
        packed[1::2] = chroma_lut[packed[1::2]]
        return
    luma = target[: w * h]
    luma[:] = luma_lut[luma]
    chroma = target[w * h: w * h * 3 // 2]
    chroma[:] = chroma_lut[chroma]


BUILTIN = {"pattern": "pyemb.camera_source:TestPattern",
           "file": "pyemb.pyav_camera:FileSource",
           "v4l2": "pyemb.pyav_camera:HostCamera"}


def source_class(name: str) -> type[CameraSource]:
    from pyemb.config import import_class
    cls = import_class(BUILTIN.get(name, name))
    if not issubclass(cls, CameraSource):
        raise ConfigError(f"config: camera.source '{name}' is not a CameraSource")
    return cls


__all__ = ["CameraSource", "TestPattern", "adjust", "read_counter", "source_class",
           "write_planes", "NV12", "YU12", "YUYV"]
