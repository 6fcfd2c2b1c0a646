"""Pictures between guest buffers and PyAV frames with FFmpeg's libswscale.

PyAV's ``VideoFrame.reformat`` can only produce a new frame: converting to
NV12 that way costs an allocation, a conversion pass and then a second pass
to copy the result into the guest buffer, all on the stream's worker, whose
serial time bounds the stream's frame rate.  Here ``sws_scale`` writes the
guest buffer directly, in one pass and without the GIL (ctypes drops it for
the call).  The library is the very libswscale PyAV itself loaded, found in
the process's mappings, so formats and versions always agree with PyAV's.

The encoder goes the other way (``Converter.read``): a raw picture in a
guest buffer, at the driver's strides and plane offsets, into the frame the
encoder takes, again in one pass.

Only conversions that are pure rearrangements of 8-bit 4:2:0 samples
(I420 or NV12 to NV12 or I420) go this way: they are bit-exact whatever the
scaler's flags.  Anything else (10-bit, 4:2:2, ...) returns False and the
caller falls back to PyAV's reformat.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import Any

# Decoder output formats whose samples are 8-bit 4:2:0 planar (yuvj420p is
# the full-range flavour of the same layout).
I420_LIKE = ("yuv420p", "yuvj420p")
# Guest formats this module writes or reads, by libavutil pixel-format name.
TARGETS = ("nv12", "yuv420p")
SOURCES = (*I420_LIKE, "nv12")
SWS_POINT = 0x10

_lock = threading.Lock()
_lib: tuple[Any, dict[str, int]] | None = None
_missing = False


def _loaded_library(stem: str) -> str | None:
    """Path of the shared library named ``stem``* mapped into this process
    (None where there is no /proc, and the caller falls back to PyAV)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(None, 5)[-1]
                name = path.rsplit("/", 1)[-1]
                if name.startswith(stem) and ".so" in name:
                    return path
    except OSError:
        pass
    return None


def _load() -> tuple[Any, dict[str, int]] | None:
    """libswscale's entry points and the pixel formats we use, or None."""
    global _lib, _missing
    if _lib is not None or _missing:        # every picture asks: no lock once settled
        return _lib
    with _lock:
        if _lib is not None or _missing:
            return _lib
        import av.video.reformatter  # noqa: F401 - maps libswscale into the process

        sws_path, avutil_path = _loaded_library("libswscale"), _loaded_library("libavutil")
        if sws_path is None or avutil_path is None:
            _missing = True
            return None
        try:
            _lib = _bind(sws_path, avutil_path)
        except (OSError, AttributeError):     # not loadable, or an FFmpeg without these calls
            _missing = True
        return _lib


def _bind(sws_path: str, avutil_path: str) -> tuple[Any, dict[str, int]]:
    """Bind the entry points (ctypes needs their signatures)."""
    sws, avutil = ctypes.CDLL(sws_path), ctypes.CDLL(avutil_path)
    avutil.av_get_pix_fmt.restype = ctypes.c_int
    avutil.av_get_pix_fmt.argtypes = [ctypes.c_char_p]
    formats = {name: avutil.av_get_pix_fmt(name.encode()) for name in (*SOURCES, *TARGETS)}
    if min(formats.values()) < 0:
        raise OSError(f"libavutil does not know every pixel format of {formats}")
    c_int, c_ptr = ctypes.c_int, ctypes.c_void_p
    sws.sws_getCachedContext.restype = c_ptr
    sws.sws_getCachedContext.argtypes = [c_ptr, c_int, c_int, c_int, c_int, c_int, c_int,
                                         c_int, c_ptr, c_ptr, c_ptr]
    sws.sws_scale.restype = c_int
    sws.sws_scale.argtypes = [c_ptr, ctypes.POINTER(c_ptr), ctypes.POINTER(c_int), c_int,
                              c_int, ctypes.POINTER(c_ptr), ctypes.POINTER(c_int)]
    sws.sws_freeContext.restype = None
    sws.sws_freeContext.argtypes = [c_ptr]
    return sws, formats


def plane_shapes(target: str, width: int, height: int) -> list[tuple[int, int]]:
    """(rows, bytes per row) of each plane of a ``target`` picture."""
    cw, ch = (width + 1) // 2, (height + 1) // 2
    if target == "nv12":
        return [(height, width), (ch, 2 * cw)]
    return [(height, width), (ch, cw), (ch, cw)]


def layout_fits(layout: list[tuple[int, int]], shapes: list[tuple[int, int]],
                size: int) -> bool:
    """Whether every plane at (offset, stride) lies inside ``size`` bytes."""
    for (offset, stride), (rows, row_bytes) in zip(layout, shapes, strict=True):
        if offset < 0 or stride < row_bytes or offset + stride * (rows - 1) + row_bytes > size:
            return False
    return True


