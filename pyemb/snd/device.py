"""The virtio-snd device model: config space, control queue, events, tx/rx.

The card's shape comes from the TOML config (:mod:`pyemb.snd.card`); each
PCM stream is a :class:`~pyemb.snd.stream.PcmStream` with its own backend
and pacing thread; control elements live in :mod:`pyemb.snd.controls`.
Every request the protocol rejects is answered with BAD_MSG or NOT_SUPP and
changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pyemb.config import ConfigError, section
from pyemb.device import (
    DeviceHandle,
    DeviceModel,
    ProtocolError,
    Request,
    read_all,
    write_all,
)
from pyemb.events import EventQueue
from pyemb.snd import commands
from pyemb.snd import protocol as p
from pyemb.snd.card import CardConfig, parse_card
from pyemb.snd.controls import ControlSet
from pyemb.snd.stream import PcmStream
from pyemb.snd_backend import SndBackend

# Events raised while the guest has no event buffer posted wait here.
MAX_PENDING_EVENTS = 64


class SoundDevice(DeviceModel):
    """virtio-snd, shaped by the ``[snd]`` table of the TOML config."""

    device_id = p.DEVICE_ID
    queue_sizes = (64, 64, 256, 256)
    features = 1 << p.F_CTLS
    config_size = p.CONFIG.size
    max_command_bytes = commands.MAX_COMMAND_BYTES

    def __init__(self, handle: DeviceHandle, config: Mapping[str, Any],
                 backend_class: type | None = None) -> None:
        if backend_class is not None and not issubclass(backend_class, SndBackend):
            raise ConfigError(f"backend {backend_class.__name__} is not a pyemb SndBackend")
        self.card: CardConfig = parse_card(section(config, "snd"), backend_class)
        self.events = EventQueue(p.EVENT.size, MAX_PENDING_EVENTS)
        self.controls = ControlSet(self._notify_control)
        self.jack_state = [j.connected for j in self.card.jacks]
        self.jack_remaps: dict[int, tuple[int, int]] = {}
        self.chmaps: list[bytes] = []
        self.streams: list[PcmStream] = []
        playback = capture = 0
        for s in self.card.streams:
            if s.output:
                name, index, playback = "PCM Playback", playback, playback + 1
            else:
                name, index, capture = "Capture", capture, capture + 1
            ctl = self.controls.add_stream(name, index, s.info.channels_max, s.volume, s.mute,
                                           s.info.hda_fn_nid)
            backend = s.backend_class(s.backend_options, s.index,
                                      "output" if s.output else "input")
            self.streams.append(PcmStream(s.index, s.info, backend, ctl, self.post_event,
                                          handle.name))
            for layout in s.chmaps:
                positions = bytes(p.CHMAP_POSITION[pos] for pos in layout)
                self.chmaps.append(p.CHMAP_INFO.pack(s.info.hda_fn_nid, s.info.direction,
                                                     len(layout), positions))
        super().__init__(handle, config)

    def queue_handlers(self) -> list[Callable[[Request], None]]:
        return [self.on_control, self.on_event, self.on_tx, self.on_rx]

    def read_config(self) -> bytes:
        return p.CONFIG.pack(len(self.card.jacks), len(self.streams), len(self.chmaps),
                             len(self.controls))

    @property
    def ctls_negotiated(self) -> bool:
        return bool(self.driver_features >> p.F_CTLS & 1)

    def reset(self) -> None:
        for stream in self.streams:
            stream.drop()
        self.events.clear()
        self.jack_state = [j.connected for j in self.card.jacks]
        self.jack_remaps.clear()
        super().reset()

    # -- events -----------------------------------------------------------------
    def on_event(self, request: Request) -> None:
        """Hold the buffer until there is an event to report."""
        self.events.on_buffer(request)

    def post_event(self, code: int, data: int) -> None:
        """Send an event from any thread (kept if no buffer is posted yet)."""
        self.events.post(p.event(p.Event(code), data))

    def _notify_control(self, control_id: int, mask: int) -> None:
        if self.ctls_negotiated:
            self.events.post(p.CTL_EVENT.pack(p.Event.CTL_NOTIFY, control_id, mask))

    def set_jack(self, jack_id: int, connected: bool) -> None:
        """Plug or unplug a jack from the host side; the guest gets an event."""
        if self.jack_state[jack_id] != connected:
            self.jack_state[jack_id] = connected
            code = p.Event.JACK_CONNECTED if connected else p.Event.JACK_DISCONNECTED
            self.post_event(code, jack_id)

    # -- control queue ------------------------------------------------------------
    def on_control(self, request: Request) -> None:
        self.serve_command(request, self.control, p.status_reply, p.Status.IO_ERR)

    def control(self, command: bytes, request: Request) -> bytes:
        if len(command) < p.HDR.size:
            raise ProtocolError(p.Status.BAD_MSG, "short control request")
        (code,) = p.HDR.unpack_from(command)
        handler = self._handlers_by_code.get(code)
        if handler is None:
            raise ProtocolError(p.Status.BAD_MSG, f"unknown request 0x{code:x}")
        if code >= p.Code.CTL_INFO and not self.ctls_negotiated:
            raise ProtocolError(p.Status.NOT_SUPP, "control elements not negotiated")
        return handler(self, commands.parse(command), request)

    def query(self, q: commands.Query, request: Request, items: list[bytes],
              item_size: int) -> bytes:
        """JACK_INFO / PCM_INFO / CHMAP_INFO / CTL_INFO: the items asked for."""
        if q.size != item_size or q.count == 0 or q.start_id + q.count > len(items):
            raise ProtocolError(p.Status.BAD_MSG, "query out of range")
        if request.writable_size < p.HDR.size + q.count * q.size:
            raise ProtocolError(p.Status.BAD_MSG, "reply buffer too small")
        return p.status_reply(p.Status.OK) + b"".join(items[q.start_id:q.start_id + q.count])

    def _pcm_info(self, q: commands.Query, request: Request) -> bytes:
        return self.query(q, request, [s.info.pack() for s in self.streams], p.PCM_INFO.size)

    def _jack_info(self, q: commands.Query, request: Request) -> bytes:
        items = [jack.info(connected)
                 for jack, connected in zip(self.card.jacks, self.jack_state, strict=True)]
        return self.query(q, request, items, p.JACK_INFO.size)

    def _jack_remap(self, remap: commands.JackRemap, request: Request) -> bytes:
        if remap.jack_id >= len(self.card.jacks):
            raise ProtocolError(p.Status.BAD_MSG, f"no jack {remap.jack_id}")
        if not self.card.jacks[remap.jack_id].remap:
            raise ProtocolError(p.Status.NOT_SUPP, f"jack {remap.jack_id} cannot be remapped")
        self.jack_remaps[remap.jack_id] = (remap.association, remap.sequence)
        return p.status_reply(p.Status.OK)

    def _chmap_info(self, q: commands.Query, request: Request) -> bytes:
        return self.query(q, request, self.chmaps, p.CHMAP_INFO.size)

    def _stream(self, stream_id: int) -> PcmStream:
        if stream_id >= len(self.streams):
            raise ProtocolError(p.Status.BAD_MSG, f"no stream {stream_id}")
        return self.streams[stream_id]

    def _pcm_set_params(self, cmd: commands.PcmSetParams, request: Request) -> bytes:
        self._stream(cmd.stream_id).set_params(cmd.params)
        return p.status_reply(p.Status.OK)

    def _pcm_op(self, cmd: commands.PcmCommand, request: Request) -> bytes:
        stream = self._stream(cmd.stream_id)
        op = {p.Code.PCM_PREPARE: stream.prepare, p.Code.PCM_START: stream.start,
              p.Code.PCM_STOP: stream.stop, p.Code.PCM_RELEASE: stream.release}
        op[cmd.code]()
        return p.status_reply(p.Status.OK)

    def _ctl_info(self, q: commands.Query, request: Request) -> bytes:
        return self.query(q, request, [c.info() for c in self.controls.controls],
                          p.CTL_INFO.size)

    def _ctl_enum_items(self, cmd: commands.CtlCommand, request: Request) -> bytes:
        control = self.controls.get(cmd.control_id)
        raise ProtocolError(p.Status.BAD_MSG, f"{control.name} is not an enumeration")

    def _ctl_read(self, cmd: commands.CtlCommand, request: Request) -> bytes:
        return self.controls.read(cmd.control_id)

    def _ctl_write(self, cmd: commands.CtlCommand, request: Request) -> bytes:
        return self.controls.write(cmd.control_id, cmd.value)

    def _ctl_tlv_read(self, cmd: commands.CtlCommand, request: Request) -> bytes:
        return self.controls.tlv_read(cmd.control_id, request.writable_size)

    def _ctl_tlv_write(self, cmd: commands.CtlCommand, request: Request) -> bytes:
        control = self.controls.get(cmd.control_id)
        raise ProtocolError(p.Status.NOT_SUPP, f"{control.name}: TLV is read-only")

    _handlers_by_code: dict[int, Callable[[SoundDevice, Any, Request], bytes]] = {
        p.Code.JACK_INFO: _jack_info,
        p.Code.JACK_REMAP: _jack_remap,
        p.Code.PCM_INFO: _pcm_info,
        p.Code.PCM_SET_PARAMS: _pcm_set_params,
        p.Code.PCM_PREPARE: _pcm_op,
        p.Code.PCM_RELEASE: _pcm_op,
        p.Code.PCM_START: _pcm_op,
        p.Code.PCM_STOP: _pcm_op,
        p.Code.CHMAP_INFO: _chmap_info,
        p.Code.CTL_INFO: _ctl_info,
        p.Code.CTL_ENUM_ITEMS: _ctl_enum_items,
        p.Code.CTL_READ: _ctl_read,
        p.Code.CTL_WRITE: _ctl_write,
        p.Code.CTL_TLV_READ: _ctl_tlv_read,
        p.Code.CTL_TLV_WRITE: _ctl_tlv_write,
        p.Code.CTL_TLV_COMMAND: _ctl_tlv_write,
    }

    # -- tx and rx queues -----------------------------------------------------------
    def on_tx(self, request: Request) -> None:
        self._pcm_message(request, output=True)

    def on_rx(self, request: Request) -> None:
        self._pcm_message(request, output=False)

    def _pcm_message(self, request: Request, output: bool) -> None:
        try:
            if request.readable_size < p.PCM_XFER.size:
                raise ProtocolError(p.Status.BAD_MSG, "PCM message without a header")
            header = read_all(request, p.PCM_XFER.size)
            (stream_id,) = p.PCM_XFER.unpack(header)
            if stream_id >= len(self.streams) or self.streams[stream_id].output != output:
                raise ProtocolError(p.Status.BAD_MSG, f"no {('capture', 'playback')[output]} "
                                                      f"stream {stream_id}")
            self.streams[stream_id].queue_message(request)
            return
        except ProtocolError:
            pass
        # Outside the handler: its traceback holds the frames that sliced the
        # request's views, and completing kills the views (the shim reports
        # any still alive as stale).
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

    def close(self) -> None:
        self.reset()
