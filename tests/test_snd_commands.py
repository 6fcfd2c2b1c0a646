"""virtio-snd control requests parsed into typed values (pyemb/snd/commands.py)."""

from __future__ import annotations

import struct

import pytest

from pyemb.device import ProtocolError
from pyemb.snd import commands as c
from pyemb.snd import protocol as p


def test_every_field_comes_out_named():
    assert c.parse(p.QUERY_INFO.pack(p.Code.PCM_INFO, 2, 3, p.PCM_INFO.size)) == \
        c.Query(p.Code.PCM_INFO, 2, 3, p.PCM_INFO.size)
    assert c.parse(p.JACK_REMAP.pack(p.Code.JACK_REMAP, 1, 7, 9)) == \
        c.JackRemap(p.Code.JACK_REMAP, 1, 7, 9)
    params = p.SetParams(4, 8192, 1024, 0, 2, p.FORMAT_INDEX["S16"], p.RATE_INDEX[48000])
    got = c.parse(params.pack())
    assert got == c.PcmSetParams(p.Code.PCM_SET_PARAMS, params) and got.stream_id == 4
    assert c.parse(p.PCM_HDR.pack(p.Code.PCM_START, 5)) == c.PcmCommand(p.Code.PCM_START, 5)
    value = bytes(range(256)) * 2
    assert c.parse(p.CTL_HDR.pack(p.Code.CTL_WRITE, 3) + value) == \
        c.CtlCommand(p.Code.CTL_WRITE, 3, value)
    assert c.parse(p.CTL_HDR.pack(p.Code.CTL_READ, 6)) == c.CtlCommand(p.Code.CTL_READ, 6)
    # The TLV writes and ENUM_ITEMS are refused by the device whatever follows.
    assert c.parse(p.CTL_HDR.pack(p.Code.CTL_TLV_WRITE, 1) + b"x" * 12).control_id == 1


@pytest.mark.parametrize("data", [
    b"\x01",                                                   # no header
    struct.pack("<I", 0x0999),                                 # unknown code
    p.QUERY_INFO.pack(p.Code.PCM_INFO, 0, 1, 32) + b"\0",      # a byte too many
    p.JACK_REMAP.pack(p.Code.JACK_REMAP, 0, 0, 0)[:-1],
    p.PCM_SET_PARAMS.pack(p.Code.PCM_SET_PARAMS, 0, 0, 0, 0, 0, 0, 0)[:-1],
    p.PCM_HDR.pack(p.Code.PCM_STOP, 0) + b"\0\0\0\0",
    struct.pack("<I", p.Code.CTL_READ),                        # no control id
    p.CTL_HDR.pack(p.Code.CTL_READ, 0) + b"\0",
    p.CTL_HDR.pack(p.Code.CTL_WRITE, 0) + bytes(p.CTL_VALUE_SIZE - 1),
])
def test_malformed_requests_are_bad_msg(data):
    with pytest.raises(ProtocolError) as e:
        c.parse(data)
    assert e.value.status == p.Status.BAD_MSG
