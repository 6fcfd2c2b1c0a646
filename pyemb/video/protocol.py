"""virtio-video wire format: the v3 RFC as extended by ChromeOS.

Only structs and constants live here; see ../shared/protocols/virtio-video.md.
All integers are little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

ENCODER_DEVICE_ID = 30
DECODER_DEVICE_ID = 31

COMMAND_QUEUE, EVENT_QUEUE = range(2)

# Feature bits
F_RESOURCE_GUEST_PAGES = 0
F_RESOURCE_NON_CONTIG = 1
F_RESOURCE_VIRTIO_OBJECT = 2


class Cmd(IntEnum):
    QUERY_CAPABILITY = 0x100
    STREAM_CREATE = 0x101
    STREAM_DESTROY = 0x102
    STREAM_DRAIN = 0x103
    RESOURCE_CREATE = 0x104
    RESOURCE_QUEUE = 0x105
    RESOURCE_DESTROY_ALL = 0x106
    QUEUE_CLEAR = 0x107
    GET_PARAMS = 0x108
    SET_PARAMS = 0x109
    QUERY_CONTROL = 0x10A
    GET_CONTROL = 0x10B
    SET_CONTROL = 0x10C
    GET_PARAMS_EXT = 0x10D
    SET_PARAMS_EXT = 0x10E


class Resp(IntEnum):
    OK_NODATA = 0x200
    OK_QUERY_CAPABILITY = 0x201
    OK_RESOURCE_QUEUE = 0x202
    OK_GET_PARAMS = 0x203
    OK_QUERY_CONTROL = 0x204
    OK_GET_CONTROL = 0x205
    ERR_INVALID_OPERATION = 0x300
    ERR_OUT_OF_MEMORY = 0x301
    ERR_INVALID_STREAM_ID = 0x302
    ERR_INVALID_RESOURCE_ID = 0x303
    ERR_INVALID_PARAMETER = 0x304
    ERR_UNSUPPORTED_CONTROL = 0x305


class QueueType(IntEnum):
    INPUT = 0x100
    OUTPUT = 0x101


class PlanesLayout(IntEnum):
    SINGLE_BUFFER = 1
    PER_PLANE = 2


class Format(IntEnum):
    ARGB8888 = 1
    BGRA8888 = 2
    NV12 = 3
    YUV420 = 4
    YVU420 = 5
    MPEG2 = 0x1000
    MPEG4 = 0x1001
    H264 = 0x1002
    HEVC = 0x1003
    VP8 = 0x1004
    VP9 = 0x1005


HDR = struct.Struct("<II")                       # {type, stream_id}
QUERY_CAPABILITY = struct.Struct("<III4x")       # hdr.type, hdr.stream_id, queue_type
CAPABILITY_RESP = struct.Struct("<III4x")        # hdr + num_descs
FORMAT_DESC = struct.Struct("<QIIII")            # mask, format, planes_layout, align, frames
FORMAT_FRAME = struct.Struct("<III4xIII4xI4x")   # width{min,max,step}, height{...}, rates
FORMAT_RANGE = struct.Struct("<III4x")           # min, max, step
CONFIG = struct.Struct("<III32s")                # version, max_caps, max_resp, name


@dataclass(frozen=True)
class Range:
    min: int
    max: int
    step: int = 1

    def pack(self) -> bytes:
        return FORMAT_RANGE.pack(self.min, self.max, self.step)


@dataclass(frozen=True)
class FormatFrame:
    width: Range
    height: Range
    frame_rates: tuple[Range, ...] = ()

    def pack(self) -> bytes:
        head = FORMAT_FRAME.pack(self.width.min, self.width.max, self.width.step,
                                 self.height.min, self.height.max, self.height.step,
                                 len(self.frame_rates))
        return head + b"".join(r.pack() for r in self.frame_rates)


@dataclass(frozen=True)
class FormatDesc:
    """One format a queue supports; ``mask`` bit i = compatible with the
    other queue's descriptor i."""

    format: Format
    mask: int = 0
    planes_layout: PlanesLayout = PlanesLayout.SINGLE_BUFFER
    plane_align: int = 1
    frames: tuple[FormatFrame, ...] = field(default_factory=tuple)

    def pack(self) -> bytes:
        head = FORMAT_DESC.pack(self.mask, self.format, self.planes_layout,
                                self.plane_align, len(self.frames))
        return head + b"".join(f.pack() for f in self.frames)


