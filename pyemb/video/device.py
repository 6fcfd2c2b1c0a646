"""The virtio-video device model: queues, config space, the command set.

A stateful decoder or encoder in the ChromeOS/crosvm dialect (see
../shared/protocols/virtio-video.md).  Synchronous commands are answered here,
on QEMU's main loop, without waiting on the engine; RESOURCE_QUEUE and
STREAM_DRAIN are completed later by the stream's worker
(:mod:`pyemb.video.decoder`, :mod:`pyemb.video.encoder`), and so are
QUEUE_CLEAR, RESOURCE_DESTROY_ALL and STREAM_DESTROY when the worker holds
completions that their answer must not overtake.  What differs between the
roles (params, controls, what a queued buffer is) is the stream's; the
commands' parsing and checks are here, once.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

from pyemb.config import ConfigError, get_int, section
from pyemb.device import DeviceHandle, DeviceModel, ProtocolError, Request, write_all
from pyemb.events import EventQueue
from pyemb.video import protocol as p
from pyemb.video.decoder import DecoderStream, guest_or_minimum, plane_formats
from pyemb.video.encoder import EncoderStream
from pyemb.video.resources import MAX_RESOURCES, Budget, Resource, map_entries, parse_entries
from pyemb.video_backend import PyAVBackend, VideoBackend

MAX_CAPS_LENGTH = 4096
MAX_RESP_LENGTH = 1024
MAX_PENDING_EVENTS = 256
QUEUE_TYPES = (p.QueueType.INPUT, p.QueueType.OUTPUT)


def need(command: bytes, size: int, what: str) -> None:
    if len(command) < size:
        raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"short {what}")


def queue_type_of(value: int) -> p.QueueType:
    if value not in QUEUE_TYPES:
        raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"queue_type 0x{value:x}")
    return p.QueueType(value)


class VideoDevice(DeviceModel):
    """virtio-video decoder (``role=decoder``, ID 31) or encoder (ID 30)."""

    # The command queue is large: every queued buffer holds its descriptor
    # until it is done.
    queue_sizes = (1024, 256)
    features = (1 << p.F_RESOURCE_GUEST_PAGES) | (1 << p.F_RESOURCE_NON_CONTIG)
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
        super().__init__(handle, config)
        self.commands: dict[int, Callable[[bytes, Request], bytes | None]] = {
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

    def command(self, command: bytes, request: Request) -> bytes | None:
        need(command, p.HDR.size, "command")
        kind, _ = p.HDR.unpack_from(command)
        handler = self.commands.get(kind)
        if handler is None:
            raise ProtocolError(p.Resp.ERR_INVALID_OPERATION, f"command 0x{kind:x}")
        return handler(command, request)

    def stream(self, command: bytes) -> DecoderStream | EncoderStream:
        _, stream_id = p.HDR.unpack_from(command)
        try:
            return self.streams[stream_id]
        except KeyError:
            raise ProtocolError(p.Resp.ERR_INVALID_STREAM_ID, f"stream {stream_id}") from None

    def query_capability(self, command: bytes, request: Request) -> bytes:
        need(command, p.QUERY_CAPABILITY.size, "QUERY_CAPABILITY")
        _, _, queue_type = p.QUERY_CAPABILITY.unpack_from(command)
        queue_type = queue_type_of(queue_type)
        descs = (self.backend.capabilities(queue_type) if self.role == "decoder"
                 else self.backend.encoder_capabilities(queue_type))
        reply = p.CAPABILITY_RESP.pack(p.Resp.OK_QUERY_CAPABILITY, 0, len(descs))
        reply += b"".join(d.pack() for d in descs)
        if len(reply) > request.writable_size:
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, "response buffer too small")
        return reply

    def stream_create(self, command: bytes, request: Request) -> bytes:
        need(command, p.STREAM_CREATE.size, "STREAM_CREATE")
        _, stream_id, in_mem, out_mem, coded, _, _ = p.STREAM_CREATE.unpack_from(command)
        if stream_id in self.streams:
            raise ProtocolError(p.Resp.ERR_INVALID_STREAM_ID, f"stream {stream_id} exists")
        if len(self.streams) >= self.max_streams:
            raise ProtocolError(p.Resp.ERR_OUT_OF_MEMORY, "too many streams")
        coded_formats = (self.backend.coded_formats() if self.role == "decoder"
                         else self.backend.encoded_formats())
        if coded not in coded_formats:
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"coded format 0x{coded:x}")
        # ChromeOS says VIRTIO_OBJECT here and the real type in SET_PARAMS_EXT.
        for mem in (in_mem, out_mem):
            if mem not in (p.MemType.GUEST_PAGES, p.MemType.VIRTIO_OBJECT):
                raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"mem type {mem}")
        stream: DecoderStream | EncoderStream
        if self.role == "decoder":
            session = self.backend.open_session(p.Format(coded))
            stream = DecoderStream(stream_id, coded, in_mem, out_mem, session,
                                   self.send_event, self.report, self.handle.batch)
        else:
            stream = EncoderStream(stream_id, coded, in_mem, out_mem, self.backend,
                                   self.send_event, self.report, self.handle.batch,
                                   self.encode_budget)
        self.streams[stream_id] = stream
        self.workers.add(stream)
        return p.reply(p.Resp.OK_NODATA, stream_id)

    def stream_destroy(self, command: bytes, request: Request) -> bytes | None:
        stream = self.stream(command)
        answer = p.reply(p.Resp.OK_NODATA, stream.id)
        with stream.lock:
            stream.destroy()
            later = stream.answer_later(request, answer)
        del self.streams[stream.id]
        return None if later else answer

    def stream_drain(self, command: bytes, request: Request) -> None:
        stream = self.stream(command)
        with stream.lock:
            if stream.drain is not None:
                raise ProtocolError(p.Resp.ERR_INVALID_OPERATION, "drain already pending")
            stream.start_drain(request)
        return None

    def resource_create(self, command: bytes, request: Request) -> bytes:
        need(command, p.RESOURCE_CREATE.size, "RESOURCE_CREATE")
        stream = self.stream(command)
        fields = p.RESOURCE_CREATE.unpack_from(command)
        queue_type, resource_id, layout, num_planes = fields[2:6]
        offsets, num_entries = list(fields[6:14]), list(fields[14:22])
        queue_type = queue_type_of(queue_type)
        if not 1 <= num_planes <= p.MAX_PLANES:
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"{num_planes} planes")
        if layout not in (p.PlanesLayout.SINGLE_BUFFER, p.PlanesLayout.PER_PLANE):
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"planes_layout {layout}")
        if stream.params[queue_type].resource_type != p.MemType.GUEST_PAGES:
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER,
                                "virtio-gpu object resources are not supported")
        count = sum(num_entries[:num_planes])
        entries = parse_entries(command[p.RESOURCE_CREATE.size:], count)
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
            chunks = map_entries(self.handle, entries,
                                 writable=queue_type == p.QueueType.OUTPUT)
        except ProtocolError:
            self.entry_budget.give(count)
            raise
        resource = Resource(resource_id, queue_type, layout, offsets[:num_planes], chunks,
                            budget=self.entry_budget)
        with stream.lock:
            old = stream.resources[queue_type].pop(resource_id, None)
            if old is not None:
                stream.release_resource(old)    # once the worker is done with it
            stream.resources[queue_type][resource_id] = resource
        return p.reply(p.Resp.OK_NODATA, stream.id)

    def resource_queue(self, command: bytes, request: Request) -> bytes | None:
        """A refused RESOURCE_QUEUE is answered with the whole 24-byte
        response, flag ERR: the ChromeOS driver reads the flags of every
        reply to it and never its status, so a bare error header would hand
        its buffer back as done."""
        try:
            return self._resource_queue(command, request)
        except ProtocolError as e:
            _, stream_id = p.HDR.unpack_from(command) if len(command) >= p.HDR.size else (0, 0)
            timestamp = (p.RESOURCE_QUEUE.unpack_from(command)[4]
                         if len(command) >= p.RESOURCE_QUEUE.size else 0)
            return p.RESOURCE_QUEUE_RESP.pack(e.status, stream_id, timestamp,
                                              p.BufferFlag.ERR, 0)

    def _resource_queue(self, command: bytes, request: Request) -> None:
        need(command, p.RESOURCE_QUEUE.size, "RESOURCE_QUEUE")
        stream = self.stream(command)
        fields = p.RESOURCE_QUEUE.unpack_from(command)
        queue_type, resource_id, timestamp, num_sizes = fields[2:6]
        sizes = fields[6:14]
        queue_type = queue_type_of(queue_type)
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
                if not 1 <= num_sizes <= p.MAX_PLANES or sizes[0] > resource.size:
                    raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, "bad data size")
                stream.queue_input(request, resource, sizes[0], timestamp)
            else:
                stream.queue_output(request, resource)
        return None

    def resource_destroy_all(self, command: bytes, request: Request) -> bytes | None:
        need(command, p.QUEUE_CMD.size, "RESOURCE_DESTROY_ALL")
        stream = self.stream(command)
        queue_type = queue_type_of(p.QUEUE_CMD.unpack_from(command)[2])
        answer = p.reply(p.Resp.OK_NODATA, stream.id)
        with stream.lock:
            stream.destroy_resources(queue_type)
            later = stream.answer_later(request, answer)
        return None if later else answer

    def queue_clear(self, command: bytes, request: Request) -> bytes | None:
        need(command, p.QUEUE_CMD.size, "QUEUE_CLEAR")
        stream = self.stream(command)
        queue_type = queue_type_of(p.QUEUE_CMD.unpack_from(command)[2])
        answer = p.reply(p.Resp.OK_NODATA, stream.id)
        with stream.lock:
            stream.clear(queue_type)
            later = stream.answer_later(request, answer)
        return None if later else answer

    def get_params(self, command: bytes, request: Request) -> bytes:
        need(command, p.QUEUE_CMD.size, "GET_PARAMS")
        kind = p.HDR.unpack_from(command)[0]
        stream = self.stream(command)
        queue_type = queue_type_of(p.QUEUE_CMD.unpack_from(command)[2])
        with stream.lock:
            params = stream.params[queue_type]
            body = params.pack_ext() if kind == p.Cmd.GET_PARAMS_EXT else params.pack()
        return p.HDR.pack(p.Resp.OK_GET_PARAMS, stream.id) + body

    def set_params(self, command: bytes, request: Request) -> bytes:
        ext = p.HDR.unpack_from(command)[0] == p.Cmd.SET_PARAMS_EXT
        need(command, p.HDR.size + (p.PARAMS_EXT if ext else p.PARAMS).size, "SET_PARAMS")
        stream = self.stream(command)
        new = p.Params.unpack(command, p.HDR.size, ext)
        queue_type = queue_type_of(new.queue_type)
        with stream.lock:
            cur = stream.params[queue_type]
            if ext:
                if new.resource_type not in (p.MemType.GUEST_PAGES, p.MemType.VIRTIO_OBJECT):
                    raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, "resource_type")
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
                                   new.format).close()
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

    def query_control(self, command: bytes, request: Request) -> bytes:
        need(command, p.QUERY_CONTROL.size, "QUERY_CONTROL")
        _, _, control, fmt = p.QUERY_CONTROL.unpack_from(command)
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

    def get_control(self, command: bytes, request: Request) -> bytes:
        need(command, p.GET_CONTROL.size, "GET_CONTROL")
        stream = self.stream(command)
        control = p.GET_CONTROL.unpack_from(command)[2]
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

    def set_control(self, command: bytes, request: Request) -> bytes:
        need(command, p.SET_CONTROL_HEAD.size, "SET_CONTROL")
        stream = self.stream(command)
        if isinstance(stream, EncoderStream):
            control = p.SET_CONTROL_HEAD.unpack_from(command)[2]
            value = 1
            if control != p.Control.FORCE_KEYFRAME:    # a button: no value follows
                need(command, p.SET_CONTROL.size, "SET_CONTROL")
                value = p.SET_CONTROL.unpack_from(command)[3]
            with stream.lock:
                stream.set_control(control, value)
            return p.reply(p.Resp.OK_NODATA, stream.id)
        raise ProtocolError(p.Resp.ERR_UNSUPPORTED_CONTROL,
                            "a decoder takes its controls from the bitstream")
