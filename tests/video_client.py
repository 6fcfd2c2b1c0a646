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
    data: bytes = b""            # the visible picture, when the run keeps them


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
        self.used_order: list[Used] | None = None   # a list: every reply, in used-ring order
        self.events: list[tuple[int, int]] = []
        self.unkicked = False
        for _ in range(event_buffers):
            self.evq.add([], [p.EVENT.size])
        self.evq.kick()

    # -- plumbing -------------------------------------------------------------------
    def submit(self, command: bytes, resp_size: int = 128, extra: bytes = b"",
               kick: bool = True) -> int:
        """Make a command available; ``kick=False`` leaves the notification
        to :meth:`kick` (one kick for a batch, as a guest driver does)."""
        out = [command] + ([extra] if extra else [])
        chain = self.cmdq.add(out, [resp_size])
        self.unkicked = True
        if kick:
            self.kick()
        return chain.token

    def kick(self, wait: bool = True) -> None:
        """Notify the command queue if anything was added.  ``wait``: until
        QEMU has run the handler (a synchronous reply is in the used ring
        then); the decode loop goes on at once instead, as a guest does."""
        if self.unkicked:
            self.unkicked = False
            self.cmdq.kick(wait)

    def poll(self) -> None:
        while (used := self.cmdq.poll()) is not None:
            self.done[used.chain.token] = used
            if self.used_order is not None:
                self.used_order.append(used)
        refilled = False
        while (ev := self.evq.poll()) is not None:
            self.events.append(p.EVENT.unpack(ev.data))
            self.evq.add([], [p.EVENT.size])
            refilled = True
        if refilled:
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

    def queue(self, sid: int, queue: int, rid: int, timestamp: int = 0, size: int = 0,
              kick: bool = True) -> int:
        cmd = p.RESOURCE_QUEUE.pack(p.Cmd.RESOURCE_QUEUE, sid, queue, rid, timestamp, 1,
                                    size, *([0] * 7))
        return self.submit(cmd, p.RESOURCE_QUEUE_RESP.size, kick=kick)

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
               **kw) -> DecodeResult:
        """Feed ``chunks`` (data, timestamp), drain, return every picture."""
        return self.run([StreamRun(self, sid, coded, chunks, **kw)])[0]

    def run(self, runs: list[StreamRun], timeout: float = 60.0,
            poll_interval: float = 0.0002) -> list[DecodeResult]:
        """Decode several streams at once, interleaving their buffers.
        ``poll_interval``: how long the driver sleeps between looks at the
        used rings (it has no interrupt to sleep on; a benchmark raises it so
        that the driver does not eat the CPU the decoder needs)."""
        for run in runs:
            if not run.started:
                run.start()
        deadline = time.monotonic() + timeout
        while not all(run.finished for run in runs):
            assert time.monotonic() < deadline, "decode timed out: " + "; ".join(
                run.state() for run in runs if not run.finished)
            self.poll()
            events, self.events = self.events, []
            for run in runs:
                run.step([ev for ev in events if ev[1] == run.sid])
            self.kick(wait=False)   # one notification for everything queued above
            # A guest hears of a completion at once (an interrupt); this
            # driver looks every poll_interval, which is fine while buffers
            # stream but adds its latency to every one-off wait.  Look often
            # during those: for the first pictures' size, and for the drain.
            urgent = any(run.awaiting_device() for run in runs)
            time.sleep(min(poll_interval, 0.0002) if urgent else poll_interval)
        for run in runs:
            run.destroy()
        return [run.result for run in runs]


