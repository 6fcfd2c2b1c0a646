"""One stateful-decoder stream: its resources, queues, state and worker thread.

The device model (:mod:`pyemb.video.device`) answers synchronous commands on
QEMU's main loop (BQL held) under the stream's lock.  The worker thread
decodes and writes pictures into guest buffers without that lock, taking it
only for short bookkeeping, so that no main-loop command ever waits on
FFmpeg or on a picture conversion.  RESOURCE_QUEUE and STREAM_DRAIN are
completed from the worker.

State machine (``StreamState``; every change goes through ``_to``)::

    AWAITING_HEADERS  -> RESOLUTION_CHANGE   worker: the size is known
    RESOLUTION_CHANGE -> DECODING            main loop: the driver set the OUTPUT queue up
    DECODING          -> RESOLUTION_CHANGE   worker: a picture of another size
    any of those      -> FAILED              worker: an engine bug killed it
    any but ABANDONED -> DESTROYED           STREAM_DESTROY
    any               -> ABANDONED           device reset

Pictures go out in decode-output order and only in DECODING; in
RESOLUTION_CHANGE the worker has updated the OUTPUT params and sent
DECODER_RESOLUTION_CHANGED, and pictures wait until the driver has set the
OUTPUT queue up for them (``output_set_up``).
STREAM_DRAIN and QUEUE_CLEAR(INPUT) are not states: they act in order with
the bitstream, so they are entries of the input queue (``DRAIN``: flush the
decoder, then an ``EOS`` entry in the picture queue returns an empty EOS
buffer and completes the drain; ``RESET``: forget what the decoder was fed).

Work in flight: the input being decoded (``decoding``) and the picture being
written with the output buffer it pins (``writing``).  QUEUE_CLEAR(INPUT) and
STREAM_DESTROY complete the input being decoded with ERR at once (its bytes
were copied out before decoding) and take it away, which tells the worker to
drop what it decoded from it.  A command that takes back the output buffer
being written (QUEUE_CLEAR(OUTPUT), RESOURCE_DESTROY_ALL, STREAM_DESTROY)
cancels the write: the worker completes the buffer with ERR once the write
ends and unmaps it if it was destroyed meanwhile; the command's answer is
then sent by the worker, after that buffer (``answer_later``).  A device
reset drops everything: the worker completes nothing and sends no event for
a stream of before the reset, and ends by itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from pyemb.device import Request
from pyemb.video import protocol as p
from pyemb.video.resources import Resource
from pyemb.video.stream import OutputBuffer, StreamWorker, buffer_done
from pyemb.video_backend import (
    DEFAULT_SIZE,
    INPUT_BUFFER_SIZE,
    DecodeError,
    DecodeSession,
    Picture,
    align,
)

# The CAPTURE buffers a client must have: one.  The engine keeps its own
# reference pictures, so none is held back as a reference; and the ChromeOS
# driver makes this vb2's count of buffers queued before streaming starts, so
# a larger value stalls a client that queues fewer (v4l2-compliance queues one).
OUTPUT_MIN_BUFFERS = 1
MAX_BUFFERS = 32


def plane_formats(fmt: int, width: int, height: int) -> list[tuple[int, int]]:
    """(plane_size, stride) of each plane for a coded size."""
    if fmt == p.Format.NV12:
        return [(width * height, width), (width * (height // 2), width)]
    cw = width // 2
    return [(width * height, width), (cw * (height // 2), cw), (cw * (height // 2), cw)]


def guest_or_minimum(asked: list[tuple[int, int]],
                     minimum: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (plane_size, stride) list a driver asked for where every plane is
    at least as large as the minimum layout's, else the minimum."""
    if len(asked) == len(minimum) and all(
            size >= msize and stride >= mstride
            for (size, stride), (msize, mstride) in zip(asked, minimum, strict=True)):
        return list(asked)
    return minimum


