"""The decoder stream's own logic, with a stand-in engine and guest memory."""

from __future__ import annotations

import contextlib
import time

import numpy as np

from pyemb.video import protocol as p
from pyemb.video.decoder import DecoderStream
from pyemb.video.resources import Resource
from pyemb.video_backend import DecodeSession, Picture
from tests.fakes import FakeChunk, FakeRequest

SIZE = 16


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


def wait_for(requests: list[FakeRequest], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(r.done for r in requests):
        assert time.monotonic() < deadline, "the worker did not complete the requests"
        time.sleep(0.001)


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
                stream.params_read(p.QueueType.OUTPUT)   # the driver follows the event
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
