"""The virtio-snd device model: queues, config space, control requests.

Status: the foundation answers PCM_INFO (and the empty JACK_INFO and
CHMAP_INFO of a card without jacks or channel maps) from the TOML config,
holds event buffers, and refuses PCM data and the stream requests with
NOT_SUPP / BAD_MSG.  The stream state machine, pacing and the backends come
with the virtio-snd issue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from pyemb.config import ConfigError, get_int, section
from pyemb.device import DeviceHandle, DeviceModel, ProtocolError, Request, write_all
from pyemb.snd import protocol as p
from pyemb.snd_backend import NullBackend, SndBackend

DEFAULT_STREAMS = (
    {"direction": "output", "channels": [1, 2], "formats": ["S16", "S32", "FLOAT"],
     "rates": [44100, 48000]},
    {"direction": "input", "channels": [1, 2], "formats": ["S16", "S32", "FLOAT"],
     "rates": [44100, 48000]},
)


def parse_stream(index: int, table: Mapping[str, Any]) -> p.PcmInfo:
    """One ``[[snd.streams]]`` table as a PCM_INFO item."""
    where = f"snd.streams[{index}]"
    direction = table.get("direction", "output")
    if direction not in ("output", "input"):
        raise ConfigError(f"config: {where}.direction must be \"output\" or \"input\"")
    channels = table.get("channels", [1, 2])
    if (not isinstance(channels, list) or len(channels) != 2
            or not all(isinstance(c, int) and 1 <= c <= 8 for c in channels)
            or channels[0] > channels[1]):
        raise ConfigError(f"config: {where}.channels must be [min, max] within 1..8")
    formats = 0
    for name in table.get("formats", ["S16"]):
        if name not in p.FORMAT_INDEX:
            raise ConfigError(f"config: {where}.formats: unknown format {name!r}")
        formats |= 1 << p.FORMAT_INDEX[name]
    rates = 0
    for rate in table.get("rates", [48000]):
        if rate not in p.RATE_INDEX:
            raise ConfigError(f"config: {where}.rates: unsupported rate {rate!r}")
        rates |= 1 << p.RATE_INDEX[rate]
    if not formats or not rates:
        raise ConfigError(f"config: {where} needs at least one format and one rate")
    return p.PcmInfo(p.Direction.OUTPUT if direction == "output" else p.Direction.INPUT,
                     channels[0], channels[1], formats, rates)


class SoundDevice(DeviceModel):
    """virtio-snd, shaped by the ``[snd]`` table of the TOML config."""

    device_id = p.DEVICE_ID
    queue_sizes = (64, 64, 256, 256)
    features = 0
    config_size = p.CONFIG.size

    def __init__(self, handle: DeviceHandle, config: Mapping[str, Any],
                 backend_class: type | None = None) -> None:
        snd = section(config, "snd")
        streams = snd.get("streams", list(DEFAULT_STREAMS))
        if not isinstance(streams, list) or not streams:
            raise ConfigError("config: snd.streams must be a non-empty array of tables")
        self.streams = [parse_stream(i, s) for i, s in enumerate(streams)]
        self.jacks = get_int(snd, "jacks", 0, 0, 0, "snd")
        backend_class = backend_class or NullBackend
        if not issubclass(backend_class, SndBackend):
            raise ConfigError(f"backend {backend_class.__name__} is not a pyemb SndBackend")
        self.backend = backend_class(section(config, "backend"))
        self.events: deque[Request] = deque()
        super().__init__(handle, config)

    def queue_handlers(self) -> list[Callable[[Request], None]]:
        return [self.on_control, self.on_event, self.on_tx, self.on_rx]

    def read_config(self) -> bytes:
        return p.CONFIG.pack(self.jacks, len(self.streams), 0, 0)

    def reset(self) -> None:
        super().reset()
        self.events.clear()         # QEMU drops the held buffers

    def close(self) -> None:
        self.reset()
        self.backend.close()

    # -- control queue --------------------------------------------------------
    def on_control(self, request: Request) -> None:
        self.serve_command(request, self.control, p.status_reply, p.Status.IO_ERR)

    def control(self, command: bytes, request: Request) -> bytes:
        if len(command) < p.HDR.size:
            raise ProtocolError(p.Status.BAD_MSG, "short control request")
        (code,) = p.HDR.unpack_from(command)
        if code == p.Code.PCM_INFO:
            return self.query(command, request, [s.pack() for s in self.streams],
                              p.PCM_INFO.size)
        if code == p.Code.JACK_INFO:
            return self.query(command, request, [], 24)
        if code == p.Code.CHMAP_INFO:
            return self.query(command, request, [], 24)
        if code in p.Code.__members__.values():
            raise ProtocolError(p.Status.NOT_SUPP, f"{p.Code(code).name} not implemented")
        raise ProtocolError(p.Status.BAD_MSG, f"unknown request 0x{code:x}")

    def query(self, command: bytes, request: Request, items: list[bytes],
              item_size: int) -> bytes:
        """JACK_INFO / PCM_INFO / CHMAP_INFO: {code, start_id, count, size}."""
        if len(command) != p.QUERY_INFO.size:
            raise ProtocolError(p.Status.BAD_MSG, "query of wrong size")
        _, start, count, size = p.QUERY_INFO.unpack(command)
        if size != item_size or start + count > len(items):
            raise ProtocolError(p.Status.BAD_MSG, "query out of range")
        if request.writable_size < p.HDR.size + count * size:
            raise ProtocolError(p.Status.BAD_MSG, "reply buffer too small")
        return p.status_reply(p.Status.OK) + b"".join(items[start:start + count])

    # -- event, tx and rx queues ----------------------------------------------
    def on_event(self, request: Request) -> None:
        """Keep the buffer until there is an event to report."""
        self.events.append(request)

    def on_tx(self, request: Request) -> None:
        # {stream_id} + frames -> {status, latency_bytes}; no stream can be
        # running before PCM_START exists.
        self.pcm_reply(request, p.Status.BAD_MSG)

    def on_rx(self, request: Request) -> None:
        self.pcm_reply(request, p.Status.BAD_MSG)

    def pcm_reply(self, request: Request, status: p.Status) -> None:
        """Write {status, latency_bytes=0} into the last 8 writable bytes."""
        if request.writable_size < p.PCM_STATUS.size:
            request.complete(0)
            return
        tail = request.writable[-1]
        if len(tail) >= p.PCM_STATUS.size:
            tail[len(tail) - p.PCM_STATUS.size:] = p.PCM_STATUS.pack(status, 0)
            request.complete(request.writable_size)
        else:
            request.complete(write_all(request, p.PCM_STATUS.pack(status, 0)))

    def fail_request(self, queue: int, request: Request) -> None:
        if queue == p.CONTROL_QUEUE:
            request.complete(write_all(request, p.status_reply(p.Status.IO_ERR)))
        elif queue in (p.TX_QUEUE, p.RX_QUEUE):
            self.pcm_reply(request, p.Status.IO_ERR)
        else:
            request.complete(0)
