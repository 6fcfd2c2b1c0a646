"""virtio-video-py decoding through the patched QEMU and the host driver,
in the ChromeOS driver's flow (tests/video_client.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyemb.video import protocol as p
from tests.conftest import start
from tests.video_client import VideoClient

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors"
CROSVM = VECTORS / "crosvm-test-25fps"


def frame_chunks(data: bytes, codec: str = "h264") -> list[bytes]:
    """The stream cut at frame boundaries (what the ChromeOS driver sends)."""
    import av

    ctx = av.CodecContext.create(codec, "r")
    packets = [bytes(pkt) for pkt in ctx.parse(data)] + [bytes(pkt) for pkt in ctx.parse(None)]
    return [pkt for pkt in packets if pkt]


@pytest.fixture
def video(transport):
    m = start(transport, "virtio-video-py")
    try:
        dev = m.find_virtio(p.DECODER_DEVICE_ID)
        dev.initialize(want_features=0b11)
        yield VideoClient(m, dev)
    finally:
        m.stop()


def test_crosvm_vector_all_250_pictures_match(video):
    data = (CROSVM / "test-25fps.h264").read_bytes()
    expected = [int(c, 16) for c in (CROSVM / "test-25fps.crc").read_text().split()]
    chunks = [(chunk, 1000 * (i + 1)) for i, chunk in enumerate(frame_chunks(data))]
    result = video.decode(1, p.Format.H264, chunks)
    assert result.drain_status == p.Resp.OK_NODATA
    assert [pic.crc for pic in result.pictures] == expected
    assert all(flags == 0 for flags in result.input_flags)
    assert result.events[0] == (p.EventType.DECODER_RESOLUTION_CHANGED, 1)
