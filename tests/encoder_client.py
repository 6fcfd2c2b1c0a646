"""A virtio-video encoder client on the host-side driver, in the ChromeOS
guest driver's flow: STREAM_CREATE with VIRTIO_OBJECT, the real memory type
in SET_PARAMS_EXT, the raw format and size in SET_PARAMS(INPUT), controls,
single-buffer resources of guest pages, then pictures in, packets out, and a
drain.  Runs in :meth:`VideoClient.run`, like the decoder's StreamRun."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import av
import numpy as np

from pyemb.video import protocol as p
from tests.streams import picture, visible
from tests.video_client import VideoClient


@dataclass
class EncodedPacket:
    data: bytes
    timestamp: int
    flags: int


@dataclass
class EncodeResult:
    packets: list[EncodedPacket] = field(default_factory=list)
    input_flags: list[int] = field(default_factory=list)
    output_errors: int = 0
    events: list[tuple[int, int]] = field(default_factory=list)
    eos_seen: bool = False
    drain_status: int | None = None

    @property
    def bitstream(self) -> bytes:
        return b"".join(pk.data for pk in self.packets)


def raw_pictures(width: int, height: int, count: int, fmt: int = p.Format.NV12,
                 noise: int = 0) -> list[bytes]:
    """Packed raw pictures (no padding): tests.streams' moving pattern."""
    return [visible(picture(width, height, i, noise), fmt) for i in range(count)]


def lay_out(packed: bytes, fmt: int, width: int, height: int,
            plane_formats: list[tuple[int, int]]) -> bytes:
    """A packed picture at the strides and plane sizes of the INPUT params."""
    cw, ch = (width + 1) // 2, (height + 1) // 2
    shapes = ([(height, width), (ch, 2 * cw)] if fmt == p.Format.NV12
              else [(height, width), (ch, cw), (ch, cw)])
    out, src = bytearray(), 0
    for (size, stride), (rows, row_bytes) in zip(plane_formats, shapes, strict=True):
        plane = np.zeros(size, np.uint8)
        data = np.frombuffer(packed, np.uint8, rows * row_bytes, src).reshape(rows, row_bytes)
        plane[:stride * rows].reshape(rows, stride)[:, :row_bytes] = data
        out += plane.tobytes()
        src += rows * row_bytes
    return bytes(out)


DECODERS = {p.Format.H264: "h264", p.Format.HEVC: "hevc", p.Format.VP8: "vp8",
            p.Format.VP9: "vp9"}


def decode_packets(coded: int, packets: list[bytes]) -> list[bytes]:
    """The pictures (packed I420) PyAV decodes from the device's packets."""
    ctx = av.CodecContext.create(DECODERS[p.Format(coded)], "r")
    frames = []
    for data in packets:
        frames += ctx.decode(av.Packet(data))
    frames += ctx.decode(None)
    return [visible(f, p.Format.YUV420) for f in frames]


