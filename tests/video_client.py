"""A virtio-video decoder client on the host-side driver, doing what the
ChromeOS guest driver does: STREAM_CREATE with VIRTIO_OBJECT, the real memory
type in SET_PARAMS_EXT, single-buffer resources made of guest pages,
resolution-change events, drain, clear, destroy."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

from pyemb.video import protocol as p
from tests.hostdriver import Machine, VirtioDevice
from tests.hostdriver.virtio import Used

PAGE = 4096


@dataclass
class Output:
    timestamp: int
    flags: int
    crc: int
    width: int
    height: int


@dataclass
class DecodeResult:
    pictures: list[Output] = field(default_factory=list)
    events: list[tuple[int, int]] = field(default_factory=list)
    input_flags: list[int] = field(default_factory=list)
    eos_seen: bool = False
    drain_status: int | None = None


def visible_nv12(data: bytes, params: p.Params, fmt: int = p.Format.NV12) -> bytes:
    """The visible picture of a buffer laid out as ``params`` say."""
    _, _, w, h = params.crop
    out = bytearray()
    offset = 0
    planes = params.plane_formats
    if fmt == p.Format.NV12:
        shapes = [(h, w), ((h + 1) // 2, 2 * ((w + 1) // 2))]
    else:
        shapes = [(h, w), ((h + 1) // 2, (w + 1) // 2), ((h + 1) // 2, (w + 1) // 2)]
    for (size, stride), (rows, row_bytes) in zip(planes, shapes, strict=True):
        for r in range(rows):
            out += data[offset + r * stride: offset + r * stride + row_bytes]
        offset += size
    return bytes(out)


class VideoClient:
    def __init__(self, machine: Machine, dev: VirtioDevice, event_buffers: int = 16) -> None:
        self.m, self.dev = machine, dev
        self.cmdq, self.evq = dev.queues[p.COMMAND_QUEUE], dev.queues[p.EVENT_QUEUE]
        self.done: dict[int, Used] = {}
        self.events: list[tuple[int, int]] = []
        for _ in range(event_buffers):
            self.evq.add([], [p.EVENT.size])
        self.evq.kick()

    # -- plumbing -------------------------------------------------------------------
    def submit(self, command: bytes, resp_size: int = 128, extra: bytes = b"") -> int:
        out = [command] + ([extra] if extra else [])
        chain = self.cmdq.add(out, [resp_size])
        self.cmdq.kick()
        return chain.token

    def poll(self) -> None:
        while (used := self.cmdq.poll()) is not None:
            self.done[used.chain.token] = used
        while (ev := self.evq.poll()) is not None:
            self.events.append(p.EVENT.unpack(ev.data))
            self.evq.add([], [p.EVENT.size])
            self.evq.kick()

    def wait(self, head: int, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while head not in self.done:
            self.poll()
            if head in self.done:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("no reply from the video device")
            time.sleep(0.0002)
        return self.done.pop(head).data

    def call(self, command: bytes, resp_size: int = 128, extra: bytes = b"") -> bytes:
        return self.wait(self.submit(command, resp_size, extra))

    def call_ok(self, command: bytes, resp_size: int = 128, extra: bytes = b"") -> bytes:
        reply = self.call(command, resp_size, extra)
        status = p.HDR.unpack_from(reply)[0]
        assert status < 0x300, f"command 0x{p.HDR.unpack_from(command)[0]:x}: 0x{status:x}"
        return reply

    # -- commands --------------------------------------------------------------------
    def create_stream(self, sid: int, coded: int, mem: int = p.MemType.VIRTIO_OBJECT) -> None:
        self.call_ok(p.STREAM_CREATE.pack(p.Cmd.STREAM_CREATE, sid, mem, mem, coded, 0,
                                          b"test"))
        for queue in (p.QueueType.INPUT, p.QueueType.OUTPUT):
            params = self.get_params(sid, queue)
            params.resource_type = p.MemType.GUEST_PAGES
            self.set_params(sid, params)

    def get_params(self, sid: int, queue: int) -> p.Params:
        reply = self.call_ok(p.QUEUE_CMD.pack(p.Cmd.GET_PARAMS_EXT, sid, queue))
        return p.Params.unpack(reply, p.HDR.size, ext=True)

    def set_params(self, sid: int, params: p.Params) -> None:
        self.call_ok(p.HDR.pack(p.Cmd.SET_PARAMS_EXT, sid) + params.pack_ext())

    def alloc_entries(self, size: int, chunks: int) -> list[tuple[int, int]]:
        """``size`` bytes of guest memory in ``chunks`` non-adjacent pieces."""
        per = -(-size // chunks)
        per = -(-per // PAGE) * PAGE
        entries, left = [], size
        while left > 0:
            n = min(per, left)
            addr = self.m.alloc.alloc(n + PAGE, PAGE)    # a gap page: not contiguous
            entries.append((addr, n))
            left -= n
        return entries

    def create_resource(self, sid: int, queue: int, rid: int,
                        entries: list[tuple[int, int]]) -> None:
        num_entries = [len(entries)] + [0] * 7
        cmd = p.RESOURCE_CREATE.pack(p.Cmd.RESOURCE_CREATE, sid, queue, rid,
                                     p.PlanesLayout.SINGLE_BUFFER, 1, *([0] * 8), *num_entries)
        body = b"".join(p.MEM_ENTRY.pack(a, n) for a, n in entries)
        self.call_ok(cmd, extra=body)

    def queue(self, sid: int, queue: int, rid: int, timestamp: int = 0, size: int = 0) -> int:
        cmd = p.RESOURCE_QUEUE.pack(p.Cmd.RESOURCE_QUEUE, sid, queue, rid, timestamp, 1,
                                    size, *([0] * 7))
        return self.submit(cmd, p.RESOURCE_QUEUE_RESP.size)

    def write_entries(self, entries: list[tuple[int, int]], data: bytes) -> None:
        off = 0
        for addr, n in entries:
            self.m.mem.write(addr, data[off:off + n])
            off += n
            if off >= len(data):
                break

    def read_entries(self, entries: list[tuple[int, int]]) -> bytes:
        return b"".join(self.m.mem.read(a, n) for a, n in entries)

    # -- the decode flow -----------------------------------------------------------------
    def decode(self, sid: int, coded: int, chunks: list[tuple[bytes, int]],
               input_buffers: int = 4, output_buffers: int = 8, sg_chunks: int = 1,
               timeout: float = 60.0) -> DecodeResult:
        """Feed ``chunks`` (data, timestamp), drain, return every picture."""
        result = DecodeResult()
        self.create_stream(sid, coded)
        in_size = self.get_params(sid, p.QueueType.INPUT).plane_formats[0][0]
        inputs = {rid: self.alloc_entries(in_size, 1) for rid in range(input_buffers)}
        for rid, entries in inputs.items():
            self.create_resource(sid, p.QueueType.INPUT, rid, entries)
        free_inputs = list(inputs)
        in_flight: dict[int, int] = {}          # head -> input rid
        out_flight: dict[int, int] = {}         # head -> output rid
        outputs: dict[int, list[tuple[int, int]]] = {}
        out_params: p.Params | None = None
        todo = list(chunks)
        drain_head = None
        next_out_rid = 100
        deadline = time.monotonic() + timeout
        while drain_head is None or result.drain_status is None:
            assert time.monotonic() < deadline, "decode timed out"
            while todo and free_inputs:
                data, ts = todo.pop(0)
                rid = free_inputs.pop(0)
                self.write_entries(inputs[rid], data)
                in_flight[self.queue(sid, p.QueueType.INPUT, rid, ts, len(data))] = rid
            if not todo and not in_flight and drain_head is None:
                drain_head = self.submit(p.HDR.pack(p.Cmd.STREAM_DRAIN, sid))
            self.poll()
            for ev in self.events:
                result.events.append(ev)
                if ev == (p.EventType.DECODER_RESOLUTION_CHANGED, sid):
                    if outputs:
                        self.call_ok(p.QUEUE_CMD.pack(p.Cmd.QUEUE_CLEAR, sid,
                                                      p.QueueType.OUTPUT))
                        self.call_ok(p.QUEUE_CMD.pack(p.Cmd.RESOURCE_DESTROY_ALL, sid,
                                                      p.QueueType.OUTPUT))
                        for head in list(out_flight):
                            self.wait(head)
                        out_flight.clear()
                        outputs.clear()
                    out_params = self.get_params(sid, p.QueueType.OUTPUT)
                    size = sum(s for s, _ in out_params.plane_formats)
                    for _ in range(max(output_buffers, out_params.min_buffers)):
                        rid = next_out_rid
                        next_out_rid += 1
                        outputs[rid] = self.alloc_entries(size, sg_chunks)
                        self.create_resource(sid, p.QueueType.OUTPUT, rid, outputs[rid])
                        out_flight[self.queue(sid, p.QueueType.OUTPUT, rid)] = rid
                elif ev[1] == sid:
                    raise AssertionError(f"unexpected event {ev}")
            self.events.clear()
            for head in [h for h in in_flight if h in self.done]:
                _, _, ts, flags, _ = p.RESOURCE_QUEUE_RESP.unpack(self.done.pop(head).data)
                result.input_flags.append(flags)
                free_inputs.append(in_flight.pop(head))
            for head in [h for h in out_flight if h in self.done]:
                reply = self.done.pop(head).data
                status, _, ts, flags, _ = p.RESOURCE_QUEUE_RESP.unpack(reply)
                assert status == p.Resp.OK_RESOURCE_QUEUE, hex(status)
                rid = out_flight.pop(head)
                if flags & p.BufferFlag.EOS:
                    result.eos_seen = True
                    continue
                assert out_params is not None and not result.eos_seen
                pic = visible_nv12(self.read_entries(outputs[rid]), out_params,
                                   out_params.format)
                _, _, w, h = out_params.crop
                result.pictures.append(Output(ts, flags, zlib.crc32(pic), w, h))
                out_flight[self.queue(sid, p.QueueType.OUTPUT, rid)] = rid
            if drain_head is not None and drain_head in self.done:
                result.drain_status = p.HDR.unpack_from(self.done.pop(drain_head).data)[0]
                assert result.eos_seen, "STREAM_DRAIN completed before the EOS buffer"
            time.sleep(0.0002)
        self.call_ok(p.HDR.pack(p.Cmd.STREAM_DESTROY, sid))
        for head in list(in_flight) + list(out_flight):
            self.wait(head)
        return result