def reply(resp: Resp, stream_id: int = 0) -> bytes:
    """A bare response header (OK_NODATA or an error)."""
    return HDR.pack(resp, stream_id)


class MemType(IntEnum):
    GUEST_PAGES = 0
    VIRTIO_OBJECT = 1


class BufferFlag(IntEnum):
    ERR = 0x1
    EOS = 0x2
    IFRAME = 0x4
    PFRAME = 0x8
    BFRAME = 0x10


class Control(IntEnum):
    BITRATE = 1
    PROFILE = 2
    LEVEL = 3
    FORCE_KEYFRAME = 4
    BITRATE_MODE = 5
    BITRATE_PEAK = 6
    PREPEND_SPSPPS_TO_IDR = 7


class EventType(IntEnum):
    ERROR = 0x100
    DECODER_RESOLUTION_CHANGED = 0x200


MAX_PLANES = 8

# Commands after the 8-byte header (type, stream_id); sizes include it.
STREAM_CREATE = struct.Struct("<IIIIII64s")          # in/out mem type, coded format, tag
RESOURCE_CREATE = struct.Struct("<IIIIII8I8I")        # queue, id, layout, planes, offsets, entries
MEM_ENTRY = struct.Struct("<QI4x")                    # addr, length
RESOURCE_QUEUE = struct.Struct("<IIIIQI8I4x")         # queue, id, timestamp, n, data_sizes
RESOURCE_QUEUE_RESP = struct.Struct("<IIQII")         # hdr, timestamp, flags, size
QUEUE_CMD = struct.Struct("<III4x")                   # DESTROY_ALL, QUEUE_CLEAR, GET_PARAMS(_EXT)
QUERY_CONTROL = struct.Struct("<III4xI4x")            # control, (pad), format
QUERY_CONTROL_RESP = struct.Struct("<III4x")          # hdr, num, then le32 values
GET_CONTROL = struct.Struct("<III4x")                 # control
GET_CONTROL_RESP = struct.Struct("<III4x")            # hdr, value
SET_CONTROL = struct.Struct("<III4xI4x")              # control, value
# FORCE_KEYFRAME has no value: the ChromeOS driver sends the 16-byte head only.
SET_CONTROL_HEAD = struct.Struct("<III4x")            # control
PARAMS = struct.Struct("<" + "I" * 28)                # 112 bytes (v3)
PARAMS_EXT = struct.Struct("<" + "I" * 30)            # 120 bytes
EVENT = struct.Struct("<II")                          # event_type, stream_id


@dataclass
class Params:
    """virtio_video_params (v3) and params_ext (resource_type)."""

    queue_type: int
    format: int = 0
    frame_width: int = 0
    frame_height: int = 0
    min_buffers: int = 1
    max_buffers: int = 32
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)        # left, top, width, height
    frame_rate: int = 0
    plane_formats: list[tuple[int, int]] = field(default_factory=list)  # (size, stride)
    resource_type: int = MemType.GUEST_PAGES

    def _fields(self) -> list[int]:
        planes = list(self.plane_formats)[:MAX_PLANES]
        flat = [v for plane in planes for v in plane]
        flat += [0] * (2 * MAX_PLANES - len(flat))
        return [self.queue_type, self.format, self.frame_width, self.frame_height,
                self.min_buffers, self.max_buffers, *self.crop, self.frame_rate,
                len(planes), *flat]

    def pack(self) -> bytes:
        return PARAMS.pack(*self._fields())

    def pack_ext(self) -> bytes:
        return PARAMS_EXT.pack(*self._fields(), self.resource_type, 0)

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0, ext: bool = False) -> Params:
        v = (PARAMS_EXT if ext else PARAMS).unpack_from(data, offset)
        num_planes = min(v[11], MAX_PLANES)
        planes = [(v[12 + 2 * i], v[13 + 2 * i]) for i in range(num_planes)]
        return cls(v[0], v[1], v[2], v[3], v[4], v[5], (v[6], v[7], v[8], v[9]), v[10],
                   planes, v[28] if ext else MemType.GUEST_PAGES)


def resource_queue_reply(timestamp: int, flags: int = 0, size: int = 0) -> bytes:
    return RESOURCE_QUEUE_RESP.pack(Resp.OK_RESOURCE_QUEUE, 0, timestamp, flags, size)
