"""The direct-to-guest-buffer conversion (libswscale through ctypes) against
PyAV's own reformat, byte for byte, and its bounds checks."""

from __future__ import annotations

import av
import numpy as np
import pytest

from pyemb.pyav_swscale import Converter, layout_fits, plane_shapes
from pyemb.video import protocol as p
from pyemb.video_backend import PyAVPicture, fill
from tests.streams import picture, visible


def padded_layout(fmt: int, width: int, height: int) -> list[tuple[int, int]]:
    """Planes with strides wider than the picture and gaps between them, as
    a driver with its own alignment rules would ask for."""
    target = "nv12" if fmt == p.Format.NV12 else "yuv420p"
    layout, offset = [], 64
    for rows, row_bytes in plane_shapes(target, width, height):
        stride = row_bytes + 40
        layout.append((offset, stride))
        offset += stride * rows + 128
    return layout


def visible_from(buf: np.ndarray, fmt: int, width: int, height: int,
                 layout: list[tuple[int, int]]) -> bytes:
    target = "nv12" if fmt == p.Format.NV12 else "yuv420p"
    out = b""
    for (offset, stride), (rows, row_bytes) in zip(
            layout, plane_shapes(target, width, height), strict=True):
        out += buf[offset:offset + stride * rows].reshape(rows, stride)[:, :row_bytes].tobytes()
    return out


@pytest.mark.parametrize("fmt", [p.Format.NV12, p.Format.YUV420])
@pytest.mark.parametrize("size", [(322, 242), (64, 48), (1280, 720)])
def test_converter_matches_pyav_reformat(fmt, size):
    width, height = size
    frame = picture(width, height, 3, noise=20)
    layout = padded_layout(fmt, width, height)
    buf = np.full(layout[-1][0] + layout[-1][1] * height, 0xAB, np.uint8)
    target = "nv12" if fmt == p.Format.NV12 else "yuv420p"
    assert Converter().write(frame, target, width, height, buf.ctypes.data, buf.nbytes, layout)
    assert visible_from(buf, fmt, width, height, layout) == visible(frame, fmt)
    # Padding between and after rows is left alone.
    assert buf[0] == 0xAB and buf[layout[0][0] + width] == 0xAB


def test_picture_converts_directly_and_falls_back_for_other_formats():
    width, height = 96, 64
    frame = picture(width, height, 5, noise=10)
    layout = padded_layout(p.Format.NV12, width, height)
    size = layout[-1][0] + layout[-1][1] * height
    direct, fallback = np.zeros(size, np.uint8), np.zeros(size, np.uint8)
    pic = PyAVPicture(width, height, 0, 0, frame)
    pic.converter = Converter()
    pic.write_into(p.Format.NV12, direct, layout)
    fill(fallback, layout, PyAVPicture(width, height, 0, 0, frame).planes(p.Format.NV12))
    assert direct.tobytes() == fallback.tobytes()
    # 4:4:4 is not a rearrangement of 4:2:0: the converter declines and the
    # picture goes through PyAV's reformat instead.
    frame444 = frame.reformat(format="yuv444p")
    assert not Converter().write(frame444, "nv12", width, height, direct.ctypes.data,
                                 direct.nbytes, layout)
    pic444 = PyAVPicture(width, height, 0, 0, frame444)
    pic444.converter = Converter()
    out = np.zeros(size, np.uint8)
    pic444.write_into(p.Format.NV12, out, layout)
    assert visible_from(out, p.Format.NV12, width, height, layout) == visible(frame444)


def test_converter_never_writes_outside_the_buffer():
    width, height = 64, 48
    frame = picture(width, height, 1)
    shapes = plane_shapes("nv12", width, height)
    exact = [(0, width), (width * height, width)]
    assert layout_fits(exact, shapes, width * height * 3 // 2)
    assert not layout_fits(exact, shapes, width * height * 3 // 2 - 1)
    assert not layout_fits([(0, width - 2), (width * height, width)], shapes, 1 << 20)
    assert not layout_fits([(-4, width), (width * height, width)], shapes, 1 << 20)
    buf = np.zeros(width * height * 3 // 2 + 16, np.uint8)
    guard = buf[-16:].copy()
    small = buf[:-17]
    with pytest.raises(ValueError):
        Converter().write(frame, "nv12", width, height, small.ctypes.data, small.nbytes, exact)
    assert not buf.any() and (buf[-16:] == guard).all()


def test_converter_declines_pictures_larger_than_the_frame():
    frame = av.VideoFrame(32, 32, "yuv420p")
    buf = np.zeros(64 * 64 * 2, np.uint8)
    assert not Converter().write(frame, "nv12", 64, 64, buf.ctypes.data, buf.nbytes,
                                 [(0, 64), (64 * 64, 64)])



def tight_layout(fmt: int, width: int, height: int) -> list[tuple[int, int]]:
    target = "nv12" if fmt == p.Format.NV12 else "yuv420p"
    layout, offset = [], 0
    for rows, row_bytes in plane_shapes(target, width, height):
        layout.append((offset, row_bytes))
        offset += rows * row_bytes
    return layout


def test_one_converter_follows_every_change_of_size_layout_and_target():
    """What it keeps between pictures (scaler context, layout check, argument
    arrays) is redone whenever a picture differs from the one before."""
    conv = Converter()
    steps = [((322, 242), p.Format.NV12, padded_layout), ((322, 242), p.Format.NV12, tight_layout),
             ((160, 96), p.Format.NV12, tight_layout), ((160, 96), p.Format.YUV420, padded_layout),
             ((160, 96), p.Format.YUV420, tight_layout), ((322, 242), p.Format.NV12, padded_layout)]
    for (width, height), fmt, make_layout in steps:
        frame = picture(width, height, width % 7, noise=20)
        target = "nv12" if fmt == p.Format.NV12 else "yuv420p"
        layout = make_layout(fmt, width, height)
        shapes = plane_shapes(target, width, height)
        end = max(off + stride * rows
                  for (off, stride), (rows, _) in zip(layout, shapes, strict=True))
        buf = np.zeros(end, np.uint8)
        assert conv.write(frame, target, width, height, buf.ctypes.data, buf.nbytes, layout)
        assert visible_from(buf, fmt, width, height, layout) == visible(frame, fmt)
    # The same layout in a buffer one byte too short is refused, even right
    # after it fitted.
    (offset, stride), (rows, row_bytes) = layout[-1], shapes[-1]
    with pytest.raises(ValueError):
        conv.write(frame, target, width, height, buf.ctypes.data,
                   offset + stride * (rows - 1) + row_bytes - 1, layout)
