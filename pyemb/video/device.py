"""The virtio-video device model: queues, config space, commands.

Status: the foundation answers QUERY_CAPABILITY from the backend and
refuses the other commands with INVALID_OPERATION; streams, resources and
decoding come with the video decoder issue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from pyemb.config import ConfigError, section
from pyemb.device import DeviceHandle, DeviceModel, ProtocolError, Request, write_all
from pyemb.video import protocol as p
from pyemb.video_backend import PyAVBackend, VideoBackend

MAX_CAPS_LENGTH = 4096
MAX_RESP_LENGTH = 1024


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
        backend_class = backend_class or PyAVBackend
        if not issubclass(backend_class, VideoBackend):
            raise ConfigError(f"backend {backend_class.__name__} is not a pyemb VideoBackend")
        self.backend = backend_class(section(config, "backend"))
        self.events: deque[Request] = deque()
        super().__init__(handle, config)

    def queue_handlers(self) -> list[Callable[[Request], None]]:
        return [self.on_command, self.on_event]

    def read_config(self) -> bytes:
        return p.CONFIG.pack(0, MAX_CAPS_LENGTH, MAX_RESP_LENGTH, self.device_name)

    def reset(self) -> None:
        super().reset()
        self.events.clear()

    def close(self) -> None:
        self.reset()
        self.backend.close()

    def on_event(self, request: Request) -> None:
        self.events.append(request)

    def on_command(self, request: Request) -> None:
        self.serve_command(request, self.command, p.reply, p.Resp.ERR_INVALID_OPERATION)

    def fail_request(self, queue: int, request: Request) -> None:
        if queue == p.COMMAND_QUEUE:
            request.complete(write_all(request, p.reply(p.Resp.ERR_INVALID_OPERATION)))
        else:
            request.complete(0)

    def command(self, command: bytes, request: Request) -> bytes:
        if len(command) < p.HDR.size:
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, "short command")
        kind, stream_id = p.HDR.unpack_from(command)
        if kind == p.Cmd.QUERY_CAPABILITY:
            return self.query_capability(command, request)
        raise ProtocolError(p.Resp.ERR_INVALID_OPERATION, f"command 0x{kind:x}")

    def query_capability(self, command: bytes, request: Request) -> bytes:
        if len(command) < p.QUERY_CAPABILITY.size:
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, "short QUERY_CAPABILITY")
        _, _, queue_type = p.QUERY_CAPABILITY.unpack_from(command)
        if queue_type not in (p.QueueType.INPUT, p.QueueType.OUTPUT):
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, "bad queue_type")
        descs = self.backend.capabilities(p.QueueType(queue_type))
        reply = p.CAPABILITY_RESP.pack(p.Resp.OK_QUERY_CAPABILITY, 0, len(descs))
        reply += b"".join(d.pack() for d in descs)
        if len(reply) > request.writable_size:
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, "response buffer too small")
        return reply
