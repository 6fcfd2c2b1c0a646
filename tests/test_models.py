"""Pure-Python tier: the device models and config handling, no QEMU."""

from __future__ import annotations

import struct

import pytest

from pyemb.config import ConfigError, import_class
from pyemb.device import DeviceModel, write_all
from pyemb.host import create_device
from pyemb.video import protocol as video
from pyemb.video.device import VideoDevice
from tests.fakes import FakeHandle, FakeRequest


def control(model: DeviceModel, command: bytes, reply_size: int, queue: int = 0) -> bytes:
    req = FakeRequest([command], [reply_size], queue)
    model.handle_request(queue, req)
    assert req.done
    return req.reply


# -- virtio-video --------------------------------------------------------------
def query_capability(queue_type: int) -> bytes:
    return video.QUERY_CAPABILITY.pack(video.Cmd.QUERY_CAPABILITY, 0, queue_type)


def test_video_device_id_follows_role():
    assert VideoDevice(FakeHandle(), {}).device_id == 31
    assert VideoDevice(FakeHandle(), {}, role="encoder").device_id == 30
    with pytest.raises(ConfigError):
        VideoDevice(FakeHandle(), {}, role="transcoder")


def test_video_capabilities_list_pyav_decoders_with_compatible_masks():
    model = VideoDevice(FakeHandle(), {})
    reply = control(model, query_capability(video.QueueType.INPUT), 4096)
    resp, _, num = video.CAPABILITY_RESP.unpack_from(reply)
    assert resp == video.Resp.OK_QUERY_CAPABILITY
    # Written out from the protocol page, not from the backend the device
    # asks: each coded format, compatible with both raw outputs (mask 0b11),
    # one frame range 16..4096 in steps of 1 with rates 1..120.
    frame = struct.pack("<III4xIII4xI4x", 16, 4096, 1, 16, 4096, 1, 1)
    frame += struct.pack("<III4x", 1, 120, 1)
    formats = [0x1002, 0x1003, 0x1004, 0x1005, 0x1000, 0x1001]  # H.264 HEVC VP8 VP9 MPEG-2/4
    expected = b"".join(struct.pack("<QIIII", 0b11, fmt, 1, 1, 1) + frame for fmt in formats)
    assert num == len(formats)
    assert reply[video.CAPABILITY_RESP.size:] == expected


@pytest.mark.parametrize("command,status", [
    (query_capability(0x123), video.Resp.ERR_INVALID_PARAMETER),
    (b"\x00\x01\x00", video.Resp.ERR_INVALID_PARAMETER),
    (video.HDR.pack(video.Cmd.QUERY_CAPABILITY, 0), video.Resp.ERR_INVALID_PARAMETER),
    (video.HDR.pack(0x1FF, 0), video.Resp.ERR_INVALID_OPERATION),
])
def test_video_malformed_command_gets_error(command, status):
    model = VideoDevice(FakeHandle(), {})
    assert video.HDR.unpack_from(control(model, command, 64))[0] == status


def test_video_capability_reply_larger_than_buffer_is_refused():
    model = VideoDevice(FakeHandle(), {})
    reply = control(model, query_capability(video.QueueType.INPUT), 32)
    assert video.HDR.unpack_from(reply)[0] == video.Resp.ERR_INVALID_PARAMETER


# -- the model base class and configuration -------------------------------------
class Exploding(DeviceModel):
    device_id = 25
    queue_sizes = (8,)

    def queue_handlers(self):
        return [self.boom]

    def boom(self, request):
        raise KeyError("boom")


def test_exception_in_handler_completes_the_request(caplog):
    model = Exploding(FakeHandle(), {})
    req = FakeRequest([b"x"], [4])
    model.handle_request(0, req)
    assert req.done and req.written == 0
    assert "KeyError: 'boom'" in caplog.text


def test_write_all_scatters_across_views_and_cuts_off():
    req = FakeRequest([], [3, 2, 4])
    assert write_all(req, b"abcdefgh") == 8
    req.complete(8)
    assert req.reply == b"abcdefgh"
    assert write_all(FakeRequest([], [2]), b"abcdef") == 2


def test_create_device_accepts_a_whole_model_as_backend():
    model = create_device("snd", None, "tests.models:ProbeDevice", None, FakeHandle())
    assert type(model).__name__ == "ProbeDevice"


@pytest.mark.parametrize("spec,message", [
    ("nomodule", "must be written module:Class"),
    ("no_such_mod:X", "cannot import backend 'no_such_mod:X'"),
    ("pyemb.snd_backend:Missing", "has no class Missing"),
])
def test_import_class_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        import_class(spec)


def test_backend_of_the_wrong_kind_is_refused():
    with pytest.raises(ConfigError, match="is not a pyemb SndBackend"):
        create_device("snd", None, "pyemb.video_backend:PyAVBackend", None, FakeHandle())


def test_backend_can_come_from_the_config_file(tmp_path):
    cfg = tmp_path / "video.toml"
    cfg.write_text('[backend]\nclass = "tests.models:FlakyVideoBackend"\n'
                   '[video]\ndevice_name = "gpu0"\n')
    model = create_device("video", "decoder", None, str(cfg), FakeHandle())
    assert type(model.backend).__name__ == "FlakyVideoBackend"
    assert model.read_config()[12:16] == b"gpu0"


def test_missing_config_file_is_one_line():
    with pytest.raises(ConfigError, match="config /nonexistent.toml: No such file"):
        create_device("snd", None, None, "/nonexistent.toml", FakeHandle())
