"""virtio-video-py encoding (device 30) through the patched QEMU and the host
driver, in the ChromeOS driver's flow (tests/encoder_client.py).  Every
bitstream is decoded with PyAV and compared with the pictures that went in."""

from __future__ import annotations

import pytest

from pyemb.video import protocol as p
from tests.conftest import start
from tests.encoder_client import EncodeRun, raw_pictures
from tests.video_client import VideoClient

CODECS = {"h264": p.Format.H264, "hevc": p.Format.HEVC, "vp8": p.Format.VP8,
          "vp9": p.Format.VP9}


def encoder_machine(transport: str = "pci"):
    m = start(transport, "virtio-video-py", "role=encoder", mem_mb=256)
    dev = m.find_virtio(p.ENCODER_DEVICE_ID)
    dev.initialize(want_features=0b11)
    return m, VideoClient(m, dev)


@pytest.fixture
def enc():
    m, client = encoder_machine()
    try:
        yield client
    finally:
        m.stop()


def encode(client: VideoClient, coded: int, pictures: list[bytes], width: int, height: int,
           sid: int = 1, **kw) -> EncodeRun:
    run = EncodeRun(client, sid, coded, pictures, width, height, **kw)
    client.run([run])
    return run


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_each_codec_encodes_what_pyav_decodes_at_35_db(enc, codec):
    pictures = raw_pictures(320, 240, 30)
    run = encode(enc, CODECS[codec], pictures, 320, 240,
                 controls={p.Control.BITRATE: 2_000_000})
    r = run.result
    assert r.drain_status == p.Resp.OK_NODATA and r.eos_seen
    assert all(flags == 0 for flags in r.input_flags)
    assert len(r.packets) == 30
    assert [pk.timestamp for pk in r.packets] == run.timestamps
    assert r.packets[0].flags == p.BufferFlag.IFRAME
    assert all(pk.flags == p.BufferFlag.PFRAME for pk in r.packets[1:])
    assert min(run.psnr()) >= 35
