"""virtio-video commands parsed into typed values (pyemb/video/commands.py):
named fields out, the protocol's error for what is malformed."""

from __future__ import annotations

import pytest

from pyemb.device import ProtocolError
from pyemb.video import protocol as p
from pyemb.video.commands import (
    QueueCommand,
    ResourceCreate,
    ResourceQueue,
    SetControl,
    SetParams,
    StreamCreate,
    parse,
)


def test_every_field_comes_out_named():
    cmd = parse(p.STREAM_CREATE.pack(p.Cmd.STREAM_CREATE, 7, 1, 0, p.Format.VP9, 0, b"t"))
    assert cmd == StreamCreate(p.Cmd.STREAM_CREATE, 7, 1, 0, p.Format.VP9)
    entries = [(0x10000, 4096), (0x30000, 100)]
    body = p.RESOURCE_CREATE.pack(p.Cmd.RESOURCE_CREATE, 7, p.QueueType.OUTPUT, 3,
                                  p.PlanesLayout.SINGLE_BUFFER, 1, *([0] * 8), 2, *([0] * 7))
    cmd = parse(body + b"".join(p.MEM_ENTRY.pack(a, n) for a, n in entries))
    assert cmd == ResourceCreate(p.Cmd.RESOURCE_CREATE, 7, p.QueueType.OUTPUT, 3,
                                 p.PlanesLayout.SINGLE_BUFFER, (0,), tuple(entries))
    cmd = parse(p.RESOURCE_QUEUE.pack(p.Cmd.RESOURCE_QUEUE, 7, p.QueueType.INPUT, 3, 99, 2,
                                      10, 20, *([0] * 6)))
    assert cmd == ResourceQueue(p.Cmd.RESOURCE_QUEUE, 7, p.QueueType.INPUT, 3, 99, (10, 20))
    cmd = parse(p.QUEUE_CMD.pack(p.Cmd.GET_PARAMS_EXT, 7, p.QueueType.OUTPUT))
    assert cmd == QueueCommand(p.Cmd.GET_PARAMS_EXT, 7, p.QueueType.OUTPUT)
    params = p.Params(p.QueueType.INPUT, p.Format.NV12, 320, 240, frame_rate=30)
    cmd = parse(p.HDR.pack(p.Cmd.SET_PARAMS_EXT, 7) + params.pack_ext())
    assert isinstance(cmd, SetParams) and cmd.ext and cmd.params.frame_width == 320
    # FORCE_KEYFRAME as the ChromeOS driver sends it: no value.
    cmd = parse(p.SET_CONTROL_HEAD.pack(p.Cmd.SET_CONTROL, 7, p.Control.FORCE_KEYFRAME))
    assert cmd == SetControl(p.Cmd.SET_CONTROL, 7, p.Control.FORCE_KEYFRAME, 1)


@pytest.mark.parametrize("data,status", [
    (b"\x00\x01", p.Resp.ERR_INVALID_PARAMETER),                          # short header
    (p.HDR.pack(0x1FF, 1), p.Resp.ERR_INVALID_OPERATION),                 # unknown command
    (p.QUEUE_CMD.pack(p.Cmd.QUEUE_CLEAR, 1, 0x555), p.Resp.ERR_INVALID_PARAMETER),
    (p.STREAM_CREATE.pack(p.Cmd.STREAM_CREATE, 1, 9, 0, p.Format.H264, 0, b""),
     p.Resp.ERR_INVALID_PARAMETER),                                       # mem type
    (p.RESOURCE_CREATE.pack(p.Cmd.RESOURCE_CREATE, 1, p.QueueType.INPUT, 0, 1, 9,
                            *([0] * 16)), p.Resp.ERR_INVALID_PARAMETER),  # 9 planes
    (p.RESOURCE_CREATE.pack(p.Cmd.RESOURCE_CREATE, 1, p.QueueType.INPUT, 0, 1, 1,
                            *([0] * 8), 1, *([0] * 7)), p.Resp.ERR_INVALID_PARAMETER),
    (p.SET_CONTROL_HEAD.pack(p.Cmd.SET_CONTROL, 1, p.Control.BITRATE),
     p.Resp.ERR_INVALID_PARAMETER),                                       # value missing
    (p.HDR.pack(p.Cmd.SET_PARAMS, 1) + bytes(40), p.Resp.ERR_INVALID_PARAMETER),
])
def test_malformed_commands_fail_with_the_protocol_error(data, status):
    with pytest.raises(ProtocolError) as exc:
        parse(data)
    assert exc.value.status == status
