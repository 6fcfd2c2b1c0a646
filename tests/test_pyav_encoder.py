"""The PyAV encode engine and its config, without QEMU: what the device's
encoder streams are built on (pyemb/pyav_encoder.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pyemb.config import ConfigError
from pyemb.pyav_encoder import H264_LEVELS, encoder_choices, h264_level
from pyemb.video import protocol as p
from pyemb.video_backend import EncoderSettings, PyAVBackend, RawImage
from tests.encoder_client import decode_packets, nv12_to_i420, psnr, raw_pictures

W, H = 192, 128


def settings(coded=p.Format.H264, **kw) -> EncoderSettings:
    values = dict(coded=coded, width=W, height=H, frame_rate=30, bitrate=1_000_000,
                  peak_bitrate=1_500_000, cbr=False)
    values.update(kw)
    return EncoderSettings(**values)


def encode(backend: PyAVBackend, s: EncoderSettings, count: int, keyframes=()):
    session = backend.open_encoder(s)
    pictures = raw_pictures(s.width, s.height, count)
    packets = []
    for i, packed in enumerate(pictures):
        data = np.frombuffer(packed, np.uint8)
        picture = session.take(RawImage(p.Format.NV12, s.width, s.height, data.ctypes.data,
                                        data.nbytes, [(0, s.width),
                                                      (s.width * s.height, s.width)]))
        packets += session.encode(picture, 100 + i, i in keyframes)
    packets += session.flush()
    session.close()
    return pictures, packets


@pytest.mark.parametrize("coded", [p.Format.H264, p.Format.HEVC, p.Format.VP8, p.Format.VP9])
def test_every_default_encoder_makes_what_pyav_decodes(coded):
    pictures, packets = encode(PyAVBackend({}), settings(coded), 10, keyframes={4})
    assert [pk.timestamp for pk in packets] == [100 + i for i in range(10)]
    assert [i for i, pk in enumerate(packets) if pk.flags == p.BufferFlag.IFRAME] == [0, 4]
    decoded = decode_packets(coded, [pk.data for pk in packets])
    assert min(psnr(a, nv12_to_i420(b, W, H)) for a, b in zip(decoded, pictures,
                                                              strict=True)) >= 35


def test_bframes_from_the_config_are_flagged():
    backend = PyAVBackend({"encoders": {"h264": {"bframes": 2}}})
    _, packets = encode(backend, settings(), 12)
    assert p.BufferFlag.BFRAME in {pk.flags for pk in packets}
    # Packets come in decode order; each keeps its own picture's timestamp.
    assert sorted(pk.timestamp for pk in packets) == [100 + i for i in range(12)]


def test_keyframe_interval_from_the_config():
    backend = PyAVBackend({"encoders": {"vp8": {"keyframe_interval": 5}}})
    _, packets = encode(backend, settings(p.Format.VP8), 12)
    assert [i for i, pk in enumerate(packets) if pk.flags == p.BufferFlag.IFRAME] == [0, 5, 10]


@pytest.mark.parametrize("table,message", [
    ({"av1": {}}, "backend.encoders.av1: not one of h264, hevc, vp8, vp9"),
    ({"h264": {"codec": "libnope"}}, "backend.encoders.h264.codec: this FFmpeg has no encoder"),
    ({"h264": {"codec": 3}}, "backend.encoders.h264.codec must be an FFmpeg encoder name"),
    ({"vp9": {"options": {"deadline": True}}}, "backend.encoders.vp9.options must be a table"),
    ({"hevc": {"bframes": 99}}, "backend.encoders.hevc.bframes must be an integer from 0 to 16"),
    ({"vp8": "libvpx"}, "[backend.encoders.vp8] must be a table"),
])
def test_a_bad_encoder_table_is_one_line_saying_what_to_fix(table, message):
    with pytest.raises(ConfigError) as exc:
        encoder_choices(table)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_a_format_can_be_turned_off_and_another_encoder_chosen():
    choices = encoder_choices({"hevc": {"codec": ""}, "h264": {"codec": "h264_nvenc"}})
    assert p.Format.HEVC not in choices
    assert choices[p.Format.H264].codec == "h264_nvenc"
    assert choices[p.Format.H264].family == "ffmpeg"


def test_h264_level_is_a_floor_raised_to_what_the_stream_needs():
    # 1.0 (what the ChromeOS driver asks at open) cannot hold 720p30.
    assert h264_level(settings(width=1280, height=720, level=0x100)) == 0x108    # 3.1
    assert h264_level(settings(width=1920, height=1080, level=0x100)) == 0x10A   # 4.0
    assert h264_level(settings(width=1920, height=1080, bitrate=30_000_000,
                               peak_bitrate=30_000_000)) == 0x10B             # 4.1: the rate
    assert h264_level(settings(level=0x10D)) == 0x10D                            # asked: kept
    assert h264_level(settings(width=176, height=144, frame_rate=15, bitrate=64_000,
                               peak_bitrate=64_000)) == 0x100
    assert set(H264_LEVELS) == set(range(0x100, 0x10F))


def test_another_ffmpeg_encoder_gets_its_own_rate_control_keyframe_and_profile_options():
    """NVENC cannot run here (no GPU), but what it would be opened with can
    be checked: its own ``rc``, ``forced-idr`` and ``profile`` options."""
    from pyemb.pyav_encoder import encoder_options

    choice = encoder_choices({"h264": {"codec": "h264_nvenc"}})[p.Format.H264]
    assert list(choice.profiles) == [0x101, 0x100, 0x103]
    options, context_profile = encoder_options(choice, settings(cbr=True, profile=0x103))
    assert options["rc"] == "cbr" and options["forced-idr"] == "1"
    assert options["profile"] == "high" and context_profile is None
    assert options["maxrate"] == options["minrate"] == options["b"] == "1000000"
    options, _ = encoder_options(choice, settings(cbr=False))
    assert options["rc"] == "vbr" and options["maxrate"] == "1500000"
