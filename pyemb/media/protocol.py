"""virtio-media's wire format: commands, replies, events and the ioctl table.

Every command starts ``{le32 cmd, le32 reserved}`` and every reply
``{le32 status, le32 reserved}``; status is 0 or a positive Linux errno.
An IOCTL carries its V4L2 payload after the command (``_IOW``/``_IOWR``) and
gets it back after the reply (``_IOR``/``_IOWR``).  See
``../shared/guest-drivers/virtio-media/README.md`` and ``driver/protocol.h``.
"""

from __future__ import annotations

import ctypes as C
import errno
import struct
from dataclasses import dataclass
from enum import IntEnum

from pyemb.media import v4l2

DEVICE_ID = 48
COMMAND_QUEUE, EVENT_QUEUE = 0, 1
CONFIG = struct.Struct("<II32s")         # device_caps, device_type, card

HEADER = struct.Struct("<II")            # cmd/status or event, reserved/session
IOCTL = struct.Struct("<IIII")           # cmd, reserved, session, code
OPEN_REPLY = struct.Struct("<IIII")      # status, reserved, session, reserved
MMAP = struct.Struct("<IIIII")           # cmd, reserved, session, flags, offset
MMAP_REPLY = struct.Struct("<IIQQ")      # status, reserved, driver_addr, len
MUNMAP = struct.Struct("<IIQ")           # cmd, reserved, driver_addr
SG_ENTRY = struct.Struct("<QII")         # start, len, reserved
MMAP_FLAG_RW = 1


class Cmd(IntEnum):
    OPEN = 1
    CLOSE = 2
    IOCTL = 3
    MMAP = 4
    MUNMAP = 5


class Evt(IntEnum):
    ERROR = 0
    DQBUF = 1
    EVENT = 2


# The driver posts event buffers of the largest event's size.
DQBUF_EVENT_SIZE = (HEADER.size + C.sizeof(v4l2.Buffer)
                    + v4l2.VIDEO_MAX_PLANES * C.sizeof(v4l2.Plane))
EVENT_SIZE = DQBUF_EVENT_SIZE


class V4L2Error(Exception):
    """An ioctl's failure: the reply's status is ``errno``.  ``payload``, if
    set, is written back anyway (G_EXT_CTRLS' error_idx, for instance)."""

    def __init__(self, code: int, message: str = "", payload: bytes | None = None) -> None:
        super().__init__(message or errno.errorcode.get(code, str(code)))
        self.errno = code
        self.payload = payload


def reply(status: int = 0) -> bytes:
    return HEADER.pack(status, 0)


def error_event(session: int, code: int) -> bytes:
    return HEADER.pack(Evt.ERROR, session) + struct.pack("<II", code, 0)


def dqbuf_event(session: int, buffer: v4l2.Buffer, planes: list[v4l2.Plane]) -> bytes:
    body = bytes(buffer) + b"".join(bytes(p) for p in planes)
    return (HEADER.pack(Evt.DQBUF, session) + body).ljust(DQBUF_EVENT_SIZE, b"\0")


def dqbuf_event_queue(payload: bytes) -> tuple[int, int] | None:
    """The session and buffer type a DQBUF event is for; None for other events."""
    event, session = HEADER.unpack_from(payload)
    if event != Evt.DQBUF:
        return None
    return session, int.from_bytes(payload[HEADER.size + 4:HEADER.size + 8], "little")


def v4l2_event(session: int, event: v4l2.Event) -> bytes:
    return HEADER.pack(Evt.EVENT, session) + bytes(event)


# -- the ioctl table ----------------------------------------------------------------
R, W, WR = 1, 2, 3                       # payload direction: device writes / reads / both


@dataclass(frozen=True)
class Ioctl:
    code: int
    name: str                            # the method a session implements: ioctl_<name>
    direction: int
    payload: type[v4l2.Struct]

    @property
    def size(self) -> int:
        return C.sizeof(self.payload)


# Every ioctl of videodev2.h a device may be asked for: code, name, direction,
# payload.  QUERYCAP, DQBUF and DQEVENT are the driver's own business (config
# space and events replace them): they answer ENOTTY like unknown codes.
IOCTLS = {i.code: i for i in [
    Ioctl(2, "enum_fmt", WR, v4l2.Fmtdesc),
    Ioctl(4, "g_fmt", WR, v4l2.Format),
    Ioctl(5, "s_fmt", WR, v4l2.Format),
    Ioctl(8, "reqbufs", WR, v4l2.RequestBuffers),
    Ioctl(9, "querybuf", WR, v4l2.Buffer),
    Ioctl(15, "qbuf", WR, v4l2.Buffer),
    Ioctl(18, "streamon", W, v4l2.Int),
    Ioctl(19, "streamoff", W, v4l2.Int),
    Ioctl(21, "g_parm", WR, v4l2.StreamParm),
    Ioctl(22, "s_parm", WR, v4l2.StreamParm),
    Ioctl(23, "g_std", R, v4l2.StdId),
    Ioctl(24, "s_std", W, v4l2.StdId),
    Ioctl(26, "enuminput", WR, v4l2.Input),
    Ioctl(27, "g_ctrl", WR, v4l2.Control),
    Ioctl(28, "s_ctrl", WR, v4l2.Control),
    Ioctl(36, "queryctrl", WR, v4l2.Queryctrl),
    Ioctl(37, "querymenu", WR, v4l2.Querymenu),
    Ioctl(38, "g_input", R, v4l2.Int),
    Ioctl(39, "s_input", WR, v4l2.Int),
    Ioctl(46, "g_output", R, v4l2.Int),
    Ioctl(47, "s_output", WR, v4l2.Int),
    Ioctl(63, "querystd", R, v4l2.StdId),
    Ioctl(64, "try_fmt", WR, v4l2.Format),
    Ioctl(67, "g_priority", R, v4l2.Int),
    Ioctl(68, "s_priority", W, v4l2.Int),
    Ioctl(71, "g_ext_ctrls", WR, v4l2.ExtControls),
    Ioctl(72, "s_ext_ctrls", WR, v4l2.ExtControls),
    Ioctl(73, "try_ext_ctrls", WR, v4l2.ExtControls),
    Ioctl(74, "enum_framesizes", WR, v4l2.Frmsizeenum),
    Ioctl(75, "enum_frameintervals", WR, v4l2.Frmivalenum),
    Ioctl(90, "subscribe_event", W, v4l2.EventSubscription),
    Ioctl(91, "unsubscribe_event", W, v4l2.EventSubscription),
    Ioctl(92, "create_bufs", WR, v4l2.CreateBuffers),
    Ioctl(93, "prepare_buf", WR, v4l2.Buffer),
    Ioctl(94, "g_selection", WR, v4l2.Selection),
    Ioctl(95, "s_selection", WR, v4l2.Selection),
    Ioctl(96, "decoder_cmd", WR, v4l2.DecoderCmd),
    Ioctl(97, "try_decoder_cmd", WR, v4l2.DecoderCmd),
    Ioctl(103, "query_ext_ctrl", WR, v4l2.QueryExtCtrl),
]}
BUFFER_IOCTLS = ("querybuf", "qbuf", "prepare_buf")     # v4l2_buffer + planes + SG lists
EXT_CTRL_IOCTLS = ("g_ext_ctrls", "s_ext_ctrls", "try_ext_ctrls")  # + v4l2_ext_control[count]