class StreamRun:
    """One stream through the ChromeOS flow, advanced by VideoClient.run."""

    def __init__(self, client: VideoClient, sid: int, coded: int,
                 chunks: list[tuple[bytes, int]], input_buffers: int = 4,
                 output_buffers: int = 8, sg_chunks: int = 1,
                 output_format: int = p.Format.NV12, keep_pictures: bool = False,
                 read_pictures: bool = True, open_as: int | None = None) -> None:
        """``open_as``: create the stream with that coded format and name the
        real one in SET_PARAMS(INPUT), as the ChromeOS driver does (it
        creates the stream at open() with the first format it knows)."""
        self.c, self.sid, self.coded = client, sid, coded
        self.open_as = open_as
        self.todo = list(chunks)
        self.input_buffers, self.output_buffers = input_buffers, output_buffers
        self.sg_chunks, self.output_format = sg_chunks, output_format
        self.keep_pictures, self.read_pictures = keep_pictures, read_pictures
        self.result = DecodeResult()
        self.in_flight: dict[int, int] = {}         # token -> input rid
        self.out_flight: dict[int, int] = {}        # token -> output rid
        self.outputs: dict[int, list[tuple[int, int]]] = {}
        self.out_params: p.Params | None = None
        self.drain_token: int | None = None
        self.next_out_rid = 100
        self.finished = False
        self.started = False

    def start(self) -> None:
        """Create the stream and its input resources."""
        self.started = True
        c = self.c
        c.create_stream(self.sid, self.open_as or self.coded)
        if self.open_as is not None:
            params = c.get_params(self.sid, p.QueueType.INPUT)
            params.format = self.coded
            c.set_params(self.sid, params)
        if self.output_format != p.Format.NV12:
            params = c.get_params(self.sid, p.QueueType.OUTPUT)
            params.format = self.output_format
            c.set_params(self.sid, params)
        in_size = c.get_params(self.sid, p.QueueType.INPUT).plane_formats[0][0]
        self.inputs = {rid: c.alloc_entries(in_size, 1) for rid in range(self.input_buffers)}
        for rid, entries in self.inputs.items():
            c.create_resource(self.sid, p.QueueType.INPUT, rid, entries)
        self.free_inputs = list(self.inputs)

    def step(self, events: list[tuple[int, int]]) -> None:
        c, sid, result = self.c, self.sid, self.result
        while self.todo and self.free_inputs:
            data, ts = self.todo.pop(0)
            rid = self.free_inputs.pop(0)
            c.write_entries(self.inputs[rid], data)
            self.in_flight[c.queue(sid, p.QueueType.INPUT, rid, ts, len(data), kick=False)] = rid
        if not self.todo and self.drain_token is None:
            # Right behind the last input, as a V4L2 client's DEC_CMD_STOP
            # follows its last QBUF: the device drains what is queued.
            self.drain_token = c.submit(p.HDR.pack(p.Cmd.STREAM_DRAIN, sid))
        for token in [t for t in c.done if t in self.in_flight]:     # used-ring order
            _, _, ts, flags, _ = p.RESOURCE_QUEUE_RESP.unpack(c.done.pop(token).data)
            result.input_flags.append(flags)
            self.free_inputs.append(self.in_flight.pop(token))
        for token in [t for t in c.done if t in self.out_flight]:
            self.take_output(token, c.done.pop(token).data, requeue=True)
        # Pictures returned before an event belong to the old geometry.
        for ev in events:
            result.events.append(ev)
            if ev[0] == p.EventType.DECODER_RESOLUTION_CHANGED:
                self.reallocate_outputs()
        # Replies that arrived while reallocating come before the drain's.
        for token in [t for t in c.done if t in self.out_flight]:
            self.take_output(token, c.done.pop(token).data, requeue=True)
        if self.drain_token is not None and self.drain_token in c.done:
            result.drain_status = p.HDR.unpack_from(c.done.pop(self.drain_token).data)[0]
            if result.drain_status == p.Resp.OK_NODATA:
                assert result.eos_seen, "STREAM_DRAIN completed before the EOS buffer"
            self.finished = True

    def awaiting_device(self) -> bool:
        """Waiting on a one-off answer rather than streaming: no output
        buffers yet (the size is not known), or every input sent (the
        drain is under way)."""
        return not self.finished and (not self.outputs or not self.todo)

    def state(self) -> str:
        r = self.result
        return (f"stream {self.sid}: {len(self.todo)} chunks to send, {len(self.in_flight)} "
                f"inputs and {len(self.out_flight)} outputs queued, {len(r.pictures)} pictures, "
                f"events {r.events}, drain sent {self.drain_token is not None}, "
                f"eos {r.eos_seen}, used ring idx {self.c.m.mem.u16(self.c.cmdq.used + 2)}, "
                f"driver's last_used {self.c.cmdq.last_used}")

    def take_output(self, token: int, reply: bytes, requeue: bool) -> None:
        status, _, ts, flags, _ = p.RESOURCE_QUEUE_RESP.unpack(reply)
        assert status == p.Resp.OK_RESOURCE_QUEUE, hex(status)
        rid = self.out_flight.pop(token)
        if flags & p.BufferFlag.ERR:
            return
        if flags & p.BufferFlag.EOS:
            self.result.eos_seen = True
            return
        assert self.out_params is not None and not self.result.eos_seen
        _, _, w, h = self.out_params.crop
        if self.read_pictures:
            pic = visible_nv12(self.c.read_entries(self.outputs[rid]), self.out_params,
                               self.out_params.format)
            self.result.pictures.append(Output(ts, flags, zlib.crc32(pic), w, h,
                                               pic if self.keep_pictures else b""))
        else:
            self.result.pictures.append(Output(ts, flags, 0, w, h))
        if requeue:
            self.out_flight[self.c.queue(self.sid, p.QueueType.OUTPUT, rid, kick=False)] = rid

    def reallocate_outputs(self) -> None:
        c, sid = self.c, self.sid
        if self.outputs:
            c.call_ok(p.QUEUE_CMD.pack(p.Cmd.QUEUE_CLEAR, sid, p.QueueType.OUTPUT))
            c.call_ok(p.QUEUE_CMD.pack(p.Cmd.RESOURCE_DESTROY_ALL, sid, p.QueueType.OUTPUT))
            for token in list(self.out_flight):
                # ERR if the clear took it back; a picture if it came first.
                self.take_output(token, c.wait(token), requeue=False)
            self.outputs.clear()
        self.out_params = c.get_params(sid, p.QueueType.OUTPUT)
        size = sum(s for s, _ in self.out_params.plane_formats)
        for _ in range(max(self.output_buffers, self.out_params.min_buffers)):
            rid = self.next_out_rid
            self.next_out_rid += 1
            self.outputs[rid] = c.alloc_entries(size, self.sg_chunks)
            c.create_resource(sid, p.QueueType.OUTPUT, rid, self.outputs[rid])
            # Queued without waiting, as QBUF does: the next command's kick,
            # or the decode loop's, carries it to the device.
            self.out_flight[c.queue(sid, p.QueueType.OUTPUT, rid, kick=False)] = rid

    def destroy(self) -> None:
        c = self.c
        c.call_ok(p.HDR.pack(p.Cmd.STREAM_DESTROY, self.sid))
        for token in list(self.in_flight) + list(self.out_flight):
            c.wait(token)
