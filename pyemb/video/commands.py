"""virtio-video commands parsed once into typed values (crosvm's
``command.rs`` is the model): a handler gets named fields, never byte
offsets, and a malformed command fails here with the protocol's error.

What a command says about itself is checked here (sizes, queue types, plane
counts, entries); what depends on the device's state (whether the stream
exists, what its params allow) is the device's to check.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyemb.device import ProtocolError
from pyemb.video import protocol as p
from pyemb.video.resources import parse_entries


def need(data: bytes, size: int, what: str) -> None:
    if len(data) < size:
        raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"short {what}")


def queue_type_of(value: int) -> p.QueueType:
    if value not in (p.QueueType.INPUT, p.QueueType.OUTPUT):
        raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"queue_type 0x{value:x}")
    return p.QueueType(value)


@dataclass(frozen=True)
class Command:
    kind: p.Cmd
    stream_id: int


@dataclass(frozen=True)
class QueryCapability(Command):
    queue_type: p.QueueType


@dataclass(frozen=True)
class StreamCreate(Command):
    in_mem: int
    out_mem: int
    coded_format: int


@dataclass(frozen=True)
class StreamCommand(Command):
    """STREAM_DESTROY, STREAM_DRAIN: the header alone."""


@dataclass(frozen=True)
class ResourceCreate(Command):
    queue_type: p.QueueType
    resource_id: int
    planes_layout: int
    plane_offsets: tuple[int, ...]
    entries: tuple[tuple[int, int], ...]          # (guest address, length)


@dataclass(frozen=True)
class ResourceQueue(Command):
    queue_type: p.QueueType
    resource_id: int
    timestamp: int
    data_sizes: tuple[int, ...]


@dataclass(frozen=True)
class QueueCommand(Command):
    """RESOURCE_DESTROY_ALL, QUEUE_CLEAR, GET_PARAMS(_EXT)."""

    queue_type: p.QueueType


@dataclass(frozen=True)
class SetParams(Command):
    params: p.Params
    ext: bool


@dataclass(frozen=True)
class QueryControl(Command):
    control: int
    format: int


@dataclass(frozen=True)
class GetControl(Command):
    control: int


@dataclass(frozen=True)
class SetControl(Command):
    control: int
    value: int


def parse(data: bytes) -> Command:
    """The command in ``data`` (the request's readable bytes, entries
    included); ProtocolError where it is malformed."""
    need(data, p.HDR.size, "command")
    kind, stream_id = p.HDR.unpack_from(data)
    try:
        cmd = p.Cmd(kind)
    except ValueError:
        raise ProtocolError(p.Resp.ERR_INVALID_OPERATION, f"command 0x{kind:x}") from None
    return _PARSERS[cmd](cmd, stream_id, data)


def _query_capability(cmd: p.Cmd, sid: int, data: bytes) -> Command:
    need(data, p.QUERY_CAPABILITY.size, "QUERY_CAPABILITY")
    return QueryCapability(cmd, sid, queue_type_of(p.QUERY_CAPABILITY.unpack_from(data)[2]))


def _stream_create(cmd: p.Cmd, sid: int, data: bytes) -> Command:
    need(data, p.STREAM_CREATE.size, "STREAM_CREATE")
    _, _, in_mem, out_mem, coded, _, _ = p.STREAM_CREATE.unpack_from(data)
    # ChromeOS says VIRTIO_OBJECT here and the real type in SET_PARAMS_EXT.
    for mem in (in_mem, out_mem):
        if mem not in (p.MemType.GUEST_PAGES, p.MemType.VIRTIO_OBJECT):
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"mem type {mem}")
    return StreamCreate(cmd, sid, in_mem, out_mem, coded)


def _stream_command(cmd: p.Cmd, sid: int, data: bytes) -> Command:
    return StreamCommand(cmd, sid)


def _resource_create(cmd: p.Cmd, sid: int, data: bytes) -> Command:
    need(data, p.RESOURCE_CREATE.size, "RESOURCE_CREATE")
    fields = p.RESOURCE_CREATE.unpack_from(data)
    queue_type, resource_id, layout, num_planes = fields[2:6]
    offsets, num_entries = fields[6:14], fields[14:22]
    queue_type = queue_type_of(queue_type)
    if not 1 <= num_planes <= p.MAX_PLANES:
        raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"{num_planes} planes")
    if layout not in (p.PlanesLayout.SINGLE_BUFFER, p.PlanesLayout.PER_PLANE):
        raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"planes_layout {layout}")
    entries = parse_entries(data[p.RESOURCE_CREATE.size:], sum(num_entries[:num_planes]))
    return ResourceCreate(cmd, sid, queue_type, resource_id, layout,
                          tuple(offsets[:num_planes]), tuple(entries))


def _resource_queue(cmd: p.Cmd, sid: int, data: bytes) -> Command:
    need(data, p.RESOURCE_QUEUE.size, "RESOURCE_QUEUE")
    fields = p.RESOURCE_QUEUE.unpack_from(data)
    queue_type, resource_id, timestamp, num_sizes = fields[2:6]
    sizes = tuple(fields[6:6 + num_sizes]) if num_sizes <= p.MAX_PLANES else ()
    return ResourceQueue(cmd, sid, queue_type_of(queue_type), resource_id, timestamp, sizes)


def _queue_command(cmd: p.Cmd, sid: int, data: bytes) -> Command:
    need(data, p.QUEUE_CMD.size, cmd.name)
    return QueueCommand(cmd, sid, queue_type_of(p.QUEUE_CMD.unpack_from(data)[2]))


def _set_params(cmd: p.Cmd, sid: int, data: bytes) -> Command:
    ext = cmd == p.Cmd.SET_PARAMS_EXT
    need(data, p.HDR.size + (p.PARAMS_EXT if ext else p.PARAMS).size, cmd.name)
    params = p.Params.unpack(data, p.HDR.size, ext)
    queue_type_of(params.queue_type)
    if ext and params.resource_type not in (p.MemType.GUEST_PAGES, p.MemType.VIRTIO_OBJECT):
        raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, "resource_type")
    return SetParams(cmd, sid, params, ext)


def _query_control(cmd: p.Cmd, sid: int, data: bytes) -> Command:
    need(data, p.QUERY_CONTROL.size, "QUERY_CONTROL")
    _, _, control, fmt = p.QUERY_CONTROL.unpack_from(data)
    return QueryControl(cmd, sid, control, fmt)


def _get_control(cmd: p.Cmd, sid: int, data: bytes) -> Command:
    need(data, p.GET_CONTROL.size, "GET_CONTROL")
    return GetControl(cmd, sid, p.GET_CONTROL.unpack_from(data)[2])


def _set_control(cmd: p.Cmd, sid: int, data: bytes) -> Command:
    need(data, p.SET_CONTROL_HEAD.size, "SET_CONTROL")
    control = p.SET_CONTROL_HEAD.unpack_from(data)[2]
    if control == p.Control.FORCE_KEYFRAME:
        return SetControl(cmd, sid, control, 1)     # a button: no value follows
    need(data, p.SET_CONTROL.size, "SET_CONTROL")
    return SetControl(cmd, sid, control, p.SET_CONTROL.unpack_from(data)[3])


_PARSERS = {
    p.Cmd.QUERY_CAPABILITY: _query_capability,
    p.Cmd.STREAM_CREATE: _stream_create,
    p.Cmd.STREAM_DESTROY: _stream_command,
    p.Cmd.STREAM_DRAIN: _stream_command,
    p.Cmd.RESOURCE_CREATE: _resource_create,
    p.Cmd.RESOURCE_QUEUE: _resource_queue,
    p.Cmd.RESOURCE_DESTROY_ALL: _queue_command,
    p.Cmd.QUEUE_CLEAR: _queue_command,
    p.Cmd.GET_PARAMS: _queue_command,
    p.Cmd.GET_PARAMS_EXT: _queue_command,
    p.Cmd.SET_PARAMS: _set_params,
    p.Cmd.SET_PARAMS_EXT: _set_params,
    p.Cmd.QUERY_CONTROL: _query_control,
    p.Cmd.GET_CONTROL: _get_control,
    p.Cmd.SET_CONTROL: _set_control,
}