class Converter:
    """One stream's scaler context; use it from one thread at a time.

    Every picture of a stream usually has the same size and buffer layout:
    the scaler context, the layout check and the ctypes argument arrays are
    kept and only redone when those change (each rebuild costs
    microseconds, on the worker's serial path)."""

    def __init__(self) -> None:
        # The scaler context, in a box that outlives the converter: freed by
        # close(), and when the converter goes (a picture keeps its session's
        # converter and may be written after the session closed it: that
        # makes a new context, which nothing else would free).
        self._box: list[int | None] = [None]
        weakref.finalize(self, _free_context, self._box)
        self._ctx_key: tuple[str, str, int, int] | None = None
        self._fits_key: tuple[Any, ...] | None = None
        self._src = (ctypes.c_void_p * 4)()
        self._src_strides = (ctypes.c_int * 4)()
        self._dst = (ctypes.c_void_p * 4)()
        self._dst_strides = (ctypes.c_int * 4)()

    def write(self, frame: Any, target: str, width: int, height: int, dst_address: int,
              dst_size: int, layout: list[tuple[int, int]]) -> bool:
        """Write the top-left ``width`` x ``height`` of a PyAV ``frame`` as
        ``target`` ("nv12" or "yuv420p") at ``dst_address``, each plane at
        its (offset, stride).  False, with nothing written, where this
        conversion is not one this module does."""
        lib = _load()
        source = frame.format.name
        if lib is None or target not in TARGETS or source not in I420_LIKE:
            return False
        if width > frame.width or height > frame.height:
            return False
        self._check_layout(target, width, height, dst_size, layout)
        planes = frame.planes[:3]
        return self._scale(lib, source, [(p.buffer_ptr, p.line_size) for p in planes],
                           target, [(dst_address + off, stride) for off, stride in layout],
                           width, height)

    def read(self, source: str, width: int, height: int, src_address: int, src_size: int,
             layout: list[tuple[int, int]], frame: Any) -> bool:
        """Read a ``width`` x ``height`` ``source`` picture ("nv12" or
        "yuv420p") at ``src_address``, each plane at its (offset, stride),
        into the PyAV ``frame`` of that size (NV12 or I420).  False, with
        nothing read, where this conversion is not one this module does."""
        lib = _load()
        target = frame.format.name
        if lib is None or source not in TARGETS or target not in TARGETS:
            return False
        if (width, height) != (frame.width, frame.height):
            return False
        self._check_layout(source, width, height, src_size, layout)
        planes = frame.planes[:3]
        return self._scale(lib, source, [(src_address + off, stride) for off, stride in layout],
                           target, [(p.buffer_ptr, p.line_size) for p in planes],
                           width, height)

    def _check_layout(self, fmt: str, width: int, height: int, size: int,
                      layout: list[tuple[int, int]]) -> None:
        """The guest side's planes must lie inside its buffer (checked again
        only when the buffer's geometry changes)."""
        fits_key = (fmt, width, height, size, *layout)
        if fits_key != self._fits_key:
            if not layout_fits(layout, plane_shapes(fmt, width, height), size):
                raise ValueError("picture planes do not fit the buffer")
            self._fits_key = fits_key

    def _scale(self, lib: tuple[Any, dict[str, int]], source: str,
               src_planes: list[tuple[int, int]], target: str,
               dst_planes: list[tuple[int, int]], width: int, height: int) -> bool:
        """sws_scale between two sets of (address, stride) planes."""
        sws, formats = lib
        ctx_key = (source, target, width, height)
        if ctx_key != self._ctx_key:
            self._box[0] = sws.sws_getCachedContext(
                self._box[0], width, height, formats[source], width, height,
                formats[target], SWS_POINT, None, None, None)
            self._ctx_key = ctx_key if self._box[0] else None
            if not self._box[0]:
                return False
        for addrs, strides, planes in ((self._src, self._src_strides, src_planes),
                                       (self._dst, self._dst_strides, dst_planes)):
            for i, (address, stride) in enumerate(planes):
                addrs[i] = address
                strides[i] = stride
        sws.sws_scale(self._box[0], self._src, self._src_strides, 0, height, self._dst,
                      self._dst_strides)
        return True

    def close(self) -> None:
        _free_context(self._box)
        self._ctx_key = None


def _free_context(box: list[int | None]) -> None:
    if box[0]:
        lib = _load()
        if lib is not None:
            lib[0].sws_freeContext(box[0])
    box[0] = None
