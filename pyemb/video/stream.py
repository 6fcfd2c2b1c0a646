"""What a decoder stream and an encoder stream share: how a buffer is handed
back, and the worker thread's frame (its loop, the batch its completions go
out in, the answers it owes after them).

A stream's worker waits for work under the stream's lock (``_next``), does a
step of it (``_step``) inside ``completion_batch()``, so that what the step
completes reaches the guest together, pushed by the worker once it lets go
of the lock, without waking QEMU's main loop; and if an exception kills it,
``_fail`` hands back everything it held.  A main-loop command whose answer
must not overtake completions the worker holds in its open batch
(``unpushed``) leaves the answer in ``deferred`` for the worker to send.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from pyemb import log
from pyemb.device import Request, write_all
from pyemb.memory import give_back_free_memory
from pyemb.threadname import set_native_name
from pyemb.video import protocol as p
from pyemb.video.resources import Resource


@dataclass(eq=False, slots=True)
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


class StreamWorker:
    """A stream's lock, worker thread and the answers it owes.  Subclasses
    give ``_next``, ``_step``, ``_fail``, ``abandoned`` and
    ``_close_engine``, and call ``start_worker`` once their state is made."""

    role = "video"                     # "decoding" or "encoding", for the log
    kind = "video"                     # "decoder" or "encoder"
    guest_log: log.GuestLog | None = None   # the device's, set before any input

    def __init__(self, stream_id: int, send_event: Callable[[int, int], None],
                 report: Callable[[BaseException, str], None],
                 completion_batch: Callable[[], AbstractContextManager[Any]]) -> None:
        self.id = stream_id
        self.send_event = send_event
        self.report = report
        self.completion_batch = completion_batch
        self.lock = threading.Condition()
        self.drain: Request | None = None
        self.deferred: list[tuple[Request, bytes]] = []   # answers the worker sends
        self.unpushed = False           # the worker's open batch holds completions
        self.warned: set[str] = set()   # what was logged: once per stream and kind

    def start_worker(self, thread_name: str, native_name: str) -> None:
        self._native_name = native_name
        self.thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self.thread.start()

    @property
    def abandoned(self) -> bool:
        raise NotImplementedError

    def _next(self) -> tuple[bool, Any]:
        """Under no lock: wait for work; (False, None) ends the worker."""
        raise NotImplementedError

    def _step(self, entry: Any) -> None:
        raise NotImplementedError

    def _fail(self) -> None:
        """Under the lock, after an exception killed the worker."""
        raise NotImplementedError

    def _close_engine(self) -> None:
        raise NotImplementedError

    def _in_flight(self) -> tuple[Resource, Any] | None:
        """The resource the worker is using outside the lock (a picture
        being written into it or read from it), and the record whose
        ``release`` flag has the worker unmap it once done."""
        raise NotImplementedError

    def release_resource(self, resource: Resource) -> None:
        """Unmap a resource now, or once the worker is done with it."""
        pinned = self._in_flight()
        if pinned is not None and resource is pinned[0]:
            pinned[1].release = True
        else:
            resource.release()

    def _release(self, resources: dict[int, Resource]) -> None:
        for res in resources.values():
            self.release_resource(res)
        resources.clear()

    def _run(self) -> None:
        set_native_name(self._native_name)
        try:
            while True:
                more, entry = self._next()
                if not more:
                    break
                self._batch = self.completion_batch()
                self._batch.__enter__()
                try:
                    self._step(entry)
                finally:
                    self._batch.__exit__(None, None, None)
        except Exception as e:  # noqa: BLE001 - a dead worker must be visible
            if not self.abandoned:
                self.report(e, f"{self.role} stream {self.id}")
            with self.lock:
                self._fail()
        finally:
            self._close_engine()
            give_back_free_memory()

    def push_now(self) -> None:
        """Within a step, before a call that may take long (an encoder's):
        what the step completed so far reaches the guest now, and the
        answers that waited for it go out, so that no command of the
        stream waits on that call."""
        self._batch.__exit__(None, None, None)
        with self.lock:
            self.unpushed = False
            for request, data in self.deferred:
                reply(request, data)
            self.deferred.clear()
        self._batch = self.completion_batch()
        self._batch.__enter__()

    def warn(self, kind: str, message: str) -> None:
        """Log what a guest caused once per stream and kind: a guest that
        repeats it (a corrupt input per buffer, say) cannot fill the
        host's log; and within the device's ``guest_log`` budget, since a
        guest can make streams without end."""
        if kind not in self.warned:
            self.warned.add(kind)
            text = (f"virtio-video {self.kind} stream {self.id}: {message} "
                    "(logged once per stream)")
            if self.guest_log is not None:
                self.guest_log.warning(text)
            else:
                log.warning(text)

    def _end_drain(self, status: int) -> None:
        if self.drain is not None:
            reply(self.drain, p.reply(status, self.id))
            self.drain = None

    def _answer_deferred(self) -> None:
        self.unpushed = True
        for request, data in self.deferred:
            reply(request, data)
        self.deferred.clear()
