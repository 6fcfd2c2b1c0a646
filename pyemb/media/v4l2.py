"""The V4L2 UAPI structures virtio-media carries, as ctypes structures.

virtio-media's payloads are V4L2's own structures in their 64-bit
little-endian layout, whatever the guest's architecture.  Each class here
mirrors ``linux/videodev2.h`` field for field (``tests/test_media_v4l2.py``
checks every size against the host's header); only the constants pyemb
uses are named.
"""

from __future__ import annotations

import ctypes as C
from typing import TypeVar

u8, u16, u32, s32, u64, s64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_int32, C.c_uint64, C.c_int64


class Struct(C.LittleEndianStructure):
    """A V4L2 structure: parse with :meth:`parse`, serialize with ``bytes()``."""

    @classmethod
    def parse(cls: type[T], data: bytes | memoryview) -> T:
        """From the first ``sizeof`` bytes (zero-filled if short)."""
        size = C.sizeof(cls)
        if len(data) < size:
            data = bytes(data) + bytes(size - len(data))
        return cls.from_buffer_copy(data[:size])


T = TypeVar("T", bound=Struct)


class Union(C.LittleEndianUnion):
    pass


def fourcc(code: str) -> int:
    return int.from_bytes(code.encode("ascii"), "little")


def fourcc_str(value: int) -> str:
    return value.to_bytes(4, "little").decode("ascii", "replace")


def cstr(text: str, size: int = 32) -> bytes:
    return text.encode()[: size - 1]


# -- enums and flags ------------------------------------------------------------
BUF_TYPE_VIDEO_CAPTURE = 1
BUF_TYPE_VIDEO_OUTPUT = 2
BUF_TYPE_VIDEO_CAPTURE_MPLANE = 9
BUF_TYPE_VIDEO_OUTPUT_MPLANE = 10
MPLANE_TYPES = (BUF_TYPE_VIDEO_CAPTURE_MPLANE, BUF_TYPE_VIDEO_OUTPUT_MPLANE)
CAPTURE_TYPES = (BUF_TYPE_VIDEO_CAPTURE, BUF_TYPE_VIDEO_CAPTURE_MPLANE)

MEMORY_MMAP = 1
MEMORY_USERPTR = 2
MEMORY_DMABUF = 4

FIELD_ANY = 0
FIELD_NONE = 1

COLORSPACE_SMPTE170M = 1
COLORSPACE_REC709 = 3
XFER_FUNC_DEFAULT = 0
QUANTIZATION_LIM_RANGE = 2

CAP_VIDEO_CAPTURE = 0x00000001
CAP_VIDEO_CAPTURE_MPLANE = 0x00001000
CAP_VIDEO_M2M_MPLANE = 0x00004000
CAP_VIDEO_M2M = 0x00008000
CAP_EXT_PIX_FORMAT = 0x00200000
CAP_STREAMING = 0x04000000

VFL_TYPE_VIDEO = 0

BUF_FLAG_MAPPED = 0x1
BUF_FLAG_QUEUED = 0x2
BUF_FLAG_DONE = 0x4
BUF_FLAG_KEYFRAME = 0x8
BUF_FLAG_PFRAME = 0x10
BUF_FLAG_BFRAME = 0x20
BUF_FLAG_ERROR = 0x40
BUF_FLAG_PREPARED = 0x400
BUF_FLAG_TIMESTAMP_MONOTONIC = 0x2000
BUF_FLAG_TIMESTAMP_COPY = 0x4000
BUF_FLAG_TSTAMP_SRC_EOF = 0x0
BUF_FLAG_LAST = 0x00100000

BUF_CAP_SUPPORTS_MMAP = 1 << 0
BUF_CAP_SUPPORTS_USERPTR = 1 << 1
BUF_CAP_SUPPORTS_ORPHANED_BUFS = 1 << 5
BUF_CAP_SUPPORTS_MAX_NUM_BUFFERS = 1 << 7

FMT_FLAG_COMPRESSED = 0x0001
FMT_FLAG_CONTINUOUS_BYTESTREAM = 0x0004
FMT_FLAG_DYN_RESOLUTION = 0x0008

FRMSIZE_TYPE_DISCRETE = 1
FRMSIZE_TYPE_STEPWISE = 3
FRMIVAL_TYPE_DISCRETE = 1

CAP_TIMEPERFRAME = 0x1000

INPUT_TYPE_CAMERA = 2