def psnr(a: bytes, b: bytes) -> float:
    x, y = np.frombuffer(a, np.uint8).astype(float), np.frombuffer(b, np.uint8).astype(float)
    mse = float(np.mean((x - y) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255 ** 2 / mse)


class EncodeRun:
    """One encoder stream through the ChromeOS flow, advanced by VideoClient.run."""

    def __init__(self, client: VideoClient, sid: int, coded: int, pictures: list[bytes],
                 width: int, height: int, raw_format: int = p.Format.NV12,
                 timestamps: list[int] | None = None, input_buffers: int = 4,
                 output_buffers: int = 4, sg_chunks: int = 1, frame_rate: int = 30,
                 controls: dict[int, int] | None = None,
                 before: dict[int, Callable[[EncodeRun], None]] | None = None,
                 open_as: int = p.Format.H264, drain: bool = True,
                 output_size: int | None = None,
                 input_planes: list[tuple[int, int]] | None = None) -> None:
        """``before[i]`` runs just before picture i is queued (a control
        change, say); ``open_as``: the stream is created with that coded
        format and the real one named in SET_PARAMS(OUTPUT), as the
        ChromeOS driver does."""
        self.c, self.sid, self.coded = client, sid, coded
        self.pictures, self.width, self.height = pictures, width, height
        self.raw_format, self.frame_rate = raw_format, frame_rate
        self.timestamps = timestamps or [1_000 + 33_333 * i for i in range(len(pictures))]
        self.input_buffers, self.output_buffers = input_buffers, output_buffers
        self.sg_chunks = sg_chunks
        self.controls = controls or {}
        self.before = before or {}
        self.open_as = open_as
        self.want_drain = drain
        self.output_size = output_size      # None: what the OUTPUT params say
        self.input_planes = input_planes or []   # (size, stride) asked; []: the device's
        self.result = EncodeResult()
        self.next = 0
        self.in_flight: dict[int, int] = {}
        self.out_flight: dict[int, int] = {}
        self.drain_token: int | None = None
        self.finished = self.started = False

    def set_control(self, control: int, value: int) -> None:
        self.c.call_ok(p.SET_CONTROL.pack(p.Cmd.SET_CONTROL, self.sid, control, value))

    def start(self) -> None:
        self.started = True
        c, sid = self.c, self.sid
        c.create_stream(sid, self.open_as)
        out = c.get_params(sid, p.QueueType.OUTPUT)
        out.format = self.coded
        c.set_params(sid, out)
        src = c.get_params(sid, p.QueueType.INPUT)
        src.format, src.frame_width, src.frame_height = (self.raw_format, self.width,
                                                         self.height)
        src.frame_rate, src.plane_formats = self.frame_rate, self.input_planes
        c.set_params(sid, src)
        for control, value in self.controls.items():
            self.set_control(control, value)
        self.in_params = c.get_params(sid, p.QueueType.INPUT)
        self.out_params = c.get_params(sid, p.QueueType.OUTPUT)
        in_size = sum(size for size, _ in self.in_params.plane_formats)
        self.inputs = {rid: c.alloc_entries(in_size, self.sg_chunks)
                       for rid in range(self.input_buffers)}
        for rid, entries in self.inputs.items():
            c.create_resource(sid, p.QueueType.INPUT, rid, entries)
        self.free_inputs = list(self.inputs)
        out_size = self.output_size or self.out_params.plane_formats[0][0]
        self.outputs = {100 + i: c.alloc_entries(out_size, self.sg_chunks)
                        for i in range(self.output_buffers)}
        for rid, entries in self.outputs.items():
            c.create_resource(sid, p.QueueType.OUTPUT, rid, entries)
            self.out_flight[c.queue(sid, p.QueueType.OUTPUT, rid, kick=False)] = rid

    def step(self, events: list[tuple[int, int]]) -> None:
        c, sid, result = self.c, self.sid, self.result
        result.events += events
        while self.next < len(self.pictures) and self.free_inputs:
            i = self.next
            if i in self.before:
                c.kick()
                self.before[i](self)
            rid = self.free_inputs.pop(0)
            c.write_entries(self.inputs[rid],
                            lay_out(self.pictures[i], self.raw_format, self.width, self.height,
                                    self.in_params.plane_formats))
            token = c.queue(sid, p.QueueType.INPUT, rid, self.timestamps[i], kick=False)
            self.in_flight[token] = rid
            self.next += 1
        if self.next == len(self.pictures) and self.drain_token is None and self.want_drain:
            self.drain_token = c.submit(p.HDR.pack(p.Cmd.STREAM_DRAIN, sid))
        for token in [t for t in c.done if t in self.in_flight]:
            _, _, _, flags, _ = p.RESOURCE_QUEUE_RESP.unpack(c.done.pop(token).data)
            result.input_flags.append(flags)
            self.free_inputs.append(self.in_flight.pop(token))
        for token in [t for t in c.done if t in self.out_flight]:
            self.take_output(token, c.done.pop(token).data)
        if self.drain_token is not None and self.drain_token in c.done:
            result.drain_status = p.HDR.unpack_from(c.done.pop(self.drain_token).data)[0]
            if result.drain_status == p.Resp.OK_NODATA:
                assert result.eos_seen, "STREAM_DRAIN completed before the EOS buffer"
            self.finished = True
        if not self.want_drain and self.next == len(self.pictures) and len(
                result.packets) >= len(self.pictures):
            self.finished = True

    def take_output(self, token: int, reply: bytes, requeue: bool = True) -> None:
        status, _, ts, flags, size = p.RESOURCE_QUEUE_RESP.unpack(reply)
        assert status == p.Resp.OK_RESOURCE_QUEUE, hex(status)
        rid = self.out_flight.pop(token)
        if flags & p.BufferFlag.ERR:
            self.result.output_errors += 1
        elif flags & p.BufferFlag.EOS:
            assert size == 0
            self.result.eos_seen = True
            return
        else:
            assert not self.result.eos_seen, "a packet after EOS"
            data = self.c.read_entries(self.outputs[rid])[:size]
            self.result.packets.append(EncodedPacket(data, ts, flags))
        if requeue:
            self.out_flight[self.c.queue(self.sid, p.QueueType.OUTPUT, rid, kick=False)] = rid

    def awaiting_device(self) -> bool:
        return not self.finished and self.next == len(self.pictures)

    def state(self) -> str:
        r = self.result
        return (f"encoder stream {self.sid}: {self.next}/{len(self.pictures)} queued, "
                f"{len(self.in_flight)} inputs and {len(self.out_flight)} outputs out, "
                f"{len(r.packets)} packets, events {r.events}, eos {r.eos_seen}")

    def destroy(self) -> None:
        c = self.c
        c.call_ok(p.HDR.pack(p.Cmd.STREAM_DESTROY, self.sid))
        for token in list(self.in_flight) + list(self.out_flight):
            c.wait(token)

    def psnr(self) -> list[float]:
        """PSNR of each picture PyAV decodes from the packets, against the source."""
        decoded = decode_packets(self.coded, [pk.data for pk in self.result.packets])
        assert len(decoded) == len(self.pictures), (len(decoded), len(self.pictures))
        sources = [self.pictures[i] if self.raw_format == p.Format.YUV420
                   else nv12_to_i420(self.pictures[i], self.width, self.height)
                   for i in range(len(self.pictures))]
        return [psnr(a, b) for a, b in zip(decoded, sources, strict=True)]


def nv12_to_i420(packed: bytes, width: int, height: int) -> bytes:
    cw, ch = (width + 1) // 2, (height + 1) // 2
    y = packed[:width * height]
    uv = np.frombuffer(packed, np.uint8, ch * cw * 2, width * height).reshape(ch, cw, 2)
    return y + uv[:, :, 0].tobytes() + uv[:, :, 1].tobytes()
