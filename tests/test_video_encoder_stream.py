"""The encoder stream's own logic, with a stand-in engine and guest memory
(tests/fakes.py).  The worker is held at a gate while it reads a picture out
of a guest buffer; the test thread plays QEMU's main loop and must be
answered at once, and no guest buffer may be unmapped under the read."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest

from pyemb.video import protocol as p
from pyemb.video.device import VideoDevice
from pyemb.video.encoder import EncoderState
from pyemb.video_backend import EncoderSettings, EncodeSession, Packet, RawImage, VideoBackend
from tests.fakes import FakeHandle, FakeRequest
from tests.test_video_stream import Gate, wait_for, wait_until

W, H = 16, 16
PICTURE = W * H * 3 // 2
PAGE = 4096
SID = 1


class FirstByteSession(EncodeSession):
    """A packet per picture: the picture's first byte, read from guest memory."""

    def __init__(self, backend: HeldEncoderBackend, settings: EncoderSettings) -> None:
        self.backend, self.settings = backend, settings
        self.closed = False

    def take(self, image: RawImage) -> Any:
        self.backend.read_gate.passing()
        return ctypes.string_at(image.address, 1)

    def encode(self, picture: Any, timestamp: int, keyframe: bool) -> list[Packet]:
        self.backend.encode_gate.passing()
        return [Packet(picture, timestamp, p.BufferFlag.IFRAME if keyframe
                       else p.BufferFlag.PFRAME)]

    def flush(self) -> list[Packet]:
        return []

    def close(self) -> None:
        self.closed = True


class HeldEncoderBackend(VideoBackend):
    read_gate = Gate()
    encode_gate = Gate()
    sessions: list[FirstByteSession] = []

    def coded_formats(self) -> list[p.Format]:
        return []

    def encoded_formats(self) -> list[p.Format]:
        return [p.Format.H264]

    def encoder_profiles(self, fmt: p.Format) -> list[int]:
        return [0x101]

    def open_encoder(self, settings: EncoderSettings) -> EncodeSession:
        session = FirstByteSession(self, settings)
        HeldEncoderBackend.sessions.append(session)
        return session


class EncoderRig:
    def __init__(self) -> None:
        HeldEncoderBackend.read_gate = Gate()
        HeldEncoderBackend.encode_gate = Gate()
        self.handle = FakeHandle(ram_size=8 * PAGE)
        self.dev = VideoDevice(self.handle, {}, backend_class=HeldEncoderBackend,
                               role="encoder")
        self.errors: list[tuple[str, BaseException]] = []
        self.dev.report = lambda e, what: self.errors.append((what, e))     # type: ignore
        self.ok(p.STREAM_CREATE.pack(p.Cmd.STREAM_CREATE, SID, p.MemType.GUEST_PAGES,
                                     p.MemType.GUEST_PAGES, p.Format.H264, 0, b"rig"))
        params = p.Params(p.QueueType.INPUT, p.Format.NV12, W, H, frame_rate=30)
        self.ok(p.HDR.pack(p.Cmd.SET_PARAMS_EXT, SID) + params.pack_ext())
        self.stream = self.dev.streams[SID]
        for rid in range(3):
            self.create(p.QueueType.INPUT, rid, (1 + rid) * PAGE)
        self.create(p.QueueType.OUTPUT, 0, 4 * PAGE)

    def send(self, command: bytes, reply_size: int = 128) -> FakeRequest:
        request = self.handle.request([command], [reply_size])
        self.handle.call(self.dev, p.COMMAND_QUEUE, request)
        return request

    def ok(self, command: bytes) -> bytes:
        request = self.send(command)
        assert request.done and p.HDR.unpack_from(request.reply)[0] < 0x300, request.reply
        return request.reply

    def create(self, queue: int, rid: int, address: int) -> None:
        cmd = p.RESOURCE_CREATE.pack(p.Cmd.RESOURCE_CREATE, SID, queue, rid,
                                     p.PlanesLayout.SINGLE_BUFFER, 1, *([0] * 8), 1,
                                     *([0] * 7))
        self.ok(cmd + p.MEM_ENTRY.pack(address, PAGE))

    def queue(self, queue: int, rid: int, timestamp: int = 0) -> FakeRequest:
        cmd = p.RESOURCE_QUEUE.pack(p.Cmd.RESOURCE_QUEUE, SID, queue, rid, timestamp, 1,
                                    PICTURE, *([0] * 7))
        request = self.send(cmd, p.RESOURCE_QUEUE_RESP.size)
        assert not request.done or queue == p.QueueType.INPUT, request.reply
        return request

    @staticmethod
    def reply(request: FakeRequest) -> tuple[int, int, int, int, int]:
        return p.RESOURCE_QUEUE_RESP.unpack(request.reply)

    def close(self) -> None:
        HeldEncoderBackend.read_gate.open()
        HeldEncoderBackend.encode_gate.open()
        self.handle.reset(self.dev)
        for stream in list(self.dev.workers):
            stream.thread.join(5)