class StreamState(Enum):
    AWAITING_HEADERS = "awaiting-headers"      # no size known: nothing to write yet
    RESOLUTION_CHANGE = "resolution-change"    # event sent, the driver has not read the params
    DECODING = "decoding"                      # pictures go into output buffers
    FAILED = "failed"                          # the worker died; commands are still answered
    DESTROYED = "destroyed"                    # the worker ends a write in flight, then itself
    ABANDONED = "abandoned"                    # device reset: nothing completes any more


S = StreamState
TRANSITIONS: dict[StreamState, frozenset[StreamState]] = {
    S.AWAITING_HEADERS: frozenset({S.RESOLUTION_CHANGE, S.FAILED, S.DESTROYED, S.ABANDONED}),
    S.RESOLUTION_CHANGE: frozenset({S.DECODING, S.FAILED, S.DESTROYED, S.ABANDONED}),
    S.DECODING: frozenset({S.RESOLUTION_CHANGE, S.FAILED, S.DESTROYED, S.ABANDONED}),
    S.FAILED: frozenset({S.DESTROYED, S.ABANDONED}),
    S.DESTROYED: frozenset({S.ABANDONED}),
    S.ABANDONED: frozenset(),
}
LIVE = frozenset({S.AWAITING_HEADERS, S.RESOLUTION_CHANGE, S.DECODING})


class Marker(Enum):
    DRAIN = "drain"      # input queue: flush the decoder here (STREAM_DRAIN)
    RESET = "reset"      # input queue: reset the decoder here (QUEUE_CLEAR(INPUT))
    EOS = "eos"          # picture queue: an empty EOS buffer, then the drain's answer


@dataclass(eq=False, slots=True)
class InputJob:
    request: Request
    resource: Resource
    length: int
    timestamp: int


@dataclass(eq=False, slots=True)
class Write:
    """A picture being written outside the stream's lock, and the output
    buffer it pins, with what the OUTPUT params said when it was taken."""

    picture: Picture
    out: OutputBuffer
    fmt: int
    plane_formats: list[tuple[int, int]]
    layout: list[tuple[int, int]]
    size: int
    cancelled: bool = False      # its queue was cleared: ERR once written
    release: bool = False        # its resource was destroyed: unmap once written
    stale: bool = False          # QUEUE_CLEAR(INPUT) since: the picture is not kept


