"""The virtio-video device model: queues, config space, the command set.

A stateful decoder or encoder in the ChromeOS/crosvm dialect (see
../shared/protocols/virtio-video.md).  Synchronous commands are answered here,
on QEMU's main loop, without waiting on the engine; RESOURCE_QUEUE and
STREAM_DRAIN are completed later by the stream's worker
(:mod:`pyemb.video.decoder`, :mod:`pyemb.video.encoder`), and so are
QUEUE_CLEAR, RESOURCE_DESTROY_ALL and STREAM_DESTROY when the worker holds
completions that their answer must not overtake.  What differs between the
roles (params, controls, what a queued buffer is) is the stream's.  Each
command is parsed once into a typed value (:mod:`pyemb.video.commands`);
the checks that need the device's state are here.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

from pyemb import log
from pyemb.config import ConfigError, get_int, section
from pyemb.device import DeviceHandle, DeviceModel, ProtocolError, Request, write_all
from pyemb.events import EventQueue
from pyemb.video import protocol as p
from pyemb.video.commands import (
    Command,
    GetControl,
    QueryCapability,
    QueryControl,
    QueueCommand,
    ResourceCreate,
    ResourceQueue,
    SetControl,
    SetParams,
    StreamCreate,
    parse,
)
from pyemb.video.decoder import DecoderStream, guest_or_minimum, plane_formats
from pyemb.video.encoder import EncoderStream
from pyemb.video.resources import MAX_ENTRIES, MAX_RESOURCES, Budget, Resource, map_entries
from pyemb.video_backend import PyAVBackend, VideoBackend

MAX_CAPS_LENGTH = 4096
MAX_RESP_LENGTH = 1024
MAX_PENDING_EVENTS = 256
QUEUE_TYPES = (p.QueueType.INPUT, p.QueueType.OUTPUT)


class VideoDevice(DeviceModel):
    """virtio-video decoder (``role=decoder``, ID 31) or encoder (ID 30)."""

    # The command queue is large: every queued buffer holds its descriptor
    # until it is done.
    queue_sizes = (1024, 256)
    features = (1 << p.F_RESOURCE_GUEST_PAGES) | (1 << p.F_RESOURCE_NON_CONTIG)
    max_command_bytes = p.RESOURCE_CREATE.size + MAX_ENTRIES * p.MEM_ENTRY.size  # the largest
    config_size = p.CONFIG.size

    def __init__(self, handle: DeviceHandle, config: Mapping[str, Any],
                 backend_class: type | None = None, role: str = "decoder") -> None:
        if role not in ("decoder", "encoder"):
            raise ConfigError(f"role={role}: must be decoder or encoder")
        self.role = role
        self.device_id = p.DECODER_DEVICE_ID if role == "decoder" else p.ENCODER_DEVICE_ID
        video = section(config, "video")
        name = video.get("device_name", "pyemb")
        if not isinstance(name, str) or len(name.encode()) > 32:
            raise ConfigError("config: video.device_name must be a string of at most 32 bytes")
        self.device_name = name.encode()
        self.max_streams = get_int(video, "max_streams", 128, 1, 1024, "video")
        # Sixteen 1080p streams: what the encoders' own pictures may take.
        self.encode_budget = Budget(get_int(video, "max_encode_pixels", 16 * 1920 * 1080,
                                            16 * 16, 1 << 31, "video"))
        # Each mapped guest entry is a Python object (about 0.5 KB with its
        # bookkeeping): the device's resources share a budget of them.
        self.entry_budget = Budget(get_int(video, "max_mapped_entries", 262144, 1,
                                           1 << 24, "video"))
        backend_class = backend_class or PyAVBackend
        if not issubclass(backend_class, VideoBackend):
            raise ConfigError(f"backend {backend_class.__name__} is not a pyemb VideoBackend")
        self.backend = backend_class(section(config, "backend"))
        self.streams: dict[int, DecoderStream | EncoderStream] = {}
        # Every stream whose worker may still run, destroyed ones included
        # (one ends a picture write after STREAM_DESTROY): a reset reaches them.
        self.workers: weakref.WeakSet[DecoderStream | EncoderStream] = weakref.WeakSet()
        # An event waiting is not queued again: the driver acts on one
        # (re-reads the params, or fails the stream).
        self.events = EventQueue(p.EVENT.size, MAX_PENDING_EVENTS, coalesce=True)
        # What guests cause, each said once per stream, and at most
        # log.GuestLog's 20 lines plus one a minute for the whole device.
        self.guest_log = log.GuestLog()
        super().__init__(handle, config)
        self.commands: dict[int, Callable[[Any, Request], bytes | None]] = {
            p.Cmd.QUERY_CAPABILITY: self.query_capability,
            p.Cmd.STREAM_CREATE: self.stream_create,
            p.Cmd.STREAM_DESTROY: self.stream_destroy,
            p.Cmd.STREAM_DRAIN: self.stream_drain,
            p.Cmd.RESOURCE_CREATE: self.resource_create,
            p.Cmd.RESOURCE_QUEUE: self.resource_queue,
            p.Cmd.RESOURCE_DESTROY_ALL: self.resource_destroy_all,
            p.Cmd.QUEUE_CLEAR: self.queue_clear,
            p.Cmd.GET_PARAMS: self.get_params,
            p.Cmd.SET_PARAMS: self.set_params,
            p.Cmd.GET_PARAMS_EXT: self.get_params,
            p.Cmd.SET_PARAMS_EXT: self.set_params,
            p.Cmd.QUERY_CONTROL: self.query_control,
            p.Cmd.GET_CONTROL: self.get_control,
            p.Cmd.SET_CONTROL: self.set_control,
        }

    # -- device plumbing --------------------------------------------------------------
    def queue_handlers(self) -> list[Callable[[Request], None]]:
        return [self.on_command, self.on_event]

    def read_config(self) -> bytes:
        return p.CONFIG.pack(0, MAX_CAPS_LENGTH, MAX_RESP_LENGTH, self.device_name)

    def reset(self) -> None:
        super().reset()
        # No waiting here: each worker ends by itself, completing nothing
        # and sending no event for a stream of before the reset.
        for stream in list(self.workers):
            with stream.lock:
                stream.abandon()
        self.streams.clear()
        self.events.clear()

    def close(self) -> None:
        self.reset()
        self.backend.close()

    def fail_request(self, queue: int, request: Request) -> None:
        if queue == p.COMMAND_QUEUE:
            request.complete(write_all(request, p.reply(p.Resp.ERR_INVALID_OPERATION)))
        else:
            request.complete(0)

    # -- events -----------------------------------------------------------------------
    def on_event(self, request: Request) -> None:
        self.events.on_buffer(request)

    def send_event(self, event_type: int, stream_id: int) -> None:
        """Report an event from any thread; kept until the driver posts an
        event buffer (see pyemb.events)."""
        self.events.post(p.EVENT.pack(event_type, stream_id))

    # -- commands -----------------------------------------------------------------------
    def on_command(self, request: Request) -> None:
        self.serve_command(request, self.command, p.reply, p.Resp.ERR_INVALID_OPERATION)

    def command(self, data: bytes, request: Request) -> bytes | None:
        try:
            cmd = parse(data)
            return self.commands[cmd.kind](cmd, request)
        except ProtocolError as e:
            if len(data) >= p.HDR.size and p.HDR.unpack_from(data)[0] == p.Cmd.RESOURCE_QUEUE:
                # The whole 24-byte response, flag ERR: the ChromeOS driver
                # reads the flags of every reply to RESOURCE_QUEUE and never
                # its status, so a bare error header would hand its buffer
                # back as done.
                stream_id = p.HDR.unpack_from(data)[1]
                timestamp = (p.RESOURCE_QUEUE.unpack_from(data)[4]
                             if len(data) >= p.RESOURCE_QUEUE.size else 0)
                return p.RESOURCE_QUEUE_RESP.pack(e.status, stream_id, timestamp,
                                                  p.BufferFlag.ERR, 0)
            raise

    def stream(self, cmd: Command) -> DecoderStream | EncoderStream:
        try:
            return self.streams[cmd.stream_id]
        except KeyError:
            raise ProtocolError(p.Resp.ERR_INVALID_STREAM_ID,
                                f"stream {cmd.stream_id}") from None

    def query_capability(self, cmd: QueryCapability, request: Request) -> bytes:
        descs = (self.backend.capabilities(cmd.queue_type) if self.role == "decoder"
                 else self.backend.encoder_capabilities(cmd.queue_type))
        reply = p.CAPABILITY_RESP.pack(p.Resp.OK_QUERY_CAPABILITY, 0, len(descs))
        reply += b"".join(d.pack() for d in descs)
        if len(reply) > request.writable_size:
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, "response buffer too small")
        return reply

    def stream_create(self, cmd: StreamCreate, request: Request) -> bytes:
        stream_id, in_mem, out_mem, coded = (cmd.stream_id, cmd.in_mem, cmd.out_mem,
                                             cmd.coded_format)
        if stream_id in self.streams:
            raise ProtocolError(p.Resp.ERR_INVALID_STREAM_ID, f"stream {stream_id} exists")
        if len(self.streams) >= self.max_streams:
            raise ProtocolError(p.Resp.ERR_OUT_OF_MEMORY, "too many streams")
        coded_formats = (self.backend.coded_formats() if self.role == "decoder"
                         else self.backend.encoded_formats())
        if coded not in coded_formats:
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"coded format 0x{coded:x}")
        stream: DecoderStream | EncoderStream
        if self.role == "decoder":
            session = self.backend.open_session(p.Format(coded))
            stream = DecoderStream(stream_id, coded, in_mem, out_mem, session,
                                   self.send_event, self.report, self.handle.batch)
        else:
            stream = EncoderStream(stream_id, coded, in_mem, out_mem, self.backend,
                                   self.send_event, self.report, self.handle.batch,
                                   self.encode_budget)
        stream.guest_log = self.guest_log
        self.streams[stream_id] = stream
        self.workers.add(stream)
        return p.reply(p.Resp.OK_NODATA, stream_id)

    def stream_destroy(self, cmd: Command, request: Request) -> bytes | None:
        stream = self.stream(cmd)
        answer = p.reply(p.Resp.OK_NODATA, stream.id)
        with stream.lock:
            stream.destroy()
            later = stream.answer_later(request, answer)
        del self.streams[stream.id]
        return None if later else answer

    def stream_drain(self, cmd: Command, request: Request) -> None:
        stream = self.stream(cmd)
        with stream.lock:
            if stream.drain is not None:
                raise ProtocolError(p.Resp.ERR_INVALID_OPERATION, "drain already pending")
            stream.start_drain(request)
        return None

    def resource_create(self, cmd: ResourceCreate, request: Request) -> bytes:
        stream = self.stream(cmd)
        queue_type, resource_id, count = cmd.queue_type, cmd.resource_id, len(cmd.entries)
        if stream.params[queue_type].resource_type != p.MemType.GUEST_PAGES:
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER,
                                "virtio-gpu object resources are not supported")
        with stream.lock:
            old = stream.resources[queue_type].get(resource_id)
            if old is not None and old.queued:
                raise ProtocolError(p.Resp.ERR_INVALID_RESOURCE_ID,
                                    f"resource {resource_id} is queued")
            if old is None and len(stream.resources[queue_type]) >= MAX_RESOURCES:
                raise ProtocolError(p.Resp.ERR_OUT_OF_MEMORY,
                                    f"more than {MAX_RESOURCES} resources on a queue")
        if not self.entry_budget.take(count):
            raise ProtocolError(p.Resp.ERR_OUT_OF_MEMORY,
                                f"{count} entries: the device's resources are at their "
                                "max_mapped_entries")
        try:
            chunks = map_entries(self.handle, list(cmd.entries),
                                 writable=queue_type == p.QueueType.OUTPUT)
        except ProtocolError:
            self.entry_budget.give(count)
            raise
        resource = Resource(resource_id, queue_type, cmd.planes_layout,
                            list(cmd.plane_offsets), chunks, budget=self.entry_budget)
        with stream.lock:
            old = stream.resources[queue_type].pop(resource_id, None)
            if old is not None:
                stream.release_resource(old)    # once the worker is done with it
            stream.resources[queue_type][resource_id] = resource
        return p.reply(p.Resp.OK_NODATA, stream.id)

    def resource_queue(self, cmd: ResourceQueue, request: Request) -> None:
        stream = self.stream(cmd)
        queue_type, resource_id, timestamp = cmd.queue_type, cmd.resource_id, cmd.timestamp
        if request.writable_size < p.RESOURCE_QUEUE_RESP.size:
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, "response buffer too small")
        with stream.lock:
            resource = stream.resources[queue_type].get(resource_id)
            if resource is None:
                raise ProtocolError(p.Resp.ERR_INVALID_RESOURCE_ID, f"resource {resource_id}")
            if resource.queued:
                raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER,
                                    f"resource {resource_id} is already queued")
            if queue_type == p.QueueType.INPUT and isinstance(stream, EncoderStream):
                stream.queue_input(request, resource, timestamp)
            elif queue_type == p.QueueType.INPUT:
                if not cmd.data_sizes or cmd.data_sizes[0] > resource.size:
                    raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, "bad data size")
                stream.queue_input(request, resource, cmd.data_sizes[0], timestamp)
            else:
                stream.queue_output(request, resource)
        return None

    def resource_destroy_all(self, cmd: QueueCommand, request: Request) -> bytes | None:
        stream = self.stream(cmd)
        answer = p.reply(p.Resp.OK_NODATA, stream.id)
        with stream.lock:
            stream.destroy_resources(cmd.queue_type)
            later = stream.answer_later(request, answer)
        return None if later else answer

    def queue_clear(self, cmd: QueueCommand, request: Request) -> bytes | None:
        stream = self.stream(cmd)
        answer = p.reply(p.Resp.OK_NODATA, stream.id)
        with stream.lock:
            stream.clear(cmd.queue_type)
            later = stream.answer_later(request, answer)
        return None if later else answer

    def get_params(self, cmd: QueueCommand, request: Request) -> bytes:
        stream = self.stream(cmd)
        with stream.lock:
            params = stream.params[cmd.queue_type]
            body = params.pack_ext() if cmd.kind == p.Cmd.GET_PARAMS_EXT else params.pack()
        return p.HDR.pack(p.Resp.OK_GET_PARAMS, stream.id) + body

    def set_params(self, cmd: SetParams, request: Request) -> bytes:
        stream = self.stream(cmd)
        new = cmd.params
        queue_type = p.QueueType(new.queue_type)
        with stream.lock:
            cur = stream.params[queue_type]
            if cmd.ext:
                cur.resource_type = new.resource_type
            if isinstance(stream, EncoderStream):
                if queue_type == p.QueueType.INPUT:
                    stream.set_input_params(new)
                else:
                    stream.set_output_params(new)
            elif queue_type == p.QueueType.INPUT:
                self._set_input_params(stream, cur, new)
            else:
                self._set_output_params(cur, new)
                stream.output_set_up()
        return p.reply(p.Resp.OK_NODATA, stream.id)

    def _set_input_params(self, stream: DecoderStream, cur: p.Params, new: p.Params) -> None:
        # Everything is checked before anything changes: a refused command
        # leaves the stream as it was.
        size = (new.frame_width, new.frame_height)
        if size != (cur.frame_width, cur.frame_height) and not self._frame_size_supported(
                new.format, *size):
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"frame size {size[0]}x{size[1]}")
        if new.format != cur.format:
            if new.format not in self.backend.coded_formats():
                raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER,
                                    f"coded format 0x{new.format:x}")
            if not stream.coded_format_open():
                raise ProtocolError(p.Resp.ERR_INVALID_OPERATION,
                                    "the coded format cannot change once decoding started")
            stream.replace_session(self.backend.open_session(p.Format(new.format)),
                                   new.format)
        if new.plane_formats and new.plane_formats[0][0]:
            cur.plane_formats = [(new.plane_formats[0][0], 0)]   # sizeimage of input buffers
        if new.frame_rate:
            cur.frame_rate = new.frame_rate
        if size != (cur.frame_width, cur.frame_height):
            stream.coded_size_hint(*size)

    def _frame_size_supported(self, coded: int, width: int, height: int) -> bool:
        for desc in self.backend.capabilities(p.QueueType.INPUT):
            if desc.format == coded:
                return any(f.width.min <= width <= f.width.max
                           and f.height.min <= height <= f.height.max for f in desc.frames)
        return False

    def _set_output_params(self, cur: p.Params, new: p.Params) -> None:
        if new.format not in self.backend.raw_formats():
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"raw format {new.format}")
        cur.format = new.format
        if cur.frame_width and cur.frame_height:
            # Keep the driver's strides where they are large enough.
            cur.plane_formats = guest_or_minimum(
                new.plane_formats, plane_formats(cur.format, cur.frame_width, cur.frame_height))
        if new.min_buffers:
            cur.min_buffers = max(cur.min_buffers, min(new.min_buffers, cur.max_buffers))

    def query_control(self, cmd: QueryControl, request: Request) -> bytes:
        control, fmt = cmd.control, cmd.format
        encoder = self.role == "encoder"
        if control == p.Control.PROFILE:
            values = (self.backend.encoder_profiles(fmt) if encoder
                      else self.backend.profiles(fmt))
        elif control == p.Control.LEVEL:
            values = (self.backend.encoder_levels(fmt) if encoder
                      else self.backend.levels(fmt))
        else:
            raise ProtocolError(p.Resp.ERR_UNSUPPORTED_CONTROL, f"control {control}")
        if not values:
            raise ProtocolError(p.Resp.ERR_UNSUPPORTED_CONTROL, f"control {control} for {fmt}")
        head = p.QUERY_CONTROL_RESP.pack(p.Resp.OK_QUERY_CONTROL, 0, len(values))
        return head + b"".join(v.to_bytes(4, "little") for v in values)

    def get_control(self, cmd: GetControl, request: Request) -> bytes:
        stream = self.stream(cmd)
        control = cmd.control
        if isinstance(stream, EncoderStream):
            with stream.lock:
                value = stream.get_control(control)
            return p.GET_CONTROL_RESP.pack(p.Resp.OK_GET_CONTROL, stream.id, value)
        coded = stream.params[p.QueueType.INPUT].format
        values = (self.backend.profiles(coded) if control == p.Control.PROFILE
                  else self.backend.levels(coded) if control == p.Control.LEVEL else [])
        if not values:
            raise ProtocolError(p.Resp.ERR_UNSUPPORTED_CONTROL, f"control {control}")
        # A decoder follows the bitstream: what its headers said, once seen;
        # before that, the first value it supports.
        with stream.lock:
            profile, level = stream.session.profile_level
        seen = profile if control == p.Control.PROFILE else level
        return p.GET_CONTROL_RESP.pack(p.Resp.OK_GET_CONTROL, stream.id,
                                       seen if seen is not None else values[0])

    def set_control(self, cmd: SetControl, request: Request) -> bytes:
        stream = self.stream(cmd)
        if isinstance(stream, EncoderStream):
            with stream.lock:
                stream.set_control(cmd.control, cmd.value)
            return p.reply(p.Resp.OK_NODATA, stream.id)
        raise ProtocolError(p.Resp.ERR_UNSUPPORTED_CONTROL,
                            "a decoder takes its controls from the bitstream")
