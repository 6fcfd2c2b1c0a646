"""The decoder stream's own logic, with a stand-in engine and guest memory.

The race tests hold the worker at a gate inside the engine (in the middle of
decoding an input, or of writing a picture into a guest buffer) and send a
command from the test thread, which plays QEMU's main loop: every command
must be answered without waiting for the worker, and completions must reach
the used ring in the order the protocol asks for.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from pyemb.video import protocol as p
from pyemb.video.decoder import DecoderStream, StreamState
from pyemb.video.device import VideoDevice
from pyemb.video.resources import Resource
from pyemb.video_backend import DecodeError, DecodeSession, Picture, VideoBackend
from tests.fakes import FakeChunk, FakeHandle, FakeRequest

SIZE = 16
PICTURE_BYTES = SIZE * SIZE * 3 // 2
PAGE = 4096
SID = 1


class GrayPicture(Picture):
    """A SIZE x SIZE picture whose luma is its timestamp."""

    def planes(self, fmt: p.Format) -> list[np.ndarray]:
        return [np.full((SIZE, SIZE), self.timestamp, np.uint8),
                np.full((SIZE // 2, SIZE), 128, np.uint8)]


class OnePicturePerChunk(DecodeSession):
    size = (SIZE, SIZE)

    def decode(self, data: bytes, timestamp: int) -> list[Picture]:
        return [GrayPicture(SIZE, SIZE, timestamp, p.BufferFlag.IFRAME, None)]

    def flush(self) -> list[Picture]:
        return []


def wait_until(condition: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def wait_for(requests: list[FakeRequest], timeout: float = 5.0) -> None:
    wait_until(lambda: all(r.done for r in requests), "the worker to complete the requests",
               timeout)


def test_pictures_go_to_the_most_recently_queued_free_buffer():
    """Newest first keeps a stream on the buffers still in the CPU's caches."""
    events: list[tuple[int, int]] = []
    stream = DecoderStream(1, p.Format.H264, p.MemType.GUEST_PAGES, p.MemType.GUEST_PAGES,
                           OnePicturePerChunk(), lambda kind, sid: events.append((kind, sid)),
                           lambda e, what: None, contextlib.nullcontext)
    try:
        buffers, memory = {}, {}
        with stream.lock:
            for rid in range(3):
                memory[rid] = FakeChunk(SIZE * SIZE * 3 // 2)
                res = Resource(rid, p.QueueType.OUTPUT, p.PlanesLayout.SINGLE_BUFFER, [0],
                               [memory[rid]])
                buffers[rid] = FakeRequest([], [p.RESOURCE_QUEUE_RESP.size])
                stream.queue_output(buffers[rid], res)
        inputs = []
        for ts in (1, 2, 3):
            request = FakeRequest([], [p.RESOURCE_QUEUE_RESP.size])
            res = Resource(10 + ts, p.QueueType.INPUT, p.PlanesLayout.SINGLE_BUFFER, [0],
                           [FakeChunk(4)])
            with stream.lock:
                stream.queue_input(request, res, 4, ts)
                stream.output_set_up()   # the driver follows the event
            inputs.append(request)
            wait_for(inputs)
        wait_for(list(buffers.values()))
        stamps = {rid: p.RESOURCE_QUEUE_RESP.unpack(r.reply)[2] for rid, r in buffers.items()}
        assert stamps == {2: 1, 1: 2, 0: 3}
        assert events == [(p.EventType.DECODER_RESOLUTION_CHANGED, 1)]
        for rid, ts in stamps.items():        # and each picture is in its buffer
            assert bytes(memory[rid].view[:SIZE * SIZE]) == bytes([ts]) * (SIZE * SIZE)
    finally:
        with stream.lock:
            stream.destroy()
        stream.thread.join(5)


def test_the_state_machine_refuses_a_transition_it_does_not_list():
    stream = DecoderStream(1, p.Format.H264, p.MemType.GUEST_PAGES, p.MemType.GUEST_PAGES,
                           OnePicturePerChunk(), lambda kind, sid: None, lambda e, what: None,
                           contextlib.nullcontext)
    try:
        with stream.lock:
            assert stream.state is StreamState.AWAITING_HEADERS
            with pytest.raises(RuntimeError, match="awaiting-headers -> decoding"):
                stream._to(StreamState.DECODING)
            stream.destroy()
            with pytest.raises(RuntimeError, match="destroyed -> destroyed"):
                stream.destroy()
    finally:
        stream.thread.join(5)
    assert not stream.thread.is_alive()


# -- a whole device on a stand-in engine whose steps can be held ----------------------
class Gate:
    """A point in the engine where the worker stops, once armed, until the
    test opens it."""

    def __init__(self) -> None:
        self.armed = False
        self.reached = threading.Event()
        self.go = threading.Event()

    def arm(self) -> None:
        self.reached.clear()
        self.go.clear()
        self.armed = True

    def wait_reached(self) -> None:
        assert self.reached.wait(5), "the worker never reached the gate"

    def open(self) -> None:
        self.armed = False
        self.go.set()

    def passing(self) -> None:
        """Called by the worker."""
        if self.armed:
            self.armed = False
            self.reached.set()
            assert self.go.wait(10), "the test never opened the gate"


class HeldPicture(GrayPicture):
    def write_into(self, fmt: p.Format, target: np.ndarray,
                   layout: list[tuple[int, int]]) -> None:
        self.frame.write.passing()          # target, a view of guest RAM, is live here
        super().write_into(fmt, target, layout)


class HeldSession(DecodeSession):
    """One SIZE x SIZE picture per input, decode and write each held at a
    gate when armed."""

    def __init__(self) -> None:
        self.decode_gate, self.write = Gate(), Gate()
        self.decoded: list[int] = []
        self.picture_size = (SIZE, SIZE)
        self.crash: Exception | None = None
        self.resets = 0
        self.closed = False

    def decode(self, data: bytes, timestamp: int) -> list[Picture]:
        self.decode_gate.passing()
        if self.crash is not None:
            raise self.crash
        self.decoded.append(timestamp)
        return [HeldPicture(*self.picture_size, timestamp, p.BufferFlag.IFRAME, self)]

    def flush(self) -> list[Picture]:
        return []

    def reset(self) -> None:
        self.resets += 1

    @property
    def size(self) -> tuple[int, int] | None:
        return (SIZE, SIZE) if self.decoded else None

    def close(self) -> None:
        self.closed = True


class HeldBackend(VideoBackend):
    sessions: list[HeldSession] = []

    def coded_formats(self) -> list[p.Format]:
        return [p.Format.H264]

    def open_session(self, fmt: p.Format) -> DecodeSession:
        session = HeldSession()
        HeldBackend.sessions.append(session)
        return session


class Rig:
    """A VideoDevice with one stream on HeldBackend, decoding, with its
    input and output resources made and the first size event handled.
    The test thread is QEMU's main loop."""

    def __init__(self, outputs: int = 3, inputs: int = 3) -> None:
        self.handle = FakeHandle(ram_size=(2 + inputs + outputs) * PAGE)
        self.dev = VideoDevice(self.handle, {}, backend_class=HeldBackend)
        self.errors: list[tuple[str, BaseException]] = []
        self.dev.report = lambda e, what: self.errors.append((what, e))     # type: ignore
        self.event_buffers = [self.post_event_buffer() for _ in range(4)]
        self.ok(p.STREAM_CREATE.pack(p.Cmd.STREAM_CREATE, SID, p.MemType.GUEST_PAGES,
                                     p.MemType.GUEST_PAGES, p.Format.H264, 0, b"rig"))
        self.session = HeldBackend.sessions[-1]
        self.stream = self.dev.streams[SID]
        self.memory: dict[tuple[int, int], int] = {}
        page = 1
        for queue, count in ((p.QueueType.INPUT, inputs), (p.QueueType.OUTPUT, outputs)):
            for rid in range(count):
                self.create(queue, rid, page * PAGE)
                page += 1
        # The first picture: its size event, then the driver reads the
        # params and sets the OUTPUT queue up (S_FMT on CAPTURE).
        self.next_input = 0
        first = self.queue_output(0)
        self.decode(1)
        wait_until(lambda: self.events(), "the size event")
        reply = self.ok(p.QUEUE_CMD.pack(p.Cmd.GET_PARAMS_EXT, SID, p.QueueType.OUTPUT))
        assert self.stream.state is StreamState.RESOLUTION_CHANGE, "a read is not a set-up"
        params = p.Params.unpack(reply, p.HDR.size, True)
        self.ok(p.HDR.pack(p.Cmd.SET_PARAMS_EXT, SID) + params.pack_ext())
        wait_until(lambda: first in self.handle.used, "the first picture")
        assert self.stream.state is StreamState.DECODING

    # -- the driver's side ----------------------------------------------------------------
    def post_event_buffer(self) -> FakeRequest:
        request = self.handle.request([], [p.EVENT.size], queue=p.EVENT_QUEUE)
        self.handle.call(self.dev, p.EVENT_QUEUE, request)
        return request

    def events(self) -> list[tuple[int, int]]:
        return [p.EVENT.unpack(r.reply) for r in self.handle.used if r.queue == p.EVENT_QUEUE]

    def send(self, command: bytes, prompt: bool = False, reply_size: int = 128) -> FakeRequest:
        """Make a command available.  ``prompt``: from another thread, and
        it must be handled within a second (QEMU's main loop must not wait
        for the worker); the test's gates are opened if it is not, so that
        the test fails rather than hangs."""
        request = self.handle.request([command], [reply_size])
        if not prompt:
            self.handle.call(self.dev, p.COMMAND_QUEUE, request)
            return request
        caller = threading.Thread(target=self.handle.call,
                                  args=(self.dev, p.COMMAND_QUEUE, request))
        caller.start()
        caller.join(1.0)
        if caller.is_alive():
            self.session.decode_gate.open()
            self.session.write.open()
            caller.join(5)
            pytest.fail(f"command 0x{p.HDR.unpack_from(command)[0]:x} waited for the worker "
                        "on QEMU's main loop")
        return request

    def ok(self, command: bytes) -> bytes:
        request = self.send(command)
        assert request.done and p.HDR.unpack_from(request.reply)[0] < 0x300, request.reply
        return request.reply

    def create(self, queue: int, rid: int, address: int) -> None:
        cmd = p.RESOURCE_CREATE.pack(p.Cmd.RESOURCE_CREATE, SID, queue, rid,
                                     p.PlanesLayout.SINGLE_BUFFER, 1, *([0] * 8),
                                     1, *([0] * 7))
        self.ok(cmd + p.MEM_ENTRY.pack(address, PAGE))
        self.memory[queue, rid] = address

    def queue(self, queue: int, rid: int, timestamp: int = 0, size: int = 0,
              prompt: bool = False) -> FakeRequest:
        cmd = p.RESOURCE_QUEUE.pack(p.Cmd.RESOURCE_QUEUE, SID, queue, rid, timestamp, 1, size,
                                    *([0] * 7))
        request = self.send(cmd, prompt, p.RESOURCE_QUEUE_RESP.size)
        assert not request.done, request.reply
        return request

    def queue_output(self, rid: int, prompt: bool = False) -> FakeRequest:
        return self.queue(p.QueueType.OUTPUT, rid, prompt=prompt)

    def decode(self, timestamp: int) -> FakeRequest:
        """Queue an input buffer (the next input resource) with 4 bytes."""
        rid = self.next_input
        self.next_input = (rid + 1) % 3
        return self.queue(p.QueueType.INPUT, rid, timestamp, 4)

    def command(self, kind: int, queue: int | None = None, prompt: bool = True) -> FakeRequest:
        cmd = p.HDR.pack(kind, SID) if queue is None else p.QUEUE_CMD.pack(kind, SID, queue)
        return self.send(cmd, prompt=prompt)

    # -- what came back -------------------------------------------------------------------
    @staticmethod
    def flags(request: FakeRequest) -> int:
        return p.RESOURCE_QUEUE_RESP.unpack(request.reply)[3]

    @staticmethod
    def timestamp(request: FakeRequest) -> int:
        return p.RESOURCE_QUEUE_RESP.unpack(request.reply)[2]

    def position(self, request: FakeRequest) -> int:
        assert request in self.handle.used, "not on the used ring"
        return self.handle.used.index(request)

    def luma(self, rid: int) -> bytes:
        address = self.memory[p.QueueType.OUTPUT, rid]
        return bytes(self.handle.ram[address:address + SIZE * SIZE])

    def close(self) -> None:
        self.session.decode_gate.open()
        self.session.write.open()
        self.handle.reset(self.dev)
        for stream in list(self.dev.workers):
            stream.thread.join(5)


@pytest.fixture
def rig():
    r = Rig()
    try:
        yield r
    finally:
        r.close()
    assert not r.errors, r.errors
    assert r.handle.kept_views == 0, "a mapping was released while a write used it"
    assert all(req.late == 0 for req in r.handle.requests), "completed after a reset"


def test_a_picture_write_does_not_hold_up_the_main_loop(rig):
    rig.queue_output(1)
    rig.session.write.arm()
    job = rig.decode(5)
    rig.session.write.wait_reached()
    # The worker is inside the write; the stream's commands are answered now.
    params = rig.send(p.QUEUE_CMD.pack(p.Cmd.GET_PARAMS_EXT, SID, p.QueueType.OUTPUT),
                      prompt=True)
    assert p.HDR.unpack_from(params.reply)[0] == p.Resp.OK_GET_PARAMS
    spare = rig.queue_output(2, prompt=True)
    rig.session.write.open()
    wait_for([job])
    wait_until(lambda: rig.luma(1) == bytes([5]) * (SIZE * SIZE), "the picture in buffer 1")
    assert not spare.done                   # it waits for the next picture


def test_queue_clear_input_while_decoding_returns_that_input_with_err_before_the_answer(rig):
    out = rig.queue_output(1)
    rig.session.decode_gate.arm()
    busy = rig.decode(5)
    rig.session.decode_gate.wait_reached()
    waiting = rig.decode(6)
    answer = rig.command(p.Cmd.QUEUE_CLEAR, p.QueueType.INPUT)
    assert answer.done, "QUEUE_CLEAR(INPUT) waited for the decoder"
    assert rig.flags(busy) == rig.flags(waiting) == p.BufferFlag.ERR
    assert rig.position(busy) < rig.position(answer) and rig.position(waiting) < rig.position(
        answer)
    rig.session.decode_gate.open()
    wait_until(lambda: rig.session.resets == 1, "the decoder reset after the clear")
    time.sleep(0.05)
    assert not out.done, "a picture decoded from a cleared input was written"
    # The stream decodes on from there.
    after = rig.decode(7)
    wait_for([after, out])
    assert rig.flags(after) == 0 and rig.timestamp(out) == 7


def test_queue_clear_input_while_writing_answers_after_the_picture(rig):
    out = rig.queue_output(1)
    rig.session.write.arm()
    job = rig.decode(5)
    rig.session.write.wait_reached()
    answer = rig.command(p.Cmd.QUEUE_CLEAR, p.QueueType.INPUT)
    rig.session.write.open()
    wait_for([answer, out, job])
    # The picture was decoded before the clear: it may come back, but before
    # the answer.
    assert rig.timestamp(out) == 5 and rig.flags(out) == p.BufferFlag.IFRAME
    assert rig.position(out) < rig.position(answer)
    assert rig.position(job) < rig.position(answer)


@pytest.mark.parametrize("command", ["QUEUE_CLEAR", "RESOURCE_DESTROY_ALL", "STREAM_DESTROY"])
def test_taking_back_the_buffer_being_written_answers_after_its_err(rig, command):
    free = [rig.queue_output(1), rig.queue_output(2)]
    busy = rig.queue_output(0)              # the newest: the picture goes here
    rig.session.write.arm()
    rig.decode(5)
    rig.session.write.wait_reached()
    mappings = len(rig.handle.mappings)
    kind = getattr(p.Cmd, command)
    answer = rig.command(kind, None if command == "STREAM_DESTROY" else p.QueueType.OUTPUT)
    # The free buffers come back at once; the answer waits for the write.
    assert all(rig.flags(r) == p.BufferFlag.ERR for r in free)
    assert not busy.done and not answer.done
    if command != "QUEUE_CLEAR":
        # Unmapped at once but for the buffer being written.
        unmapped = mappings - len(rig.handle.mappings)
        assert unmapped == (2 if command == "RESOURCE_DESTROY_ALL" else 2 + 3)
    rig.session.write.open()
    wait_for([answer])
    assert rig.flags(busy) == p.BufferFlag.ERR
    assert max(map(rig.position, free)) < rig.position(busy) < rig.position(answer)
    assert p.HDR.unpack_from(answer.reply)[0] == p.Resp.OK_NODATA
    if command == "QUEUE_CLEAR":
        # The picture was not lost: it goes into the next buffer.
        again = rig.queue_output(1)
        wait_for([again])
        assert rig.timestamp(again) == 5
    else:
        assert len(rig.handle.mappings) == (3 if command == "RESOURCE_DESTROY_ALL" else 0)
    if command == "STREAM_DESTROY":
        rig.stream.thread.join(5)
        assert not rig.stream.thread.is_alive() and rig.session.closed


def test_stream_destroy_while_decoding_returns_the_input_with_err_before_the_answer(rig):
    out = rig.queue_output(1)
    rig.session.decode_gate.arm()
    busy = rig.decode(5)
    rig.session.decode_gate.wait_reached()
    answer = rig.command(p.Cmd.STREAM_DESTROY)
    assert answer.done and rig.flags(busy) == rig.flags(out) == p.BufferFlag.ERR
    assert rig.position(busy) < rig.position(answer) and rig.position(out) < rig.position(
        answer)
    events = len(rig.events())
    rig.session.decode_gate.open()
    rig.stream.thread.join(5)
    assert not rig.stream.thread.is_alive() and rig.session.closed
    assert len(rig.events()) == events and not rig.dev.events.pending
    assert not rig.handle.mappings


def test_a_stream_gives_the_memory_its_engine_freed_back_as_it_ends(rig, monkeypatch):
    """The worker's last act, after its engine closed: glibc's free pages go
    back to the host (pyemb.memory), on the worker, not the main loop."""
    calls = []
    monkeypatch.setattr("pyemb.video.stream.give_back_free_memory",
                        lambda: calls.append((rig.session.closed, threading.current_thread())))
    wait_for([rig.decode(5)])
    assert calls == []
    rig.command(p.Cmd.STREAM_DESTROY)
    rig.stream.thread.join(5)
    assert calls == [(True, rig.stream.thread)]


@pytest.mark.parametrize("where", ["decoding", "writing"])
def test_reset_while_busy_completes_nothing_and_sends_no_event(rig, where):
    rig.queue_output(1)
    if where == "decoding":
        # A new size in the input being decoded: its event must not go out either.
        rig.session.picture_size = (2 * SIZE, 2 * SIZE)
    gate = rig.session.decode_gate if where == "decoding" else rig.session.write
    gate.arm()
    job = rig.decode(5)
    gate.wait_reached()
    held = [r for r in rig.handle.live_requests if not r.done]
    resetter = threading.Thread(target=rig.handle.reset, args=(rig.dev,))
    resetter.start()
    resetter.join(1.0)
    gate.open()
    resetter.join(5)
    assert rig.stream.state is StreamState.ABANDONED
    used = len(rig.handle.used)
    rig.stream.thread.join(5)
    assert not rig.stream.thread.is_alive() and rig.session.closed
    assert len(rig.handle.used) == used, "something reached the guest after the reset"
    assert all(r.late == 0 for r in held + [job]), "the worker completed a dropped request"
    assert not rig.dev.events.pending
    rig.post_event_buffer()
    assert len(rig.handle.used) == used


def test_reset_while_writing_does_not_wait_for_the_write(rig):
    rig.queue_output(1)
    rig.session.write.arm()
    rig.decode(5)
    rig.session.write.wait_reached()
    resetter = threading.Thread(target=rig.handle.reset, args=(rig.dev,))
    resetter.start()
    resetter.join(1.0)
    waited = resetter.is_alive()
    rig.session.write.open()
    resetter.join(5)
    assert not waited, "the reset waited for a picture write"


def test_clear_answer_does_not_overtake_completions_the_worker_has_not_pushed(rig):
    """The worker pushes a step's completions when the step ends, under
    QEMU's lock; a QUEUE_CLEAR handled before that (QEMU's main loop holds
    the lock) must not put its answer on the used ring first."""
    free = rig.queue_output(1)
    busy = rig.queue_output(2)
    with rig.handle.bql:                    # QEMU's main loop is busy
        rig.handle.batch_waits_for_bql.clear()
        job = rig.decode(5)
        assert rig.handle.batch_waits_for_bql.wait(5)
        assert busy.done and job.done       # completed, not pushed yet
        answer = rig.command(p.Cmd.QUEUE_CLEAR, p.QueueType.OUTPUT, prompt=False)
        assert rig.flags(free) == p.BufferFlag.ERR
    wait_until(lambda: answer in rig.handle.used and busy in rig.handle.used,
               "the worker's completions and the answer on the used ring")
    assert rig.timestamp(busy) == 5 and rig.flags(busy) == p.BufferFlag.IFRAME
    assert rig.position(busy) < rig.position(answer)
    assert rig.position(job) < rig.position(answer)


def test_drain_returns_the_last_picture_then_eos_then_its_answer(rig):
    outs = [rig.queue_output(1), rig.queue_output(2)]
    job = rig.decode(5)
    drain = rig.send(p.HDR.pack(p.Cmd.STREAM_DRAIN, SID))
    wait_for([drain, job] + outs)
    picture, eos = sorted(outs, key=rig.position)
    assert rig.timestamp(picture) == 5 and rig.flags(eos) == p.BufferFlag.EOS
    assert rig.position(eos) < rig.position(drain)
    assert p.HDR.unpack_from(drain.reply)[0] == p.Resp.OK_NODATA
    assert rig.stream.state is StreamState.DECODING


def test_an_engine_bug_fails_the_stream_and_leaves_nothing_hanging(rig):
    waiting = rig.queue_output(1)
    rig.session.crash = RuntimeError("engine bug")
    job = rig.decode(5)
    wait_for([job, waiting])
    assert [what for what, _ in rig.errors] == [f"decoding stream {SID}"]
    rig.errors.clear()
    assert rig.stream.state is StreamState.FAILED
    assert (p.EventType.ERROR, SID) in rig.events()
    assert rig.flags(job) == rig.flags(waiting) == p.BufferFlag.ERR
    # What comes afterwards is answered at once, with errors.
    request = rig.send(p.RESOURCE_QUEUE.pack(p.Cmd.RESOURCE_QUEUE, SID, p.QueueType.OUTPUT, 2,
                                             0, 1, 0, *([0] * 7)))
    assert rig.flags(request) == p.BufferFlag.ERR
    drain = rig.send(p.HDR.pack(p.Cmd.STREAM_DRAIN, SID))
    assert p.HDR.unpack_from(drain.reply)[0] == p.Resp.ERR_INVALID_OPERATION
    answer = rig.command(p.Cmd.STREAM_DESTROY)
    assert p.HDR.unpack_from(answer.reply)[0] == p.Resp.OK_NODATA
    assert rig.session.closed


def test_events_waiting_for_buffers_are_bounded_and_not_repeated():
    """Issue 15: 200,000 drains on a stream with no pictures, no event
    buffer posted, grew QEMU by 14 MB of queued events."""
    from pyemb.video.device import MAX_PENDING_EVENTS

    dev = VideoDevice(FakeHandle(ram_size=PAGE), {}, backend_class=HeldBackend)
    for _ in range(1000):
        dev.send_event(p.EventType.ERROR, 1)
    assert list(dev.events.pending) == [p.EVENT.pack(p.EventType.ERROR, 1)]
    for sid in range(10_000):
        dev.send_event(p.EventType.DECODER_RESOLUTION_CHANGED, sid)
    assert len(dev.events.pending) == MAX_PENDING_EVENTS
    assert dev.events.pending[-1] == p.EVENT.pack(p.EventType.DECODER_RESOLUTION_CHANGED, 9_999)
    dev.close()


class FlushHeldSession(HeldSession):
    """Its flush held at the decode gate; a closed one fails as PyAV's does."""

    def flush(self) -> list[Picture]:
        self.decode_gate.passing()
        if self.closed:
            raise AttributeError("'NoneType' object has no attribute 'flush_buffers'")
        return []


class TwoFormatBackend(HeldBackend):
    def coded_formats(self) -> list[p.Format]:
        return [p.Format.H264, p.Format.VP8]

    def open_session(self, fmt: p.Format) -> DecodeSession:
        session = FlushHeldSession()
        HeldBackend.sessions.append(session)
        return session


def test_a_new_coded_format_does_not_close_the_session_the_worker_uses():
    """SET_PARAMS(INPUT) may name another coded format until the first input,
    and a drain may come before any input: the main loop closed the old
    session while the worker flushed it (AttributeError in the worker, the
    stream failed; found by the protocol fuzzer).  The worker closes it once
    it is done with it."""
    handle = FakeHandle(ram_size=PAGE)
    dev = VideoDevice(handle, {}, backend_class=TwoFormatBackend)
    errors: list[tuple[str, BaseException]] = []
    dev.report = lambda e, what: errors.append((what, e))      # type: ignore

    def send(command: bytes) -> FakeRequest:
        request = handle.request([command], [128])
        handle.call(dev, p.COMMAND_QUEUE, request)
        return request

    try:
        send(p.STREAM_CREATE.pack(p.Cmd.STREAM_CREATE, SID, p.MemType.GUEST_PAGES,
                                  p.MemType.GUEST_PAGES, p.Format.H264, 0, b"two"))
        old = HeldBackend.sessions[-1]
        old.decode_gate.arm()
        drain = send(p.HDR.pack(p.Cmd.STREAM_DRAIN, SID))
        old.decode_gate.wait_reached()                  # the worker is in old.flush()
        reply = send(p.QUEUE_CMD.pack(p.Cmd.GET_PARAMS_EXT, SID, p.QueueType.INPUT)).reply
        params = p.Params.unpack(reply, p.HDR.size, True)
        params.format = p.Format.VP8
        answer = send(p.HDR.pack(p.Cmd.SET_PARAMS_EXT, SID) + params.pack_ext())
        assert p.HDR.unpack_from(answer.reply)[0] == p.Resp.OK_NODATA
        assert not old.closed, "closed under the worker"
        old.decode_gate.open()
        wait_for([drain])
        wait_until(lambda: old.closed, "the worker to close the old session")
        assert dev.streams[SID].session is HeldBackend.sessions[-1] is not old
    finally:
        for session in HeldBackend.sessions:
            session.decode_gate.open()
        handle.reset(dev)
        for stream in list(dev.workers):
            stream.thread.join(5)
    assert not errors, errors


class CorruptBackend(HeldBackend):
    def open_session(self, fmt: p.Format) -> DecodeSession:
        session = HeldSession()
        session.crash = DecodeError("invalid data")
        return session


def test_a_guest_making_stream_after_stream_cannot_flood_the_log(caplog):
    """Each stream says a corrupt input once; a guest that makes stream
    after stream, each with a corrupt input, made a line each without end
    (the protocol fuzzer's log-flood oracle: 64 KiB in 290 000 inputs).
    The device's GuestLog bounds them all: 20 lines, then one a minute."""
    handle = FakeHandle(ram_size=2 * PAGE)
    dev = VideoDevice(handle, {}, backend_class=CorruptBackend)

    def send(command: bytes, reply: int = 128) -> FakeRequest:
        request = handle.request([command], [reply])
        handle.call(dev, p.COMMAND_QUEUE, request)
        return request

    try:
        with caplog.at_level("WARNING", logger="pyemb"):
            for _ in range(60):
                send(p.STREAM_CREATE.pack(p.Cmd.STREAM_CREATE, SID, p.MemType.GUEST_PAGES,
                                          p.MemType.GUEST_PAGES, p.Format.H264, 0, b"bad"))
                send(p.RESOURCE_CREATE.pack(p.Cmd.RESOURCE_CREATE, SID, p.QueueType.INPUT, 0,
                                            p.PlanesLayout.SINGLE_BUFFER, 1, *([0] * 8),
                                            1, *([0] * 7)) + p.MEM_ENTRY.pack(PAGE, PAGE))
                done = send(p.RESOURCE_QUEUE.pack(p.Cmd.RESOURCE_QUEUE, SID, p.QueueType.INPUT,
                                                  0, 0, 1, 4, *([0] * 7)),
                            p.RESOURCE_QUEUE_RESP.size)
                wait_for([done])
                assert p.RESOURCE_QUEUE_RESP.unpack(done.reply)[3] & p.BufferFlag.ERR
                send(p.HDR.pack(p.Cmd.STREAM_DESTROY, SID))
    finally:
        handle.reset(dev)
        for stream in list(dev.workers):
            stream.thread.join(5)
    said = [r for r in caplog.records if "corrupt input" in r.getMessage()]
    assert len(said) == 20


def test_guest_log_says_a_burst_then_one_a_period_and_counts_the_rest(monkeypatch):
    from pyemb import log
    now = [100.0]
    monkeypatch.setattr(log.time, "monotonic", lambda: now[0])
    said: list[str] = []
    monkeypatch.setattr(log, "warning", said.append)
    guest = log.GuestLog(burst=3, period_s=10.0)
    assert [guest.warning(f"w{i}") for i in range(5)] == [True, True, True, False, False]
    now[0] += 9.9
    assert not guest.warning("w5")
    now[0] += 0.1
    assert guest.warning("w6")
    assert said == ["w0", "w1", "w2", "w6 (3 more such warnings of this device left out)"]
