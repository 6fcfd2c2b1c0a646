"""The pyemb devices seen from the host-side driver: IDs, config space,
one control round trip each, on PCI (x86_64) and virtio-mmio (aarch64)."""

from __future__ import annotations

import struct

import pytest

from pyemb.snd import protocol as snd
from pyemb.video import protocol as video
from tests.conftest import start
from tests.hostdriver.virtio import VIRTIO_F_VERSION_1


def test_snd_device_id_features_and_config(transport):
    m = start(transport, "virtio-snd-py")
    try:
        dev = m.find_virtio(25)
        offered = dev.offered_features()
        assert offered >> VIRTIO_F_VERSION_1 & 1 and offered & 1     # VIRTIO_SND_F_CTLS
        dev.initialize()
        assert len(dev.queues) == 4
        # default card: one playback and one capture stream, mono and stereo
        # channel maps each, volume and switch each
        assert struct.unpack("<IIII", dev.config(16)) == (0, 2, 4, 4)
    finally:
        m.stop()


@pytest.mark.parametrize("role,device_id", [("decoder", 31), ("encoder", 30)])
def test_video_device_id_features_and_config(transport, role, device_id):
    m = start(transport, "virtio-video-py", f"role={role}")
    try:
        dev = m.find_virtio(device_id)
        offered = dev.offered_features()
        assert offered & 0b11 == 0b11          # GUEST_PAGES and NON_CONTIG
        assert not offered & 0b100             # no VIRTIO_OBJECT
        dev.initialize(want_features=0b11)
        assert len(dev.queues) == 2
        assert dev.queues[0].size == 1024
        version, max_caps, max_resp, name = video.CONFIG.unpack(dev.config(video.CONFIG.size))
        assert version == 0 and max_caps > 0 and max_resp > 0
        assert name.rstrip(b"\0") == b"pyemb"
    finally:
        m.stop()


def pcm_info(dev, start_id=0, count=2):
    query = snd.QUERY_INFO.pack(snd.Code.PCM_INFO, start_id, count, snd.PCM_INFO.size)
    return dev.queues[snd.CONTROL_QUEUE].call([query], [4 + count * snd.PCM_INFO.size])


def test_snd_pcm_info_round_trip(transport):
    m = start(transport, "virtio-snd-py")
    try:
        dev = m.find_virtio(25)
        dev.initialize()
        before = dev.interrupts(snd.CONTROL_QUEUE)
        used = pcm_info(dev)
        assert used.written == 4 + 2 * snd.PCM_INFO.size
        assert snd.HDR.unpack_from(used.data)[0] == snd.Status.OK
        out = snd.PcmInfo.unpack(used.data[4:])
        inp = snd.PcmInfo.unpack(used.data[4 + snd.PCM_INFO.size:])
        assert out.direction == snd.Direction.OUTPUT and inp.direction == snd.Direction.INPUT
        assert out.formats >> snd.FORMAT_INDEX["S16"] & 1
        assert out.rates >> snd.RATE_INDEX[48000] & 1
        assert dev.wait_interrupts(snd.CONTROL_QUEUE, before + 1)
        # Out of range: BAD_MSG, and the device keeps serving.
        bad = pcm_info(dev, start_id=1, count=2)
        assert snd.HDR.unpack_from(bad.data)[0] == snd.Status.BAD_MSG
        assert snd.HDR.unpack_from(pcm_info(dev).data)[0] == snd.Status.OK
    finally:
        m.stop()


def query_capability(dev, queue_type):
    cmd = video.QUERY_CAPABILITY.pack(video.Cmd.QUERY_CAPABILITY, 0, queue_type)
    return dev.queues[video.COMMAND_QUEUE].call([cmd], [4096])


def test_video_query_capability_round_trip(transport):
    m = start(transport, "virtio-video-py")
    try:
        dev = m.find_virtio(31)
        dev.initialize(want_features=0b11)
        used = query_capability(dev, video.QueueType.INPUT)
        resp, _, num = video.CAPABILITY_RESP.unpack_from(used.data)
        assert resp == video.Resp.OK_QUERY_CAPABILITY
        formats = []
        off = video.CAPABILITY_RESP.size
        for _ in range(num):
            mask, fmt, layout, align, frames = video.FORMAT_DESC.unpack_from(used.data, off)
            formats.append(fmt)
            assert mask == 0b11                 # NV12 and I420 outputs
            off += video.FORMAT_DESC.size
            for _ in range(frames):
                *_, rates = video.FORMAT_FRAME.unpack_from(used.data, off)
                off += video.FORMAT_FRAME.size + rates * video.FORMAT_RANGE.size
        assert off == used.written
        assert video.Format.H264 in formats and video.Format.VP9 in formats
        out = query_capability(dev, video.QueueType.OUTPUT)
        _, _, num_out = video.CAPABILITY_RESP.unpack_from(out.data)
        assert num_out == 2
    finally:
        m.stop()


def test_qemu_virtio_sound_pci_with_the_same_driver():
    """The reference device answers PCM_INFO through the same driver."""
    from tests.hostdriver import Machine

    with Machine.x86(["-audiodev", "none,id=a", "-device", "virtio-sound-pci,audiodev=a"]) as m:
        dev = m.find_virtio(25)
        dev.initialize()
        before = dev.interrupts(snd.CONTROL_QUEUE)
        used = pcm_info(dev)
        assert snd.HDR.unpack_from(used.data)[0] == snd.Status.OK
        assert dev.wait_interrupts(snd.CONTROL_QUEUE, before + 1)
