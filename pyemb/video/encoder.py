"""One encoder stream: its params, controls, resources, queues and worker.

The device model (:mod:`pyemb.video.device`) answers synchronous commands on
QEMU's main loop under the stream's lock.  The worker thread reads raw
pictures out of guest buffers and encodes them without that lock, taking it
only for bookkeeping and to copy packets into output buffers (a packet is
small next to a picture: a copy of microseconds).  RESOURCE_QUEUE and
STREAM_DRAIN are completed from the worker.

Settings: every input records, when it is queued, the encoder settings in
force (size, frame rate, bitrate, rate control, profile, level, headers) and
whether FORCE_KEYFRAME asked for a keyframe since the last input.  The worker
opens an encode session for the first picture and a new one whenever a
picture's settings differ from its session's (the old one is flushed first,
so no packet is lost): a bitrate change takes effect at the next picture
queued, as a keyframe with its headers.  A drain flushes the session and
ends it; the next picture opens a new one.

Work in flight: the picture being read (``reading``, which pins its input
buffer until the read ends: a RESOURCE_DESTROY_ALL meanwhile unmaps it
afterwards) and the picture being encoded.  QUEUE_CLEAR on either queue
also resets the encoder: what the encoder was given before the clear yields
no packet after it (``generation``), and the next picture starts a new
session with a keyframe, as a V4L2 encoder does after STREAMOFF.

Memory a guest can make the host hold: packets wait for output buffers in
``packets``; while ``MAX_PENDING_PACKETS`` wait, no more input is read, so a
guest that queues pictures and never a bitstream buffer holds at most that
many packets (and its own buffers).  An encode session holds the encoder's
own pictures (measured at 1080p: libx264 56 MB, libvpx-vp9 106 MB, libx265
118 MB): the device's streams share a ``Budget`` of picture area, taken
when a stream queues its first picture of a size and given back when it is
destroyed, and a picture beyond it is refused with ERR_OUT_OF_MEMORY.

Failures: a packet too big for its output buffer comes back ERR, the packets
that refer to it are dropped and the next picture starts a new session
(``resync``); an engine error fails the stream alone (an ERROR event, every
buffer back with ERR).  The picture's buffer goes back to the guest before
the encode call (``push_now``), so an engine call that never returns holds
its packets and nothing else: clear and destroy are answered.  (The engine
call itself is not time-limited: the stream stays without packets.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from pyemb.device import ProtocolError, Request
from pyemb.video import protocol as p
from pyemb.video.decoder import MAX_BUFFERS, guest_or_minimum, plane_formats
from pyemb.video.resources import Budget, Resource
from pyemb.video.stream import OutputBuffer, StreamWorker, buffer_done
from pyemb.video_backend import (
    EncoderSettings,
    EncodeSession,
    Packet,
    RawImage,
    VideoBackend,
)

DEFAULT_SIZE = (640, 480)
DEFAULT_FRAME_RATE = 30
DEFAULT_BITRATE = 2_000_000
DEFAULT_PEAK_BITRATE = 3_000_000
MAX_BITRATE = 1_000_000_000           # the ChromeOS driver's control maximum
MIN_BITSTREAM_BUFFER = 64 << 10
MAX_PENDING_PACKETS = 64
MAX_FRAME_RATE = 120


def bitstream_buffer_size(width: int, height: int) -> int:
    """Default size of an output buffer: a raw picture's (no sane packet is larger)."""
    return max(MIN_BITSTREAM_BUFFER, width * height * 3 // 2)


def check_frame_rate(rate: int) -> None:
    """0 leaves the rate as it is; otherwise 1 to MAX_FRAME_RATE."""
    if rate and not 1 <= rate <= MAX_FRAME_RATE:
        raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"frame rate {rate}")


class EncoderState(Enum):
    ENCODING = "encoding"         # pictures in, packets out
    FAILED = "failed"             # the engine failed: an ERROR event went out
    DESTROYED = "destroyed"       # the worker ends a read in flight, then itself
    ABANDONED = "abandoned"       # device reset: nothing completes any more


E = EncoderState
TRANSITIONS: dict[EncoderState, frozenset[EncoderState]] = {
    E.ENCODING: frozenset({E.FAILED, E.DESTROYED, E.ABANDONED}),
    E.FAILED: frozenset({E.DESTROYED, E.ABANDONED}),
    E.DESTROYED: frozenset({E.ABANDONED}),
    E.ABANDONED: frozenset(),
}