@pytest.fixture
def rig():
    r = EncoderRig()
    try:
        yield r
    finally:
        r.close()
    assert not r.errors, r.errors
    assert r.handle.kept_views == 0, "a mapping was released while a read used it"


def test_a_picture_is_read_then_handed_back_then_encoded(rig):
    rig.handle.ram[1 * PAGE] = 42
    out = rig.queue(p.QueueType.OUTPUT, 0)
    picture = rig.queue(p.QueueType.INPUT, 0, timestamp=7)
    wait_for([picture, out])
    assert rig.reply(picture)[3] == 0
    status, _, timestamp, flags, size = rig.reply(out)
    assert (timestamp, flags, size) == (7, p.BufferFlag.PFRAME, 1)
    assert bytes(rig.handle.ram[4 * PAGE:4 * PAGE + 1]) == b"\x2a"


def test_clear_while_reading_answers_at_once_and_a_recreated_buffer_is_unmapped_after(rig):
    gate = HeldEncoderBackend.read_gate
    gate.arm()
    picture = rig.queue(p.QueueType.INPUT, 0, timestamp=3)
    gate.wait_reached()
    mappings = len(rig.handle.mappings)
    # STREAMOFF on the V4L2 OUTPUT queue: the picture being read is handed
    # back with ERR at once, and the answer does not wait for the read.
    rig.ok(p.QUEUE_CMD.pack(p.Cmd.QUEUE_CLEAR, SID, p.QueueType.INPUT))
    assert picture.done and rig.reply(picture)[3] == p.BufferFlag.ERR
    # REQBUFS again: the same resource id over new memory; the old mapping
    # stays until the read ends.
    rig.create(p.QueueType.INPUT, 0, 5 * PAGE)
    assert len(rig.handle.mappings) == mappings + 1
    gate.open()
    wait_until(lambda: len(rig.handle.mappings) == mappings, "the old mapping's release")
    assert rig.stream.reading is None


def test_destroy_while_reading_unmaps_after_the_read_and_the_worker_ends(rig):
    gate = HeldEncoderBackend.read_gate
    gate.arm()
    picture = rig.queue(p.QueueType.INPUT, 1)
    gate.wait_reached()
    rig.ok(p.HDR.pack(p.Cmd.STREAM_DESTROY, SID))
    assert picture.done and rig.reply(picture)[3] == p.BufferFlag.ERR
    assert len(rig.handle.mappings) == 1            # the one being read
    gate.open()
    rig.stream.thread.join(5)
    assert not rig.stream.thread.is_alive()
    assert not rig.handle.mappings
    assert HeldEncoderBackend.sessions[-1].closed


def test_reset_while_reading_completes_nothing(rig):
    gate = HeldEncoderBackend.read_gate
    gate.arm()
    out = rig.queue(p.QueueType.OUTPUT, 0)
    rig.queue(p.QueueType.INPUT, 2)
    gate.wait_reached()
    stream = rig.stream
    rig.handle.reset(rig.dev)
    assert stream.state is EncoderState.ABANDONED
    gate.open()
    stream.thread.join(5)
    assert not stream.thread.is_alive()
    assert out.cancelled and out.late == 0


@pytest.mark.parametrize("command", ["QUEUE_CLEAR", "STREAM_DESTROY"])
def test_an_engine_call_that_hangs_holds_no_command(rig, command):
    """Issue 15: a hook that never returns must not hold the stream.  The
    picture's buffer goes back before the encode, and the clear or destroy
    is answered at once while the encoder is stuck."""
    gate = HeldEncoderBackend.encode_gate
    gate.arm()
    picture = rig.queue(p.QueueType.INPUT, 0, timestamp=5)
    gate.wait_reached()
    wait_for([picture])                             # back before the encode
    assert rig.reply(picture)[3] == 0
    kind = getattr(p.Cmd, command)
    body = (p.HDR.pack(kind, SID) if kind == p.Cmd.STREAM_DESTROY
            else p.QUEUE_CMD.pack(kind, SID, p.QueueType.INPUT))
    answer = rig.send(body)
    assert answer.done and p.HDR.unpack_from(answer.reply)[0] == p.Resp.OK_NODATA
    gate.open()