CTRL_TYPE_INTEGER = 1
CTRL_TYPE_BOOLEAN = 2
CTRL_TYPE_MENU = 3
CTRL_TYPE_CTRL_CLASS = 6
CTRL_FLAG_READ_ONLY = 0x0004
CTRL_FLAG_VOLATILE = 0x0080
CTRL_FLAG_NEXT_CTRL = 0x80000000
CTRL_FLAG_NEXT_COMPOUND = 0x40000000
CTRL_ID_MASK = 0x0FFFFFFF
CTRL_WHICH_CUR_VAL = 0
CTRL_WHICH_DEF_VAL = 0x0F000000
CTRL_WHICH_REQUEST_VAL = 0x0F010000
CTRL_CLASS_USER = 0x00980000
CID_BASE = 0x00980900
CID_BRIGHTNESS = CID_BASE + 0
CID_CONTRAST = CID_BASE + 1
CID_SATURATION = CID_BASE + 2
CID_MIN_BUFFERS_FOR_CAPTURE = CID_BASE + 39
CTRL_CLASS_CAMERA = 0x009A0000
CID_TEST_PATTERN = 0x009F0903          # V4L2_CID_IMAGE_PROC_CLASS_BASE + 3
CTRL_CLASS_IMAGE_PROC = 0x009F0000

EVENT_EOS = 2
EVENT_CTRL = 3
EVENT_SOURCE_CHANGE = 5
EVENT_SRC_CH_RESOLUTION = 1
EVENT_SUB_FL_SEND_INITIAL = 1

DEC_CMD_START = 0
DEC_CMD_STOP = 1
DEC_CMD_PAUSE = 2
DEC_CMD_RESUME = 3

SEL_TGT_CROP = 0x0000
SEL_TGT_CROP_DEFAULT = 0x0001
SEL_TGT_CROP_BOUNDS = 0x0002
SEL_TGT_COMPOSE = 0x0100
SEL_TGT_COMPOSE_DEFAULT = 0x0101
SEL_TGT_COMPOSE_BOUNDS = 0x0102
SEL_TGT_COMPOSE_PADDED = 0x0103

VIDEO_MAX_PLANES = 8


# -- structures -----------------------------------------------------------------
class Fract(Struct):
    _fields_ = [("numerator", u32), ("denominator", u32)]


class Rect(Struct):
    _fields_ = [("left", s32), ("top", s32), ("width", u32), ("height", u32)]


class Capability(Struct):
    _fields_ = [("driver", u8 * 16), ("card", u8 * 32), ("bus_info", u8 * 32),
                ("version", u32), ("capabilities", u32), ("device_caps", u32),
                ("reserved", u32 * 3)]


class PixFormat(Struct):
    _fields_ = [("width", u32), ("height", u32), ("pixelformat", u32), ("field", u32),
                ("bytesperline", u32), ("sizeimage", u32), ("colorspace", u32),
                ("priv", u32), ("flags", u32), ("ycbcr_enc", u32), ("quantization", u32),
                ("xfer_func", u32)]


class PlanePixFormat(Struct):
    _pack_ = 1
    _fields_ = [("sizeimage", u32), ("bytesperline", u32), ("reserved", u16 * 6)]


class PixFormatMplane(Struct):
    _pack_ = 1
    _fields_ = [("width", u32), ("height", u32), ("pixelformat", u32), ("field", u32),
                ("colorspace", u32), ("plane_fmt", PlanePixFormat * VIDEO_MAX_PLANES),
                ("num_planes", u8), ("flags", u8), ("ycbcr_enc", u8), ("quantization", u8),
                ("xfer_func", u8), ("reserved", u8 * 7)]


class _FormatUnion(Union):
    _fields_ = [("pix", PixFormat), ("pix_mp", PixFormatMplane), ("raw_data", u8 * 200),
                ("_align", u64)]


class Format(Struct):
    _fields_ = [("type", u32), ("fmt", _FormatUnion)]


class Fmtdesc(Struct):
    _fields_ = [("index", u32), ("type", u32), ("flags", u32), ("description", u8 * 32),
                ("pixelformat", u32), ("mbus_code", u32), ("reserved", u32 * 3)]


class Timeval(Struct):
    _fields_ = [("tv_sec", s64), ("tv_usec", s64)]


class Timecode(Struct):
    _fields_ = [("type", u32), ("flags", u32), ("frames", u8), ("seconds", u8),
                ("minutes", u8), ("hours", u8), ("userbits", u8 * 4)]


class _PlaneM(Union):
    _fields_ = [("mem_offset", u32), ("userptr", u64), ("fd", s32)]


class Plane(Struct):
    _fields_ = [("bytesused", u32), ("length", u32), ("m", _PlaneM), ("data_offset", u32),
                ("reserved", u32 * 11)]


class _BufferM(Union):
    _fields_ = [("offset", u32), ("userptr", u64), ("planes", u64), ("fd", s32)]


class Buffer(Struct):
    _fields_ = [("index", u32), ("type", u32), ("bytesused", u32), ("flags", u32),
                ("field", u32), ("timestamp", Timeval), ("timecode", Timecode),
                ("sequence", u32), ("memory", u32), ("m", _BufferM), ("length", u32),
                ("reserved2", u32), ("request_fd", s32)]


