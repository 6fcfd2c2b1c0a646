"""One PCM stream: the state machine, the message queue and the pacing thread.

State machine (VIRTIO 1.2 5.14.6.6.1)::

    SET_PARAMS  from  IDLE, SET_PARAMS, PREPARED, RELEASED
    PREPARE     from  SET_PARAMS, PREPARED, RELEASED
    START       from  PREPARED, STOPPED
    STOP        from  RUNNING
    RELEASE     from  PREPARED, STOPPED

Pacing: the Linux driver sends one message per period and moves the ALSA
hardware pointer when the device completes it.  So each stream has a thread
that hands a playback message to the backend at the moment the host needs
its first frame (stream clock: START time + frames so far / rate) and
completes it then; a capture message is filled and completed once the stream
clock has passed its last frame.  A backend that blocks at the real rate
(``clocked``, a sound card) is fed up to two periods ahead of that clock and
paces itself; the clock still stops an unpaced host device (ALSA's null
plugin) from completing the guest's whole buffer at once, which the Linux
driver takes for no progress at all (its pointer wraps).  At STOP the frames still
queued are handed over at once and the backend plays them out: nothing the
guest wrote before STOP is lost.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from pyemb import log
from pyemb.device import ProtocolError, Request
from pyemb.snd import protocol as p
from pyemb.snd.controls import StreamControls
from pyemb.snd.pcm import scale, silence
from pyemb.snd_backend import BackendError, SndBackend, StreamParams
from pyemb.threadname import set_native_name

# Largest buffer a guest may ask for; more is a malformed request.
MAX_BUFFER_BYTES = 16 << 20
# How long a backend's open or close may take on QEMU's main loop; the Linux
# driver gives up on a control request after 1 s (virtio_snd msg_timeout_ms).
HOOK_TIMEOUT_S = 0.5
# How long SET_PARAMS or PREPARE after RELEASE waits for the thread to play
# the stream out; a thread slower than that keeps the message it is moving.
RELEASE_JOIN_S = 2.0


def describe(error: BaseException) -> str:
    """A backend fault in one line: a BackendError's own words, else its type."""
    return str(error) if isinstance(error, BackendError) else f"{type(error).__name__}: {error}"


class State(Enum):
    IDLE = "idle"
    SET_PARAMS = "set-params"
    PREPARED = "prepared"
    RUNNING = "running"
    STOPPED = "stopped"
    RELEASED = "released"


ALLOWED = {
    "set_params": {State.IDLE, State.SET_PARAMS, State.PREPARED, State.RELEASED},
    "prepare": {State.SET_PARAMS, State.PREPARED, State.RELEASED},
    "start": {State.PREPARED, State.STOPPED},
    "stop": {State.RUNNING},
    "release": {State.PREPARED, State.STOPPED},
}


@dataclass
class Message:
    """A tx/rx request: payload views over guest memory and the status tail."""

    request: Request
    payload: list[memoryview]
    nbytes: int


def scatter(views: list[memoryview], data: bytes | memoryview) -> None:
    """``data`` laid over ``views`` in order (it may be longer than they are)."""
    offset = 0
    for view in views:
        view[:] = data[offset:offset + len(view)]
        offset += len(view)


def split_message(request: Request, header: int) -> tuple[list[memoryview], memoryview]:
    """The PCM payload views and the 8-byte status view of a tx/rx request.

    tx: readable = {stream_id} + frames, writable = status.
    rx: readable = {stream_id}, writable = frames + status.
    """
    status_views = list(request.writable)
    if request.queue == p.TX_QUEUE:
        views, skip = list(request.readable), header
    else:
        views, skip = status_views, 0
    if not status_views or len(status_views[-1]) < p.PCM_STATUS.size:
        raise ProtocolError(p.Status.BAD_MSG, "status does not fit one buffer")
    tail = status_views[-1]
    status = tail[len(tail) - p.PCM_STATUS.size:]
    payload: list[memoryview] = []
    for i, view in enumerate(views):
        if request.queue == p.RX_QUEUE and i == len(views) - 1:
            view = view[:len(view) - p.PCM_STATUS.size]
        if skip:
            n = min(skip, len(view))
            view, skip = view[n:], skip - n
        if len(view):
            payload.append(view)
    return payload, status


