"""One stateful-decoder stream: its resources, queues and worker thread.

The device model (:mod:`pyemb.video.device`) answers synchronous commands on
QEMU's main loop under the stream's lock, which is never held while decoding.
Decoding, and writing pictures into guest buffers, happen on the stream's
worker thread; RESOURCE_QUEUE and STREAM_DRAIN are completed from there.

Pictures go out in decode-output (display) order.  When the picture at the
head of the line has a new size, the worker updates the OUTPUT params, sends
DECODER_RESOLUTION_CHANGED and waits until the driver has read the OUTPUT
params again before it writes pictures of the new size.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyemb import log
from pyemb.device import Request, write_all
from pyemb.threadname import set_native_name
from pyemb.video import protocol as p
from pyemb.video.resources import Resource
from pyemb.video_backend import DecodeError, DecodeSession, Picture

INPUT_BUFFER_SIZE = 1 << 20          # default sizeimage of bitstream buffers
OUTPUT_MIN_BUFFERS = 8               # reference frames + reorder depth, with slack
MAX_BUFFERS = 32
ALIGN = 16                           # coded size: macroblock alignment


def align(v: int, a: int = ALIGN) -> int:
    return (v + a - 1) // a * a


def plane_formats(fmt: int, width: int, height: int) -> list[tuple[int, int]]:
    """(plane_size, stride) of each plane for a coded size."""
    if fmt == p.Format.NV12:
        return [(width * height, width), (width * (height // 2), width)]
    cw = width // 2
    return [(width * height, width), (cw * (height // 2), cw), (cw * (height // 2), cw)]


@dataclass
class InputJob:
    request: Request
    resource: Resource
    length: int
    timestamp: int


@dataclass
class OutputBuffer:
    request: Request
    resource: Resource


def reply(request: Request, data: bytes) -> None:
    if not request.done:
        request.complete(write_all(request, data))


def buffer_done(request: Request, resource: Resource, timestamp: int, flags: int,
                size: int = 0) -> None:
    resource.queued = False
    reply(request, p.resource_queue_reply(timestamp, flags, size))


class DecoderStream:
    def __init__(self, stream_id: int, coded_format: int, in_mem: int, out_mem: int,
                 session: DecodeSession, send_event: Callable[[int, int], None],
                 report: Callable[[BaseException, str], None],
                 completion_batch: Callable[[], AbstractContextManager[Any]]) -> None:
        self.id = stream_id
        self.session = session
        self.send_event = send_event
        self.report = report
        self.completion_batch = completion_batch
        self.lock = threading.Condition()
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
        self.inputs: deque[InputJob] = deque()
        self.outputs: deque[OutputBuffer] = deque()
        self.pictures: deque[Picture] = deque()
        self.drain: Request | None = None
        self.flush_pending = False          # the worker must flush the decoder
        self.eos_pending = False            # then return an empty EOS buffer
        self.reset_pending = False          # the worker must reset the session
        self.epoch = 0                      # bumped when queued work is thrown away
        self.geometry: tuple[int, int] | None = None    # visible size being output
        self.awaiting_params = False        # resolution changed, driver not caught up
        self.stopped = False
        self._layout_of: list[tuple[int, int]] | None = None    # see _output_layout
        self._layout_cache: tuple[list[tuple[int, int]], int] = ([], 0)
        self.thread = threading.Thread(target=self._run, name=f"pyemb-video-stream{stream_id}",
                                       daemon=True)
        self.thread.start()

    # -- called on QEMU's main loop, under self.lock -------------------------------
    def queue_input(self, request: Request, resource: Resource, length: int,
                    timestamp: int) -> None:
        resource.queued = True
        self.inputs.append(InputJob(request, resource, length, timestamp))
        self.lock.notify()

    def queue_output(self, request: Request, resource: Resource) -> None:
        resource.queued = True
        self.outputs.append(OutputBuffer(request, resource))
        self.lock.notify()

    def start_drain(self, request: Request) -> None:
        self.drain = request
        self.flush_pending = True
        self.lock.notify()

    def params_read(self, queue_type: int) -> None:
        """The driver read the OUTPUT params: it knows the new geometry."""
        if queue_type == p.QueueType.OUTPUT and self.awaiting_params:
            self.awaiting_params = False
            self.lock.notify()

    def clear(self, queue_type: int) -> None:
        """QUEUE_CLEAR: pending buffers of the queue come back with ERR."""
        if queue_type == p.QueueType.INPUT:
            for job in self.inputs:
                buffer_done(job.request, job.resource, job.timestamp, p.BufferFlag.ERR)
            self.inputs.clear()
            self.pictures.clear()           # a seek: what was decoded is stale
            self._cancel_drain()
            self.epoch += 1
            self.reset_pending = True
            self.lock.notify()
        else:
            for out in self.outputs:
                buffer_done(out.request, out.resource, 0, p.BufferFlag.ERR)
            self.outputs.clear()

    def destroy_resources(self, queue_type: int) -> None:
        """RESOURCE_DESTROY_ALL: clear the queue, then unmap its resources."""
        self.clear(queue_type)
        for res in self.resources[queue_type].values():
            res.release()
        self.resources[queue_type].clear()

    def destroy(self) -> None:
        """STREAM_DESTROY: everything pending comes back with ERR."""
        for queue_type in (p.QueueType.INPUT, p.QueueType.OUTPUT):
            self.destroy_resources(queue_type)
        self.stopped = True
        self.lock.notify()

    def abandon(self) -> None:
        """Device reset: QEMU drops every held request; just let go."""
        self.inputs.clear()
        self.outputs.clear()
        self.pictures.clear()
        self.drain = None
        for resources in self.resources.values():
            for res in resources.values():
                res.release()
            resources.clear()
        self.stopped = True
        self.lock.notify()

    def _cancel_drain(self) -> None:
        if self.drain is not None:
            reply(self.drain, p.reply(p.Resp.OK_NODATA, self.id))
        self.drain = None
        self.flush_pending = self.eos_pending = False

    # -- the worker thread -------------------------------------------------------------
    def _has_work(self) -> bool:
        if self.stopped or self.reset_pending or self.inputs or self.flush_pending:
            return True
        return self._can_deliver()

    def _can_deliver(self) -> bool:
        """Whether _deliver would make progress (so the worker never spins)."""
        if self.pictures and not self.awaiting_params:
            pic = self.pictures[0]
            if (pic.width, pic.height) != self.geometry:
                return True
            needed = self._bytes_needed()
            if any(out.resource.size >= needed for out in self.outputs):
                return True
        if self.eos_pending and not self.pictures:
            return self.geometry is None or bool(self.outputs)
        return False

    def _run(self) -> None:
        set_native_name(f"pyemb-video-{self.id}")
        try:
            more = True
            while more:
                # A step's completions (pictures, then the input buffer) reach
                # the guest together, pushed from here once the stream's lock
                # is let go: QEMU's main loop is not woken for them.
                with self.completion_batch():
                    more = self._step()
        except Exception as e:  # noqa: BLE001 - a dead worker must be visible
            self.report(e, f"decoding stream {self.id}")
            self.send_event(p.EventType.ERROR, self.id)
        finally:
            self.session.close()

    def _step(self) -> bool:
        with self.lock:
            while not self._has_work():
                self.lock.wait()
            if self.stopped:
                return False
            if self.reset_pending:
                self.reset_pending = False
                self.session.reset()
            epoch = self.epoch
            job = self.inputs.popleft() if self.inputs else None
            flush = job is None and self.flush_pending
            if flush:
                self.flush_pending = False
        pictures: list[Picture] = []
        failed = False
        if job is not None:
            try:
                pictures = self.session.decode(job.resource.read(job.length), job.timestamp)
            except DecodeError as e:
                log.warning(f"virtio-video stream {self.id}: corrupt input: {e}")
                failed = True
            except ValueError:          # the resource was destroyed under us
                failed = True
        elif flush:
            try:
                pictures = self.session.flush()
            except DecodeError as e:
                log.warning(f"virtio-video stream {self.id}: corrupt input at drain: {e}")
        with self.lock:
            if epoch == self.epoch and not self.stopped:
                self.pictures.extend(pictures)
                if flush:
                    self.eos_pending = True
                size = self.session.size
                if self.geometry is None and not self.pictures and size is not None:
                    # Headers seen, no picture out yet (a reordering decoder
                    # holds the first ones back): announce the size now.
                    self._change_resolution(*size)
            self._deliver()
            if job is not None:
                # Its bytes are in the decoder: hand the buffer back, right
                # after the pictures so that QEMU's main loop wakes once for
                # both completions rather than once each.
                buffer_done(job.request, job.resource, job.timestamp,
                            p.BufferFlag.ERR if failed else 0)
        return True

    def _deliver(self) -> None:
        """Write waiting pictures into free output buffers, in order."""
        while self.pictures and not self.awaiting_params:
            pic = self.pictures[0]
            if (pic.width, pic.height) != self.geometry:
                self._change_resolution(pic.width, pic.height)
                return
            out = self._take_output(self._bytes_needed())
            if out is None:
                return
            try:
                size = self._write_picture(pic, out.resource)
            except ValueError as e:     # plane offsets the picture does not fit
                log.warning(f"virtio-video stream {self.id}: output resource "
                            f"{out.resource.resource_id}: {e}")
                buffer_done(out.request, out.resource, 0, p.BufferFlag.ERR)
                continue                # the picture waits for the next buffer
            self.pictures.popleft()
            buffer_done(out.request, out.resource, pic.timestamp, pic.flags, size)
        if self.eos_pending and self.geometry is None:
            # Drained without ever finding a picture: nothing to decode here.
            self.eos_pending = False
            self.send_event(p.EventType.ERROR, self.id)
            if self.drain is not None:
                reply(self.drain, p.reply(p.Resp.ERR_INVALID_OPERATION, self.id))
                self.drain = None
        if self.eos_pending and not self.pictures and self.outputs:
            out = self.outputs.popleft()
            buffer_done(out.request, out.resource, 0, p.BufferFlag.EOS)
            self.eos_pending = False
            if self.drain is not None:
                reply(self.drain, p.reply(p.Resp.OK_NODATA, self.id))
                self.drain = None

    def _change_resolution(self, width: int, height: int) -> None:
        out = self.params[p.QueueType.OUTPUT]
        coded_w, coded_h = align(width), align(height)
        out.frame_width, out.frame_height = coded_w, coded_h
        out.crop = (0, 0, width, height)
        out.plane_formats = plane_formats(out.format, coded_w, coded_h)
        self.geometry = (width, height)
        self.awaiting_params = True
        self.send_event(p.EventType.DECODER_RESOLUTION_CHANGED, self.id)

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

    def _write_picture(self, pic: Picture, resource: Resource) -> int:
        """Lay the picture out at the params' strides and plane offsets,
        straight into guest memory when the buffer is one chunk."""
        params = self.params[p.QueueType.OUTPUT]
        layout, needed = self._output_layout()
        if len(resource.plane_offsets) == len(layout) and resource.planes_layout == 2:
            layout = [(off, stride) for off, (_, stride)
                      in zip(resource.plane_offsets, layout, strict=True)]
            needed = max(off + size for off, (size, _)
                         in zip(resource.plane_offsets, params.plane_formats, strict=True))
            if needed > resource.size:
                raise ValueError(f"plane offsets {resource.plane_offsets} reach past "
                                 f"its {resource.size} bytes")
        view = resource.contiguous_view()
        if view is not None:
            pic.write_into(params.format, np.frombuffer(view, np.uint8), layout)
        else:
            image = np.zeros(needed, np.uint8)
            pic.write_into(params.format, image, layout)
            resource.write(image)
        return needed