class StreamFailed(Exception):
    """The engine failed; the stream is FAILED (raised to end the step)."""


class Marker(Enum):
    DRAIN = "drain"      # input queue: flush the encoder here (STREAM_DRAIN)
    EOS = "eos"          # packet queue: an empty EOS buffer, then the drain's answer


@dataclass(eq=False, slots=True)
class PictureJob:
    """A raw picture queued for encoding, with what was in force when it
    was queued: where its planes are, the settings, a forced keyframe."""

    request: Request
    resource: Resource
    timestamp: int
    image: tuple[int, int, int, list[tuple[int, int]], int]   # format, w, h, layout, bytes
    settings: EncoderSettings
    keyframe: bool
    cancelled: bool = False      # its queue was cleared: its picture is not encoded
    release: bool = False        # its resource was destroyed: unmap once read


@dataclass
class Controls:
    """The stream's control values (GET_CONTROL reads them back)."""

    profile: int
    level: int | None
    bitrate: int = DEFAULT_BITRATE
    peak_bitrate: int = DEFAULT_PEAK_BITRATE
    cbr: bool = False
    prepend_headers: bool = False
    force_keyframe: bool = False          # for the next picture queued


class EncoderStream(StreamWorker):
    role = "encoding"
    kind = "encoder"

    def __init__(self, stream_id: int, coded_format: int, in_mem: int, out_mem: int,
                 backend: VideoBackend, send_event: Callable[[int, int], None],
                 report: Callable[[BaseException, str], None],
                 completion_batch: Callable[[], AbstractContextManager[Any]],
                 budget: Budget | None = None) -> None:
        super().__init__(stream_id, send_event, report, completion_batch)
        self.backend = backend
        self.budget = budget or Budget(1 << 62)
        self.reserved = 0               # of the budget, for the size being encoded
        width, height = DEFAULT_SIZE
        self.params = {
            p.QueueType.INPUT: p.Params(p.QueueType.INPUT, p.Format.NV12, width, height,
                                        min_buffers=1, max_buffers=MAX_BUFFERS,
                                        crop=(0, 0, width, height),
                                        frame_rate=DEFAULT_FRAME_RATE,
                                        plane_formats=plane_formats(p.Format.NV12, width,
                                                                    height),
                                        resource_type=in_mem),
            p.QueueType.OUTPUT: p.Params(p.QueueType.OUTPUT, coded_format, width, height,
                                         min_buffers=1, max_buffers=MAX_BUFFERS,
                                         crop=(0, 0, width, height),
                                         frame_rate=DEFAULT_FRAME_RATE,
                                         plane_formats=[(bitstream_buffer_size(width, height),
                                                         0)],
                                         resource_type=out_mem),
        }
        self.controls = Controls(*self._default_profile_level(coded_format))
        self.resources: dict[int, dict[int, Resource]] = {
            p.QueueType.INPUT: {}, p.QueueType.OUTPUT: {}}
        self.state = EncoderState.ENCODING
        self.inputs: deque[PictureJob | Marker] = deque()
        self.outputs: deque[OutputBuffer] = deque()
        self.packets: deque[Packet | Marker] = deque()
        self.reading: PictureJob | None = None
        self.generation = 0             # QUEUE_CLEARs so far: see the module's doc
        # A packet was lost (too big for its buffer): the packets that refer
        # to it are dropped up to the next keyframe, and the next picture
        # encoded starts a new session (a keyframe, with headers).
        self.skip_to_keyframe = False
        self.resync = False
        self.session: EncodeSession | None = None      # the worker's only
        self.session_key: tuple[EncoderSettings, int] | None = None   # settings, generation
        self._settings: EncoderSettings | None = None  # cache of settings()
        self.start_worker(f"pyemb-video-enc{stream_id}", f"pyemb-venc-{stream_id}")

    def _to(self, state: EncoderState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"virtio-video encoder stream {self.id}: {self.state.value} -> "
                               f"{state.value} is not a transition")
        self.state = state

    def _default_profile_level(self, coded: int) -> tuple[int, int | None]:
        profiles = self.backend.encoder_profiles(p.Format(coded))
        levels = self.backend.encoder_levels(p.Format(coded))
        return (profiles[0] if profiles else 0), (levels[0] if levels else None)

    # -- settings: called on QEMU's main loop, under self.lock -------------------------
    def settings(self) -> EncoderSettings:
        """The encoder settings in force now (cached until a change)."""
        if self._settings is None:
            src, dst, c = (self.params[p.QueueType.INPUT], self.params[p.QueueType.OUTPUT],
                           self.controls)
            self._settings = EncoderSettings(
                p.Format(dst.format), src.frame_width, src.frame_height, src.frame_rate,
                c.bitrate, c.peak_bitrate, c.cbr, c.profile, c.level, c.prepend_headers)
        return self._settings

    def _changed(self) -> None:
        self._settings = None

    def set_input_params(self, new: p.Params) -> None:
        """SET_PARAMS(INPUT): raw format, size, frame rate, strides."""
        if new.format not in self.backend.raw_formats():
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"raw format {new.format}")
        width, height = new.frame_width, new.frame_height
        if not self._size_supported(width, height):
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"frame size {width}x{height}")
        check_frame_rate(new.frame_rate)
        src, dst = self.params[p.QueueType.INPUT], self.params[p.QueueType.OUTPUT]
        src.format, src.frame_width, src.frame_height = new.format, width, height
        src.crop = dst.crop = (0, 0, width, height)
        # Keep the driver's strides where they are large enough.
        src.plane_formats = guest_or_minimum(new.plane_formats,
                                             plane_formats(new.format, width, height))
        if (dst.frame_width, dst.frame_height) != (width, height):
            dst.frame_width, dst.frame_height = width, height
            size = max(dst.plane_formats[0][0], bitstream_buffer_size(width, height))
            dst.plane_formats = [(size, 0)]
        if new.frame_rate:
            src.frame_rate = dst.frame_rate = new.frame_rate
        if new.min_buffers:
            src.min_buffers = max(1, min(new.min_buffers, src.max_buffers))
        self._changed()

    def set_output_params(self, new: p.Params) -> None:
        """SET_PARAMS(OUTPUT): coded format, bitstream buffer size, frame rate."""
        if new.format not in self.backend.encoded_formats():
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"coded format 0x{new.format:x}")
        check_frame_rate(new.frame_rate)
        src, dst = self.params[p.QueueType.INPUT], self.params[p.QueueType.OUTPUT]
        if new.format != dst.format:
            dst.format = new.format
            self.controls.profile, self.controls.level = self._default_profile_level(
                new.format)
        if new.plane_formats and new.plane_formats[0][0] >= MIN_BITSTREAM_BUFFER:
            dst.plane_formats = [(new.plane_formats[0][0], 0)]
        if new.frame_rate:
            src.frame_rate = dst.frame_rate = new.frame_rate
        self._changed()

    def _size_supported(self, width: int, height: int) -> bool:
        coded = self.params[p.QueueType.OUTPUT].format
        for desc in self.backend.encoder_capabilities(p.QueueType.OUTPUT):
            if desc.format == coded:
                return any(f.width.min <= width <= f.width.max and f.height.min <= height
                           <= f.height.max and (width - f.width.min) % f.width.step == 0
                           and (height - f.height.min) % f.height.step == 0
                           for f in desc.frames)
        return False

    def get_control(self, control: int) -> int:
        c = self.controls
        coded = self.params[p.QueueType.OUTPUT].format
        if control == p.Control.BITRATE:
            return c.bitrate
        if control == p.Control.BITRATE_PEAK:
            return c.peak_bitrate
        if control == p.Control.BITRATE_MODE:
            return int(c.cbr)
        if control == p.Control.PROFILE:
            return c.profile
        if control == p.Control.LEVEL and c.level is not None and coded == p.Format.H264:
            return c.level
        if control == p.Control.PREPEND_SPSPPS_TO_IDR:
            return int(c.prepend_headers)
        if control == p.Control.FORCE_KEYFRAME:
            return int(c.force_keyframe)
        raise ProtocolError(p.Resp.ERR_UNSUPPORTED_CONTROL, f"control {control}")

    def set_control(self, control: int, value: int) -> None:
        c = self.controls
        coded = p.Format(self.params[p.QueueType.OUTPUT].format)
        if control in (p.Control.BITRATE, p.Control.BITRATE_PEAK):
            if not 1 <= value <= MAX_BITRATE:
                raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"bitrate {value}")
            if control == p.Control.BITRATE:
                c.bitrate = value
            else:
                c.peak_bitrate = value
        elif control == p.Control.BITRATE_MODE:
            if value not in (0, 1):
                raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"bitrate mode {value}")
            c.cbr = value == 1
        elif control == p.Control.PROFILE:
            if value not in self.backend.encoder_profiles(coded):
                raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"profile 0x{value:x}")
            c.profile = value
        elif control == p.Control.LEVEL:
            if value not in self.backend.encoder_levels(coded):
                raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"level 0x{value:x}")
            c.level = value
        elif control == p.Control.PREPEND_SPSPPS_TO_IDR:
            if value not in (0, 1):
                raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER, f"prepend {value}")
            c.prepend_headers = value == 1
        elif control == p.Control.FORCE_KEYFRAME:
            c.force_keyframe = True
        else:
            raise ProtocolError(p.Resp.ERR_UNSUPPORTED_CONTROL, f"control {control}")
        self._changed()

    # -- queues: called on QEMU's main loop, under self.lock -----------------------------
    def input_layout(self, resource: Resource) -> tuple[list[tuple[int, int]], int]:
        """(offset, stride) of each plane of a raw picture in ``resource``,
        as the INPUT params (or its own plane offsets) say, and the bytes
        they reach."""
        planes = self.params[p.QueueType.INPUT].plane_formats
        if (resource.planes_layout == p.PlanesLayout.PER_PLANE
                and len(resource.plane_offsets) == len(planes)):
            offsets = list(resource.plane_offsets)
        else:
            offsets, offset = [], 0
            for size, _ in planes:
                offsets.append(offset)
                offset += size
        layout = [(off, stride) for off, (_, stride) in zip(offsets, planes, strict=True)]
        return layout, max(off + size for off, (size, _) in zip(offsets, planes, strict=True))

    def queue_input(self, request: Request, resource: Resource, timestamp: int) -> None:
        if self.state is EncoderState.FAILED:
            buffer_done(request, resource, timestamp, p.BufferFlag.ERR)
            return
        layout, needed = self.input_layout(resource)
        if needed > resource.size:
            raise ProtocolError(p.Resp.ERR_INVALID_PARAMETER,
                                f"resource {resource.resource_id} has {resource.size} bytes, "
                                f"the picture takes {needed}")
        src = self.params[p.QueueType.INPUT]
        self._reserve(src.frame_width * src.frame_height)
        keyframe, self.controls.force_keyframe = self.controls.force_keyframe, False
        resource.queued = True
        self.inputs.append(PictureJob(request, resource, timestamp,
                                      (src.format, src.frame_width, src.frame_height, layout,
                                       needed),
                                      self.settings(), keyframe))
        self.lock.notify()

    def _reserve(self, pixels: int) -> None:
        """Hold ``pixels`` of the device's budget for this stream's session."""
        if pixels == self.reserved:
            return
        if not self.budget.take(pixels):
            raise ProtocolError(p.Resp.ERR_OUT_OF_MEMORY,
                                f"{pixels} pixels: the device's encoders are at their "
                                "max_encode_pixels")
        self.budget.give(self.reserved)
        self.reserved = pixels

    def _unreserve(self) -> None:
        self.budget.give(self.reserved)
        self.reserved = 0

    def queue_output(self, request: Request, resource: Resource) -> None:
        if self.state is EncoderState.FAILED:
            buffer_done(request, resource, 0, p.BufferFlag.ERR)
            return
        resource.queued = True
        self.outputs.append(OutputBuffer(request, resource))
        self.lock.notify()

    def start_drain(self, request: Request) -> None:
        if self.drain is not None:
            raise ProtocolError(p.Resp.ERR_INVALID_OPERATION, "drain already pending")
        self.drain = request
        if self.state is EncoderState.FAILED:
            self._end_drain(p.Resp.ERR_INVALID_OPERATION)
            return
        self.inputs.append(Marker.DRAIN)
        self.lock.notify()

    def clear(self, queue_type: int) -> None:
        """QUEUE_CLEAR: the queue's buffers come back with ERR; the encoder
        starts again (see the module's doc)."""
        if queue_type == p.QueueType.INPUT:
            for job in self.inputs:
                if type(job) is PictureJob:
                    buffer_done(job.request, job.resource, job.timestamp, p.BufferFlag.ERR)
            self.inputs.clear()
            job = self.reading
            if job is not None and not job.cancelled:
                job.cancelled = True        # its buffer is handed back now, read or not
                buffer_done(job.request, job.resource, job.timestamp, p.BufferFlag.ERR)
            self._end_drain(p.Resp.OK_NODATA)
            # No EOS is owed any more: the drain was answered.
            self.packets = deque(e for e in self.packets if e is not Marker.EOS)
        else:
            for out in self.outputs:
                buffer_done(out.request, out.resource, 0, p.BufferFlag.ERR)
            self.outputs.clear()
            # Packets are dropped; an EOS still owed to a drain stays.
            self.packets = deque(e for e in self.packets if e is Marker.EOS)
        self.generation += 1
        self.lock.notify()

    def _in_flight(self) -> tuple[Resource, PictureJob] | None:
        job = self.reading
        return (job.resource, job) if job is not None else None

    def destroy_resources(self, queue_type: int) -> None:
        self.clear(queue_type)
        self._release(self.resources[queue_type])

    def destroy(self) -> None:
        for queue_type in (p.QueueType.INPUT, p.QueueType.OUTPUT):
            self.destroy_resources(queue_type)
        self._unreserve()
        self._to(EncoderState.DESTROYED)
        self.lock.notify()

    def abandon(self) -> None:
        """Device reset: let go of everything and complete nothing."""
        if self.state is EncoderState.ABANDONED:
            return
        self._to(EncoderState.ABANDONED)
        self._unreserve()
        self.inputs.clear()
        self.outputs.clear()
        self.packets.clear()
        self.drain = None
        self.deferred.clear()
        for resources in self.resources.values():
            self._release(resources)
        self.lock.notify()

    def answer_later(self, request: Request, data: bytes) -> bool:
        """True if the answer to a clear or destroy is left to the worker,
        because its open batch holds completions that an answer pushed now
        would overtake."""
        if not self.unpushed or self.state is EncoderState.FAILED:
            return False
        self.deferred.append((request, data))
        self.lock.notify()
        return True

    # -- the worker thread -------------------------------------------------------------
    @property
    def abandoned(self) -> bool:
        return self.state is EncoderState.ABANDONED

    def _close_engine(self) -> None:
        self._close_session()

    def _next(self) -> tuple[bool, PictureJob | Marker | None]:
        with self.lock:
            self.unpushed = False
            while True:
                state = self.state
                if state is EncoderState.ABANDONED:
                    return False, None
                if self.deferred:
                    return True, None
                if state is EncoderState.DESTROYED:
                    return False, None
                if self.inputs and len(self.packets) < MAX_PENDING_PACKETS:
                    entry = self.inputs.popleft()
                    if type(entry) is PictureJob:
                        self.reading = entry
                    return True, entry
                if self.packets and self.outputs:
                    return True, None
                self.lock.wait()

    def _step(self, entry: PictureJob | Marker | None) -> None:
        with self.lock:
            generation = self.generation
        packets: list[Packet] = []
        try:
            if type(entry) is PictureJob:
                packets = self._encode(entry, generation)
            elif entry is Marker.DRAIN and self.session is not None:
                packets = self._engine(self.session.flush)
                self._close_session()
        except StreamFailed:
            return
        with self.lock:
            if generation == self.generation:
                self.packets.extend(packets)
            if entry is Marker.DRAIN and self.state is EncoderState.ENCODING:
                self.packets.append(Marker.EOS)
            self._deliver()
            if self.deferred:
                self._answer_deferred()

    def _encode(self, job: PictureJob, generation: int) -> list[Packet]:
        """Outside the lock: open the session the picture's settings need,
        read the picture (then hand its buffer back), encode it."""
        packets: list[Packet] = []
        key = (job.settings, generation)
        with self.lock:
            resync, self.resync = self.resync, False
        if resync:
            self._close_session()           # a new one starts with a keyframe and headers
        if self.session is not None and self.session_key != key:
            if self.session_key is not None and self.session_key[1] == generation:
                packets = self._engine(self.session.flush)   # new settings: lose nothing
            self._close_session()           # after a clear: what it holds is dropped
        if self.session is None:
            self.session = self._engine(self.backend.open_encoder, job.settings)
            self.session_key = key
        session = self.session
        picture, error = None, None
        if not job.cancelled:
            try:
                picture = self._take(session, job)
            except ValueError as e:        # planes beyond the buffer
                error = str(e)
        with self.lock:
            self.reading = None
            if job.release:
                job.resource.release()
            if job.cancelled or self.state is not EncoderState.ENCODING:
                return packets
            self.unpushed = True
            if error is not None:
                self.warn("input", f"input resource {job.resource.resource_id}: {error}")
            buffer_done(job.request, job.resource, job.timestamp,
                        p.BufferFlag.ERR if picture is None else 0)
        # The picture's buffer reaches the guest before the encode: the
        # guest refills it meanwhile, and a clear or destroy never waits on
        # the engine.
        self.push_now()
        if picture is not None:
            packets += self._engine(session.encode, picture, job.timestamp, job.keyframe)
        return packets

    def _take(self, session: EncodeSession, job: PictureJob) -> Any:
        """Read the job's picture into the session's own (one pass over
        guest memory where the buffer is one chunk, a gathering copy first
        where it is scattered); nothing refers to the guest buffer after."""
        fmt, width, height, layout, needed = job.image
        resource = job.resource
        view = resource.contiguous_view()
        if view is not None:
            data = np.frombuffer(view, np.uint8)
        else:                           # only the bytes the picture's planes reach
            data = np.frombuffer(resource.read(needed), np.uint8)
        try:
            return session.take(RawImage(p.Format(fmt), width, height, data.ctypes.data,
                                         data.nbytes, layout))
        finally:
            del data                    # the view's export ends with the read

    def _engine(self, call: Callable[..., Any], *args: Any) -> Any:
        """Call the engine.  An engine error fails the stream (an ERROR
        event, every buffer back with ERR) and ends the step, instead of
        killing the worker."""
        try:
            return call(*args)
        except Exception as e:  # noqa: BLE001 - any engine failure is the stream's
            self.warn("engine", f"{type(e).__name__}: {e}")
            self._close_session()
            with self.lock:
                self._fail()
            raise StreamFailed from e

    def _close_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
            self.session_key = None

    def _deliver(self) -> None:
        """Under the lock: copy waiting packets into output buffers."""
        packets, outputs = self.packets, self.outputs
        while packets and outputs:
            entry = packets.popleft()
            out = outputs.popleft()
            self.unpushed = True
            if entry is Marker.EOS:
                buffer_done(out.request, out.resource, 0, p.BufferFlag.EOS)
                self._end_drain(p.Resp.OK_NODATA)
                continue
            if self.skip_to_keyframe and entry.flags != p.BufferFlag.IFRAME:
                outputs.appendleft(out)
                continue
            self.skip_to_keyframe = False
            if len(entry.data) > out.resource.size:
                self.warn("too-big", f"a {len(entry.data)}-byte packet does not fit output "
                           f"resource {out.resource.resource_id} ({out.resource.size} bytes)")
                buffer_done(out.request, out.resource, entry.timestamp, p.BufferFlag.ERR)
                self.skip_to_keyframe = self.resync = True
                continue
            try:
                out.resource.write(entry.data)
            except ValueError:              # unmapped under us
                buffer_done(out.request, out.resource, 0, p.BufferFlag.ERR)
                continue
            buffer_done(out.request, out.resource, entry.timestamp, entry.flags,
                        len(entry.data))

    def _fail(self) -> None:
        """Under the lock: the engine failed or the worker died."""
        if self.state is EncoderState.ENCODING:
            self.send_event(p.EventType.ERROR, self.id)
            self._to(EncoderState.FAILED)
            for queue_type in (p.QueueType.INPUT, p.QueueType.OUTPUT):
                self.clear(queue_type)
        if self.state is not EncoderState.ABANDONED:
            self._end_drain(p.Resp.ERR_INVALID_OPERATION)
            self._answer_deferred()
        job, self.reading = self.reading, None
        if job is not None and job.release:
            job.resource.release()
        self.unpushed = False