class RequestBuffers(Struct):
    _fields_ = [("count", u32), ("type", u32), ("memory", u32), ("capabilities", u32),
                ("flags", u8), ("reserved", u8 * 3)]


class CreateBuffers(Struct):
    _fields_ = [("index", u32), ("count", u32), ("memory", u32), ("format", Format),
                ("capabilities", u32), ("flags", u32), ("max_num_buffers", u32),
                ("reserved", u32 * 5)]


class FrmsizeDiscrete(Struct):
    _fields_ = [("width", u32), ("height", u32)]


class FrmsizeStepwise(Struct):
    _fields_ = [("min_width", u32), ("max_width", u32), ("step_width", u32),
                ("min_height", u32), ("max_height", u32), ("step_height", u32)]


class _FrmsizeUnion(Union):
    _fields_ = [("discrete", FrmsizeDiscrete), ("stepwise", FrmsizeStepwise)]


class Frmsizeenum(Struct):
    _fields_ = [("index", u32), ("pixel_format", u32), ("type", u32), ("u", _FrmsizeUnion),
                ("reserved", u32 * 2)]


class FrmivalStepwise(Struct):
    _fields_ = [("min", Fract), ("max", Fract), ("step", Fract)]


class _FrmivalUnion(Union):
    _fields_ = [("discrete", Fract), ("stepwise", FrmivalStepwise)]


class Frmivalenum(Struct):
    _fields_ = [("index", u32), ("pixel_format", u32), ("width", u32), ("height", u32),
                ("type", u32), ("u", _FrmivalUnion), ("reserved", u32 * 2)]


class CaptureParm(Struct):
    _fields_ = [("capability", u32), ("capturemode", u32), ("timeperframe", Fract),
                ("extendedmode", u32), ("readbuffers", u32), ("reserved", u32 * 4)]


class _ParmUnion(Union):
    _fields_ = [("capture", CaptureParm), ("raw_data", u8 * 200)]


class StreamParm(Struct):
    _fields_ = [("type", u32), ("parm", _ParmUnion)]


class Input(Struct):
    _fields_ = [("index", u32), ("name", u8 * 32), ("type", u32), ("audioset", u32),
                ("tuner", u32), ("std", u64), ("status", u32), ("capabilities", u32),
                ("reserved", u32 * 3)]


class Queryctrl(Struct):
    _fields_ = [("id", u32), ("type", u32), ("name", u8 * 32), ("minimum", s32),
                ("maximum", s32), ("step", s32), ("default_value", s32), ("flags", u32),
                ("reserved", u32 * 2)]


class QueryExtCtrl(Struct):
    _fields_ = [("id", u32), ("type", u32), ("name", u8 * 32), ("minimum", s64),
                ("maximum", s64), ("step", u64), ("default_value", s64), ("flags", u32),
                ("elem_size", u32), ("elems", u32), ("nr_of_dims", u32), ("dims", u32 * 4),
                ("reserved", u32 * 32)]


class _QuerymenuUnion(Union):
    _pack_ = 1
    _fields_ = [("name", u8 * 32), ("value", s64)]


class Querymenu(Struct):
    _pack_ = 1
    _fields_ = [("id", u32), ("index", u32), ("u", _QuerymenuUnion), ("reserved", u32)]


class Control(Struct):
    _fields_ = [("id", u32), ("value", s32)]


class _ExtControlUnion(Union):
    _pack_ = 1
    _fields_ = [("value", s32), ("value64", s64), ("ptr", u64)]


class ExtControl(Struct):
    _pack_ = 1
    _fields_ = [("id", u32), ("size", u32), ("reserved2", u32), ("u", _ExtControlUnion)]


class ExtControls(Struct):
    _fields_ = [("which", u32), ("count", u32), ("error_idx", u32), ("request_fd", s32),
                ("reserved", u32), ("controls", u64)]


class EventSubscription(Struct):
    _fields_ = [("type", u32), ("id", u32), ("flags", u32), ("reserved", u32 * 5)]


class Timespec(Struct):
    _fields_ = [("tv_sec", s64), ("tv_nsec", s64)]


class _EventUnion(Union):
    _fields_ = [("changes", u32), ("data", u8 * 64), ("_align", s64)]


class Event(Struct):
    _fields_ = [("type", u32), ("u", _EventUnion), ("pending", u32), ("sequence", u32),
                ("timestamp", Timespec), ("id", u32), ("reserved", u32 * 8)]


class DecoderCmd(Struct):
    _fields_ = [("cmd", u32), ("flags", u32), ("raw", u32 * 16)]


class Selection(Struct):
    _fields_ = [("type", u32), ("target", u32), ("flags", u32), ("r", Rect),
                ("reserved", u32 * 9)]


class StdId(Struct):
    _fields_ = [("value", u64)]


class Int(Struct):
    """An ``int`` / ``__u32`` payload (STREAMON, G/S_INPUT, priority)."""

    _fields_ = [("value", u32)]