class PcmStream:
    """A PCM stream of the card; control requests come from QEMU's main loop."""

    # How far ahead of the stream clock a clocked backend may be fed.
    LEAD_PERIODS = 2

    def __init__(self, stream_id: int, info: p.PcmInfo, backend: SndBackend,
                 controls: StreamControls, post_event: Callable[[int, int], None],
                 name: str) -> None:
        self.id = stream_id
        self.info = info
        self.backend = backend
        self.controls = controls
        self.post_event = post_event
        self.name = name
        self.output = info.direction == p.Direction.OUTPUT
        self.state = State.IDLE
        self.params: StreamParams | None = None
        self.features = 0
        self._cond = threading.Condition()
        self._queue: deque[Message] = deque()
        self._queued_bytes = 0
        self._thread: threading.Thread | None = None
        self._moving: Message | None = None     # the one the thread works on, unlocked
        self._exit = False
        self._backend_open = False
        self._backend_running = False
        self._failed = False
        self._hung = False              # a hook never returned: the backend is not called again
        self._warned = False            # a host fault was said (once per stream)
        # stream clock: frames handed over since ``_anchor`` (a monotonic time)
        self._anchor = 0.0
        self._frames = 0
        self._generation = 0
        # figures for tests and benchmarks
        self.frames_total = 0
        self.started_at: float | None = None

    # -- control requests (main loop) ------------------------------------------
    def _check(self, op: str) -> None:
        if self.state not in ALLOWED[op]:
            raise ProtocolError(p.Status.BAD_MSG,
                                f"stream {self.id}: {op} not allowed in state {self.state.value}")

    def _join_released(self) -> None:
        # After RELEASE the thread plays out, closes the backend and exits;
        # the driver waited for the messages, so this is short.
        thread = self._thread
        if self.state == State.RELEASED and thread is not None:
            thread.join(RELEASE_JOIN_S)

    def set_params(self, req: p.SetParams) -> None:
        self._check("set_params")
        self._join_released()
        info = self.info
        from pyemb.snd.pcm import SAMPLE_FORMATS
        fmt_name = p.FORMATS[req.format] if req.format < len(p.FORMATS) else "?"
        if not (info.formats >> req.format & 1 and fmt_name in SAMPLE_FORMATS):
            raise ProtocolError(p.Status.NOT_SUPP, f"stream {self.id}: format {fmt_name}")
        if req.rate >= len(p.RATES) or not info.rates >> req.rate & 1:
            raise ProtocolError(p.Status.NOT_SUPP, f"stream {self.id}: rate index {req.rate}")
        if not info.channels_min <= req.channels <= info.channels_max:
            raise ProtocolError(p.Status.NOT_SUPP, f"stream {self.id}: {req.channels} channels")
        if req.features & ~info.features:
            raise ProtocolError(p.Status.NOT_SUPP,
                                f"stream {self.id}: features 0x{req.features:x}")
        frame = SAMPLE_FORMATS[fmt_name].width * req.channels
        if (req.period_bytes == 0 or req.period_bytes % frame
                or req.buffer_bytes < req.period_bytes or req.buffer_bytes % req.period_bytes
                or req.buffer_bytes > MAX_BUFFER_BYTES):
            raise ProtocolError(p.Status.BAD_MSG,
                                f"stream {self.id}: buffer {req.buffer_bytes} / period "
                                f"{req.period_bytes} bytes do not fit {frame}-byte frames")
        self._close_backend()
        self._hand_back_queued()
        self.params = StreamParams(self.id, "output" if self.output else "input",
                                   req.channels, fmt_name, p.RATES[req.rate],
                                   req.buffer_bytes, req.period_bytes)
        self.features = req.features
        self.state = State.SET_PARAMS

    def _hand_back_queued(self) -> None:
        """SET_PARAMS on a PREPARED stream: the messages queued for START
        belong to the old parameters and nothing would complete them (STOP
        and RELEASE are not allowed from SET_PARAMS): IO_ERR, at once.  But
        the one the thread is still playing out after a RELEASE (it took
        longer than RELEASE_JOIN_S) is the thread's to complete."""
        with self._cond:
            moving = self._moving
            queued = [msg for msg in self._queue if msg is not moving]
            kept = [msg for msg in self._queue if msg is moving]
            self._queue = deque(kept)
            self._queued_bytes = sum(msg.nbytes for msg in kept)
        for msg in queued:
            msg.payload = []            # completing kills the views: none may be kept
            self._complete(msg, p.Status.IO_ERR, 0)

    def prepare(self) -> None:
        self._check("prepare")
        self._join_released()
        assert self.params is not None
        if not self._backend_open:
            try:
                self._bounded(self.backend.open, self.params)
            except ValueError as e:
                raise ProtocolError(p.Status.NOT_SUPP, f"stream {self.id}: {e}") from None
            except BackendError as e:
                self._warn_once(str(e))
                raise ProtocolError(p.Status.IO_ERR, str(e)) from None
            self._backend_open = True
        self._failed = False
        self.state = State.PREPARED
        self._ensure_thread()

    def start(self) -> None:
        self._check("start")
        with self._cond:
            self.state = State.RUNNING
            self._anchor = time.monotonic()
            self._frames = 0
            self.started_at = self._anchor
            self._cond.notify_all()

    def stop(self) -> None:
        self._check("stop")
        with self._cond:
            self.state = State.STOPPED
            self._cond.notify_all()

    def release(self) -> None:
        self._check("release")
        with self._cond:
            self.state = State.RELEASED
            self._cond.notify_all()
        # The thread completes what is left (the driver waits for it), then
        # closes the backend and exits.

    # -- tx / rx ---------------------------------------------------------------
    def queue_message(self, request: Request) -> None:
        """A tx/rx request for this stream (its header already checked)."""
        payload, status = split_message(request, p.PCM_XFER.size)
        nbytes = sum(len(v) for v in payload)
        params = self.params
        if self.state not in (State.PREPARED, State.RUNNING, State.STOPPED) or params is None:
            raise ProtocolError(p.Status.BAD_MSG,
                                f"stream {self.id}: PCM data in state {self.state.value}")
        if nbytes == 0 or nbytes % params.frame_bytes or nbytes > params.buffer_bytes:
            raise ProtocolError(p.Status.BAD_MSG,
                                f"stream {self.id}: {nbytes} bytes of PCM is not whole "
                                f"frames within the buffer")
        message = Message(request, payload, nbytes)
        # Once queued, the thread may complete it at once, and completing
        # kills its views: none may stay referenced here.
        del payload, status
        with self._cond:
            self._queue.append(message)
            self._queued_bytes += nbytes
            self._cond.notify_all()

    # -- reset -------------------------------------------------------------------
    def drop(self) -> None:
        """Device reset: forget every message (QEMU drops them) and close."""
        with self._cond:
            self._exit = True
            for msg in self._queue:
                # The views first: a request dropped with its message kills
                # its views, and the shim reports any still alive as stale.
                msg.payload = []
            self._queue.clear()
            self._queued_bytes = 0
            self._generation += 1
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)
            if thread.is_alive():
                log.warning(f"{self.name}: stream {self.id}: pacing thread did not stop")
        self._close_backend()
        self.state = State.IDLE
        self.params = None

    # -- the pacing thread -----------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._exit = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"{self.name}-pcm{self.id}")
        self._thread.start()

    def _close_backend(self) -> None:
        if self._backend_open:
            self._backend_open = False
            self._backend_running = False
            try:
                self._bounded(self.backend.close)
            except (BackendError, ValueError) as e:     # closing must not fail a request
                self._warn_once(f"closing backend: {e}")

    def _bounded(self, hook: Callable[..., None], *args: object) -> None:
        """Run a backend hook called on QEMU's main loop (open, close) in a
        helper thread, waiting at most HOOK_TIMEOUT_S: a hook that never
        returns costs the guest an IO_ERR, not the main loop.  Such a backend
        is not called again (one stuck thread per stream at most).  Any
        exception but ValueError (a setting it cannot take) is a BackendError."""
        if self._hung:
            raise BackendError(f"{type(self.backend).__name__} hangs")
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                hook(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                outcome.append(e)

        thread = threading.Thread(target=run, daemon=True, name=f"{self.name}-hook{self.id}")
        thread.start()
        thread.join(HOOK_TIMEOUT_S)
        if thread.is_alive():
            self._hung = True
            raise BackendError(f"{type(self.backend).__name__}.{hook.__name__}() did not "
                               f"return within {HOOK_TIMEOUT_S} s")
        if outcome:
            error = outcome[0]
            if isinstance(error, (BackendError, ValueError)):
                raise error
            raise BackendError(f"{type(self.backend).__name__}.{hook.__name__}() raised "
                               f"{type(error).__name__}: {error}")

    def _warn_once(self, why: str) -> None:
        """A host fault, said once per stream: a guest retrying cannot flood the log."""
        if not self._warned:
            self._warned = True
            log.warning(f"{self.name}: stream {self.id}: {why}")

    def _own_clock(self) -> bool:
        return not self.backend.clocked or self._failed

    def _run(self) -> None:
        set_native_name(f"pyemb-pcm{self.id}")
        try:
            self._loop()
        except Exception as e:  # noqa: BLE001 - a dying thread is logged, not silent
            log.exception(self.name, f"stream {self.id} pacing thread", e)

    def _loop(self) -> None:
        while True:
            with self._cond:
                msg = self._next_message()
                if msg is None:
                    return
                state, generation = self.state, self._generation
                self._moving = msg
            try:
                self._serve(msg, state, generation)
            finally:
                with self._cond:
                    self._moving = None

    def _serve(self, msg: Message, state: State, generation: int) -> None:
        """The message at the head of the queue, taken in ``state``: played
        or recorded on the clock (RUNNING), or flushed; if things change
        while it waits for the clock, the loop looks again."""
        if not self._backend_running and (state == State.RUNNING or self.output):
            self._backend_call(self.backend.start)
            self._backend_running = True
        if state == State.RUNNING:
            if self._wait_for_deadline(msg, generation):
                self._transfer(msg, generation)
        else:
            # STOPPED or RELEASED: playback frames still go to the sink
            # (nothing written before STOP is lost); capture ends empty.
            self._transfer(msg, generation, flush=True)

    def _next_message(self) -> Message | None:
        """Under the lock: the next message to serve, or None to exit."""
        while True:
            if self._exit:
                return None
            if self._queue and self.state in (State.RUNNING, State.STOPPED, State.RELEASED):
                return self._queue[0]
            if not self._queue and self.state in (State.STOPPED, State.RELEASED):
                if self._backend_running:
                    # Everything is handed over: let the backend play it out.
                    self._cond.release()
                    try:
                        self._backend_call(self.backend.stop)
                    finally:
                        self._cond.acquire()
                    self._backend_running = False
                    continue
                if self.state == State.RELEASED:
                    self._cond.release()
                    try:
                        self._close_backend()
                    finally:
                        self._cond.acquire()
                    return None
            was_empty = not self._queue and self.state == State.RUNNING
            self._cond.wait()
            if was_empty and self._queue and self.state == State.RUNNING:
                # The guest was late: the clock restarts from now rather than
                # rushing through the backlog.
                lag = time.monotonic() - (self._anchor + self._frames / self._rate())
                if lag > 0:
                    self._anchor += lag

    def _rate(self) -> int:
        return self.params.rate if self.params else 48000

    def _wait_for_deadline(self, msg: Message, generation: int) -> bool:
        """Sleep until the stream clock reaches ``msg``; False if things changed."""
        params = self.params
        assert params is not None
        frames = self._frames
        if not self.output:
            frames += msg.nbytes // params.frame_bytes
        deadline = self._anchor + frames / params.rate
        if not self._own_clock():
            # A sound card paces its own blocking calls; the stream clock
            # only keeps an unpaced host device (ALSA null, a file) from
            # racing through the guest's buffer, which the Linux driver
            # cannot follow.  Running a little ahead keeps the card fed.
            deadline -= self.LEAD_PERIODS * params.period_bytes / params.frame_bytes / params.rate
        with self._cond:
            while True:
                if (self._exit or self._generation != generation
                        or self.state != State.RUNNING):
                    return False            # the loop looks again
                delay = deadline - time.monotonic()
                if delay <= 0:
                    return True
                self._cond.wait(delay)

    def _transfer(self, msg: Message, generation: int, flush: bool = False) -> None:
        params = self.params
        assert params is not None
        status = self._move(msg, params, flush)
        # Completing the request kills its views, and the shim reports any
        # still alive: none may outlive this (here, the ones _move sliced).
        msg.payload = []
        frames = msg.nbytes // params.frame_bytes
        with self._cond:
            if self._generation != generation or not self._queue or self._queue[0] is not msg:
                return                  # reset while we worked: QEMU dropped it
            self._queue.popleft()
            self._queued_bytes -= msg.nbytes
            self._frames += frames
            self.frames_total += frames
            latency = self._queued_bytes
        if self.output:
            if self._own_clock():
                latency += msg.nbytes          # the period being played now
            else:
                latency += self.backend.queued_frames() * params.frame_bytes
        self._complete(msg, status, latency)

    def _move(self, msg: Message, params: StreamParams, flush: bool) -> p.Status:
        """The message's frames to the backend, or the backend's (or
        silence) into it; the status it is completed with."""
        status = p.Status.OK
        if self.output:
            gains = self.controls.gains()
            if gains is None and self.backend.takes_fragments:
                # guest pages straight to the backend: no gathering copy
                for view in msg.payload:
                    status = self._backend_io(self.backend.write, view)
            else:
                data = msg.payload[0] if len(msg.payload) == 1 else b"".join(msg.payload)
                if gains is not None:
                    data = scale(data, params.sample, params.channels, gains)
                status = self._backend_io(self.backend.write, data)
        elif flush or self._failed:
            # Whole samples of silence over the message, whatever its views'
            # sizes: a guest may split a sample between two descriptors.
            scatter(msg.payload, silence(params.sample, msg.nbytes + params.sample.width))
        else:
            single = msg.payload[0] if len(msg.payload) == 1 else None
            buf = single if single is not None else memoryview(bytearray(msg.nbytes))
            status = self._backend_io(self.backend.read, buf)
            gains = self.controls.gains()
            if gains is not None and status == p.Status.OK:
                # Over the whole message (frames may cross views); a tail
                # that is not a whole frame is left as read.
                whole = msg.nbytes - msg.nbytes % params.frame_bytes
                buf[:whole] = scale(buf[:whole], params.sample, params.channels, gains)
            if single is None:
                scatter(msg.payload, buf)
        return status

    def _complete(self, msg: Message, status: p.Status, latency: int) -> None:
        request = msg.request
        tail = request.writable[-1]
        tail[len(tail) - p.PCM_STATUS.size:] = p.PCM_STATUS.pack(status, latency)
        request.complete(request.writable_size)

    def _backend_io(self, fn: Callable[[memoryview | bytes], None],
                    data: memoryview | bytes) -> p.Status:
        if self._failed:
            return p.Status.IO_ERR
        try:
            fn(data)  # type: ignore[arg-type]
        except Exception as e:  # noqa: BLE001 - any backend fault is the host path breaking
            self._fail(describe(e))
            return p.Status.IO_ERR
        return p.Status.OK

    def _backend_call(self, fn: Callable[[], None]) -> None:
        if self._failed:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            self._fail(describe(e))

    def _fail(self, why: str) -> None:
        """The host path broke: warn once, tell the guest, pace by our own clock."""
        self._warn_once(why)
        self._failed = True
        with self._cond:
            self._anchor = time.monotonic() - self._frames / self._rate()
        if self.features >> p.PcmFeature.EVT_XRUNS & 1:
            self.post_event(p.Event.PCM_XRUN, self.id)