class DecoderStream(StreamWorker):
    role = "decoding"
    kind = "decoder"

    def __init__(self, stream_id: int, coded_format: int, in_mem: int, out_mem: int,
                 session: DecodeSession, send_event: Callable[[int, int], None],
                 report: Callable[[BaseException, str], None],
                 completion_batch: Callable[[], AbstractContextManager[Any]]) -> None:
        super().__init__(stream_id, send_event, report, completion_batch)
        self.session = session
        self.retired: list[DecodeSession] = []      # replaced; the worker closes them
        self.params = {
            p.QueueType.INPUT: p.Params(p.QueueType.INPUT, coded_format, min_buffers=1,
                                        max_buffers=MAX_BUFFERS,
                                        plane_formats=[(INPUT_BUFFER_SIZE, 0)],
                                        resource_type=in_mem),
            p.QueueType.OUTPUT: p.Params(p.QueueType.OUTPUT, p.Format.NV12,
                                         min_buffers=OUTPUT_MIN_BUFFERS,
                                         max_buffers=MAX_BUFFERS, resource_type=out_mem),
        }
        self.resources: dict[int, dict[int, Resource]] = {
            p.QueueType.INPUT: {}, p.QueueType.OUTPUT: {}}
        self.state = StreamState.AWAITING_HEADERS
        self.fed = False                # an input was queued: the coded format is set
        self.inputs: deque[InputJob | Marker] = deque()
        self.outputs: deque[OutputBuffer] = deque()
        self.pictures: deque[Picture | Marker] = deque()
        self.decoding: InputJob | Marker | None = None    # taken away to cancel it
        self.writing: Write | None = None
        self.geometry: tuple[int, int] | None = None    # visible size being output
        self._layout_of: list[tuple[int, int]] | None = None    # see _output_layout
        self._layout_cache: tuple[list[tuple[int, int]], int] = ([], 0)
        self.coded_size_hint(*DEFAULT_SIZE)
        self.start_worker(f"pyemb-video-stream{stream_id}", f"pyemb-video-{stream_id}")

    def _to(self, state: StreamState) -> None:
        """The one place the state changes; refuses what the table does not allow."""
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"virtio-video stream {self.id}: {self.state.value} -> "
                               f"{state.value} is not a transition")
        self.state = state

    def _event(self, event_type: int) -> None:
        # Under the lock, so that no reset or destroy comes between the check
        # and the event.
        if self.state in LIVE:
            self.send_event(event_type, self.id)

    # -- called on QEMU's main loop, under self.lock -------------------------------
    def queue_input(self, request: Request, resource: Resource, length: int,
                    timestamp: int) -> None:
        if self.state is StreamState.FAILED:
            buffer_done(request, resource, timestamp, p.BufferFlag.ERR)
            return
        resource.queued = True
        self.fed = True
        self.inputs.append(InputJob(request, resource, length, timestamp))
        self.lock.notify()

    def queue_output(self, request: Request, resource: Resource) -> None:
        if self.state is StreamState.FAILED:
            buffer_done(request, resource, 0, p.BufferFlag.ERR)
            return
        resource.queued = True
        self.outputs.append(OutputBuffer(request, resource))
        if not resource.older_geometry:
            self.output_set_up()        # a buffer made for the new geometry
        self.lock.notify()

    def coded_format_open(self) -> bool:
        """Whether SET_PARAMS(INPUT) may still name another coded format:
        until the first input.  The ChromeOS driver creates its stream at
        open() with the first format it found and names the real one at
        S_FMT(OUTPUT)."""
        return not self.fed and self.state is StreamState.AWAITING_HEADERS

    def replace_session(self, session: DecodeSession, coded_format: int) -> None:
        """Decode ``coded_format`` with ``session`` from now on (see
        coded_format_open).  The worker may be flushing or resetting the
        old session (a drain or a clear needs no input): it closes it
        between two steps."""
        if not self.coded_format_open():
            raise RuntimeError("the coded format is fixed once decoding started")
        self.retired.append(self.session)
        self.session = session
        self.params[p.QueueType.INPUT].format = coded_format
        self.lock.notify()

    def coded_size_hint(self, width: int, height: int) -> None:
        """The size a client expects (SET_PARAMS(INPUT), from S_FMT on the
        V4L2 OUTPUT queue): both queues report it, and the OUTPUT params a
        layout for it, until the stream's headers give the real size (the
        stateful decoder interface's "derived CAPTURE format")."""
        if self.geometry is not None:
            return
        coded = self.params[p.QueueType.INPUT]
        coded.frame_width, coded.frame_height = width, height
        out = self.params[p.QueueType.OUTPUT]
        out.frame_width, out.frame_height = align(width), align(height)
        out.crop = (0, 0, width, height)
        out.plane_formats = plane_formats(out.format, out.frame_width, out.frame_height)

    def start_drain(self, request: Request) -> None:
        self.drain = request
        if self.state is StreamState.FAILED:
            self._end_drain(p.Resp.ERR_INVALID_OPERATION)
            return
        self.inputs.append(Marker.DRAIN)
        self.lock.notify()

    def output_set_up(self) -> None:
        """The driver has set the OUTPUT queue up for the new geometry:
        pictures of that size may go out.  Said by SET_PARAMS(OUTPUT) (the
        ChromeOS driver sends it at S_FMT and REQBUFS on CAPTURE) and by
        queueing a buffer created since the change (crosvm's rule).
        Reading the params is not enough: the ChromeOS driver reads them as
        soon as the event arrives, before its client has taken the pictures
        of the old size and given its old buffers back."""
        if self.state is StreamState.RESOLUTION_CHANGE:
            self._to(StreamState.DECODING)
            self.lock.notify()

    def clear(self, queue_type: int) -> None:
        """QUEUE_CLEAR: the queue's buffers come back with ERR, the input
        being decoded too; a buffer being written is cancelled (see
        answer_later)."""
        if queue_type == p.QueueType.INPUT:
            for job in self.inputs:
                if type(job) is InputJob:
                    buffer_done(job.request, job.resource, job.timestamp, p.BufferFlag.ERR)
            self.inputs.clear()
            job = self.decoding
            if type(job) is InputJob:
                buffer_done(job.request, job.resource, job.timestamp, p.BufferFlag.ERR)
            self.decoding = None            # the worker drops what it decodes from it
            self.pictures.clear()           # a seek: what was decoded is stale
            if self.writing is not None:
                self.writing.stale = True
            self._end_drain(p.Resp.OK_NODATA)
            if self.state in LIVE:
                self.inputs.append(Marker.RESET)
                self.lock.notify()
        else:
            for out in self.outputs:
                buffer_done(out.request, out.resource, 0, p.BufferFlag.ERR)
            self.outputs.clear()
            if self.writing is not None:
                self.writing.cancelled = True

    def destroy_resources(self, queue_type: int) -> None:
        """RESOURCE_DESTROY_ALL: clear the queue, then unmap its resources
        (the one being written once its write ends)."""
        self.clear(queue_type)
        self._release(self.resources[queue_type])

    def destroy(self) -> None:
        """STREAM_DESTROY: everything pending comes back with ERR; the worker
        ends after the write in flight, if any."""
        for queue_type in (p.QueueType.INPUT, p.QueueType.OUTPUT):
            self.destroy_resources(queue_type)
        self._to(StreamState.DESTROYED)
        self.lock.notify()

    def abandon(self) -> None:
        """Device reset: QEMU drops every held request; let go of everything
        and complete nothing.  The worker ends by itself."""
        if self.state is StreamState.ABANDONED:
            return
        self._to(StreamState.ABANDONED)
        self.inputs.clear()
        self.outputs.clear()
        self.pictures.clear()
        self.drain = None
        self.decoding = None
        self.deferred.clear()
        for resources in self.resources.values():
            self._release(resources)
        self.lock.notify()

    def answer_later(self, request: Request, data: bytes) -> bool:
        """For QUEUE_CLEAR, RESOURCE_DESTROY_ALL and STREAM_DESTROY, after they
        took their buffers back: True if the answer is left to the worker,
        because a buffer is still being written (it completes with ERR
        first) or the worker has completions that are not on the used ring
        yet (an answer pushed now would overtake them)."""
        if (self.writing is None and not self.unpushed) or self.state is StreamState.FAILED:
            return False
        self.deferred.append((request, data))
        self.lock.notify()
        return True

    def _in_flight(self) -> tuple[Resource, Write] | None:
        write = self.writing
        return (write.out.resource, write) if write is not None else None

    # -- the worker thread -------------------------------------------------------------
    @property
    def abandoned(self) -> bool:
        return self.state is StreamState.ABANDONED

    def _close_engine(self) -> None:
        self._close_retired()
        self.session.close()

    def _close_retired(self) -> None:
        while self.retired:
            self.retired.pop().close()

    def _next(self) -> tuple[bool, InputJob | Marker | None]:
        """Wait for work: (False, None) when the worker is to end, else the
        input queue's next entry (None: pictures or answers only)."""
        with self.lock:
            self.unpushed = False       # the last step's batch is on the used ring
            while True:
                self._close_retired()   # between steps: no engine call uses them
                state = self.state
                if state is StreamState.ABANDONED:
                    return False, None
                if self.deferred:
                    return True, None
                if state is StreamState.DESTROYED:
                    return False, None
                if self.inputs:
                    entry = self.inputs.popleft()
                    if entry is not Marker.RESET:
                        self.decoding = entry
                    return True, entry
                if self._can_deliver():
                    return True, None
                self.lock.wait()

    def _can_deliver(self) -> bool:
        """Whether _take_picture would make progress (so the worker never spins)."""
        if not self.pictures:
            return False
        pic = self.pictures[0]
        if pic is Marker.EOS:
            return self.state is StreamState.AWAITING_HEADERS or bool(self.outputs)
        if self.state is StreamState.RESOLUTION_CHANGE:
            return False
        if (pic.width, pic.height) != self.geometry:
            return True
        needed = self._bytes_needed()
        return any(out.resource.size >= needed for out in self.outputs)

    def _step(self, entry: InputJob | Marker | None) -> None:
        pictures: list[Picture] = []
        failed = False
        if type(entry) is InputJob:
            try:
                pictures = self.session.decode(entry.resource.read(entry.length),
                                               entry.timestamp)
            except DecodeError as e:
                self.warn("corrupt", f"corrupt input: {e}")
                failed = True
            except ValueError:          # the resource was destroyed under us
                failed = True
        elif entry is Marker.DRAIN:
            try:
                pictures = self.session.flush()
            except DecodeError as e:
                self.warn("corrupt", f"corrupt input at drain: {e}")
        elif entry is Marker.RESET:
            self.session.reset()
        lock = self.lock
        lock.acquire()
        try:
            if entry is not None and entry is not Marker.RESET:
                self._decoded(entry, pictures, failed)
            while (write := self._take_picture()) is not None:
                lock.release()
                try:
                    error = self._write(write)
                finally:
                    lock.acquire()
                self._written(write, error)
            if self.deferred:
                self._answer_deferred()
        finally:
            lock.release()

    def _decoded(self, entry: InputJob | Marker, pictures: list[Picture],
                 failed: bool) -> None:
        """Under the lock: keep what ``entry`` gave, unless it was taken
        away meanwhile (a clear, a destroy, a reset)."""
        if self.decoding is not entry:
            return
        self.decoding = None
        if pictures:
            self.pictures.extend(pictures)
        if self.state is StreamState.AWAITING_HEADERS and not self.pictures:
            size = self.session.size
            if size is not None:
                # Headers seen, no picture out yet (a reordering decoder
                # holds the first ones back): announce the size now.
                self._change_resolution(*size)
        if entry is Marker.DRAIN:
            self.pictures.append(Marker.EOS)
        elif type(entry) is InputJob:
            # Its bytes are in the decoder: hand the buffer back.
            self.unpushed = True
            buffer_done(entry.request, entry.resource, entry.timestamp,
                        p.BufferFlag.ERR if failed else 0)

    def _take_picture(self) -> Write | None:
        """Under the lock: the next picture to write and the buffer for it,
        pinned (``self.writing``) until _written.  Sends the resolution
        event and the EOS buffer on the way."""
        pictures = self.pictures
        while pictures:
            pic = pictures[0]
            state = self.state
            if pic is Marker.EOS:
                if state is StreamState.AWAITING_HEADERS:
                    # Drained without ever finding a picture: nothing to decode here.
                    pictures.popleft()
                    self._event(p.EventType.ERROR)
                    self.unpushed = True
                    self._end_drain(p.Resp.ERR_INVALID_OPERATION)
                    continue
                if not self.outputs or state not in LIVE:
                    return None
                out = self.outputs.popleft()
                pictures.popleft()
                self.unpushed = True
                buffer_done(out.request, out.resource, 0, p.BufferFlag.EOS)
                self._end_drain(p.Resp.OK_NODATA)
                continue
            if state is not StreamState.DECODING:
                if state is StreamState.AWAITING_HEADERS:
                    self._change_resolution(pic.width, pic.height)
                return None
            if (pic.width, pic.height) != self.geometry:
                self._change_resolution(pic.width, pic.height)
                return None
            layout, needed = self._output_layout()
            out = self._take_output(needed)
            if out is None:
                return None
            pictures.popleft()
            params = self.params[p.QueueType.OUTPUT]
            write = self.writing = Write(pic, out, params.format, params.plane_formats,
                                         layout, needed)
            return write
        return None

    def _write(self, write: Write) -> str | None:
        """Without the lock: lay the picture out at the params' strides and
        plane offsets, straight into guest memory when the buffer is one
        chunk.  Returns why the buffer cannot take the picture, or None."""
        resource = write.out.resource
        layout, needed = write.layout, write.size
        try:
            if len(resource.plane_offsets) == len(layout) and resource.planes_layout == 2:
                layout = [(off, stride) for off, (_, stride)
                          in zip(resource.plane_offsets, layout, strict=True)]
                needed = max(off + size for off, (size, _)
                             in zip(resource.plane_offsets, write.plane_formats, strict=True))
                if needed > resource.size:
                    raise ValueError(f"plane offsets {resource.plane_offsets} reach past "
                                     f"its {resource.size} bytes")
            view = resource.contiguous_view()
            if view is not None:
                write.picture.write_into(write.fmt, np.frombuffer(view, np.uint8), layout)
            else:
                image = np.zeros(needed, np.uint8)
                write.picture.write_into(write.fmt, image, layout)
                resource.write(image)
        except ValueError as e:         # plane offsets the picture does not fit
            return str(e)
        write.size = needed
        return None

    def _written(self, write: Write, error: str | None) -> None:
        """Under the lock: complete the buffer a write pinned, as the
        commands that came meanwhile decided."""
        self.writing = None
        out, pic = write.out, write.picture
        if self.state is not StreamState.ABANDONED:
            self.unpushed = True
            if write.cancelled or error is not None:
                if error is not None and not write.cancelled:
                    self.warn("output", f"output resource {out.resource.resource_id}: {error}")
                buffer_done(out.request, out.resource, 0, p.BufferFlag.ERR)
                if not write.stale and self.state in LIVE:
                    self.pictures.appendleft(pic)   # it waits for the next buffer
            else:
                buffer_done(out.request, out.resource, pic.timestamp, pic.flags, write.size)
            if self.deferred:
                self._answer_deferred()
        if write.release:
            out.resource.release()

    def _fail(self) -> None:
        """Under the lock, after an exception killed the worker: nothing it
        held is left hanging."""
        write, self.writing = self.writing, None
        if self.state is not StreamState.ABANDONED:
            if write is not None:
                buffer_done(write.out.request, write.out.resource, 0, p.BufferFlag.ERR)
            if self.state in LIVE:
                self._event(p.EventType.ERROR)
                self._to(StreamState.FAILED)
                for queue_type in (p.QueueType.INPUT, p.QueueType.OUTPUT):
                    self.clear(queue_type)
            self._answer_deferred()
        if write is not None and write.release:
            write.out.resource.release()
        self.unpushed = False

    def _change_resolution(self, width: int, height: int) -> None:
        out = self.params[p.QueueType.OUTPUT]
        coded_w, coded_h = align(width), align(height)
        out.frame_width, out.frame_height = coded_w, coded_h
        out.crop = (0, 0, width, height)
        out.plane_formats = plane_formats(out.format, coded_w, coded_h)
        self.geometry = (width, height)
        for resource in self.resources[p.QueueType.OUTPUT].values():
            resource.older_geometry = True
        self._to(StreamState.RESOLUTION_CHANGE)
        self._event(p.EventType.DECODER_RESOLUTION_CHANGED)

    def _output_layout(self) -> tuple[list[tuple[int, int]], int]:
        """(offset, stride) of each plane of the OUTPUT params, and the bytes
        they take.  Asked for every picture; recomputed only when the
        params' plane_formats list is replaced (it is never changed in
        place)."""
        plane_formats = self.params[p.QueueType.OUTPUT].plane_formats
        if self._layout_of is not plane_formats:
            offset, layout = 0, []
            for size, stride in plane_formats:
                layout.append((offset, stride))
                offset += size
            self._layout_cache = (layout, offset)
            self._layout_of = plane_formats
        return self._layout_cache

    def _bytes_needed(self) -> int:
        return self._output_layout()[1]

    def _take_output(self, needed: int) -> OutputBuffer | None:
        """The most recently queued buffer that is big enough.  Newest first
        (completions may come out of order): the buffers the driver has just
        handed back are the ones still in the CPU's caches, so a picture is
        written into warm memory, and a stream works over as few buffers as
        it needs instead of cycling through every one the guest queued
        (24 rotating 720p buffers are as big as this machine's L3 cache)."""
        for i in range(len(self.outputs) - 1, -1, -1):
            out = self.outputs[i]
            if out.resource.size >= needed:
                del self.outputs[i]
                return out
        return None
