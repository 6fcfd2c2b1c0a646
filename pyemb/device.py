"""The device-model side of the C shim: what QEMU calls, and helpers.

QEMU builds one :class:`DeviceModel` per ``-device`` (see
:func:`pyemb.host.create_device`) and reads its shape once at realize:
``device_id``, ``queue_sizes``, ``features`` (device-specific bits 0..23) and
``config_size``.  Afterwards it calls, always with the GIL held:

- ``handle_request(queue, request)`` for every element a guest makes
  available, from QEMU's main loop (or a vCPU thread);
- ``read_config()`` / ``write_config(data)`` for config-space accesses;
- ``set_features(features)`` and ``set_status(status)`` during the handshake;
- ``reset()`` when the driver resets the device: every request still held is
  dropped by QEMU right after, so the model must forget them;
- ``close()`` at unplug and at QEMU exit.

A request is completed with ``request.complete(written)``, at once or later
from any thread (from a model's own thread, inside ``handle.batch()`` where
it completes several).  Its memoryviews point straight into guest RAM and are dead
(``ValueError``) after completion, so copy what must outlive it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

from pyemb import log


class Request(Protocol):
    """One virtqueue element (``_pyemb.Request`` inside QEMU)."""

    queue: int
    readable: tuple[memoryview, ...]
    writable: tuple[memoryview, ...]
    readable_size: int
    writable_size: int
    done: bool
    cancelled: bool

    def complete(self, written: int = 0) -> bool: ...


class GuestMapping(Protocol):
    """Guest RAM mapped for longer than one request (``_pyemb.GuestMapping``)."""

    address: int
    length: int
    writable: bool
    view: memoryview

    def release(self) -> None: ...


class DeviceHandle(Protocol):
    """What a model may ask of its QEMU device (``_pyemb.Device``)."""

    name: str
    live: bool
    pending_requests: int
    shared_memory: memoryview | None
    """virtio-media-py: shared memory region 0, the host memory that the
    guest maps through the PCI BAR (``shm-size`` bytes, 256 MiB by default, a
    power of two), as one writable memoryview (format ``B``) over the whole
    region; the same view each time.  The model decides where buffers go in
    it and writes frames straight into it; the guest sees every write at
    once, and the model sees the guest's.  None where the device has no
    region: ``shm-size=0``, virtio-mmio (QEMU's has no shared memory
    regions), the other device types.  The region outlives a device reset
    (with its bytes); at unplug the view dies (``ValueError``) and views
    derived from it (slices, numpy arrays) are reported as stale, though
    their memory stays mapped while they live."""

    def map_guest(self, address: int, length: int, writable: bool = True) -> GuestMapping: ...

    def notify_config(self) -> None: ...

    def discard_shared_memory(self, offset: int, length: int) -> None:
        """Zero ``[offset, offset + length)`` of :attr:`shared_memory` and give
        its whole pages back to the host (``madvise(MADV_DONTNEED)``): a
        freed buffer keeps no host memory, and the guest reads zeros there.
        Partial pages at the ends are zeroed in place, so page-aligned
        buffers are best.  ``ValueError`` for a range outside the region or
        a device without one.  Callable from any thread (the GIL is let go
        meanwhile)."""
        ...

    def batch(self) -> AbstractContextManager[Any]:
        """``with handle.batch():`` -- requests this thread completes inside
        are pushed to the guest together when the block ends, by this
        thread, which takes QEMU's lock to do it.  For a model's own
        threads: without a batch, each of their completions wakes QEMU's
        main loop.  End the block holding no lock that ``handle_request``
        may wait for (QEMU's lock comes first, then the model's)."""
        ...


class ProtocolError(Exception):
    """A request the protocol rejects: answered with ``status``, no traceback."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message or f"status 0x{status:x}")
        self.status = status


def read_all(request: Request, limit: int | None = None) -> bytes:
    """The device-readable part of a request as one byte string (a copy), at
    most ``limit`` bytes of it: a guest's descriptors may name all of its RAM,
    many times over (QEMU's generic-fuzz held the main loop for minutes with
    one control request), and a command is read on QEMU's main loop."""
    views = request.readable
    if limit is None:
        return bytes(views[0]) if len(views) == 1 else b"".join(views)
    pieces = []                         # slices, copied once by the join
    for view in views:
        if limit <= 0:
            break
        pieces.append(view[:limit])
        limit -= len(pieces[-1])
    return b"".join(pieces)


def write_all(request: Request, data: bytes | memoryview) -> int:
    """Scatter ``data`` over the writable views; returns the bytes written.

    Data beyond the writable size is cut off (the caller decides whether a
    short buffer is an error).
    """
    views = request.writable
    if len(views) == 1 and isinstance(data, bytes):    # a reply: the common case
        n = min(len(views[0]), len(data))
        views[0][:n] = data if n == len(data) else data[:n]
        return n
    src = memoryview(data).cast("B")
    done = 0
    for view in views:
        if done >= len(src):
            break
        n = min(len(view), len(src) - done)
        view[:n] = src[done:done + n]
        done += n
    return done


class DeviceModel:
    """Base of every pyemb device model.

    Subclasses set the shape attributes and implement one handler per queue
    in :meth:`queue_handlers`.  An exception escaping a handler is logged once
    with its traceback and the request is completed by :meth:`fail_request`
    (by default empty), so the device keeps serving.
    """

    device_id: int = 0
    queue_sizes: tuple[int, ...] = ()
    # What serve_command reads of a request at most: the largest command the
    # protocol has (one byte more where a longer one is an error).
    max_command_bytes: int | None = None
    features: int = 0
    config_size: int = 0

    def __init__(self, handle: DeviceHandle, config: Mapping[str, Any]) -> None:
        self.handle = handle
        self.config = config
        self.driver_features = 0
        self.status = 0
        self._handlers: list[Callable[[Request], None]] = self.queue_handlers()
        if len(self._handlers) != len(self.queue_sizes):
            raise TypeError("queue_handlers() must give one handler per queue")

    # -- shape and handshake ------------------------------------------------
    def queue_handlers(self) -> list[Callable[[Request], None]]:
        """One callable per virtqueue, in queue order."""
        raise NotImplementedError

    def read_config(self) -> bytes:
        return bytes(self.config_size)

    def write_config(self, data: bytes) -> None:
        """Config space is read-only unless a model says otherwise."""

    def set_features(self, features: int) -> None:
        self.driver_features = features

    def set_status(self, status: int) -> None:
        self.status = status

    def reset(self) -> None:
        """Forget every request and stream; QEMU drops held requests next."""
        self.driver_features = 0
        self.status = 0

    def close(self) -> None:
        """Release host resources (threads, audio devices, decoders)."""
        self.reset()

    # -- requests -------------------------------------------------------------
    def handle_request(self, queue: int, request: Request) -> None:
        try:
            self._handlers[queue](request)
        except Exception as e:  # noqa: BLE001 - a model bug must not stall the queue
            self.report(e, f"handling a request on queue {queue}")
            if not request.done:
                self.fail_request(queue, request)

    def fail_request(self, queue: int, request: Request) -> None:
        """Complete a request whose handler raised; models write an error status."""
        request.complete(0)

    def report(self, exc: BaseException, what: str) -> None:
        log.exception(self.handle.name, what, exc)

    def serve_command(
        self,
        request: Request,
        handle: Callable[[bytes, Request], bytes | None],
        error_reply: Callable[[int], bytes],
        internal_error: int,
    ) -> None:
        """Run a control command: ``handle(command, request) -> response``.

        A :class:`ProtocolError` becomes ``error_reply(status)``; any other
        exception is logged and becomes ``error_reply(internal_error)``.  A
        handler that returns None has taken the request to complete later.
        """
        command = read_all(request, self.max_command_bytes)
        try:
            response = handle(command, request)
        except ProtocolError as e:
            response = error_reply(e.status)
        except Exception as e:  # noqa: BLE001
            self.report(e, "handling a control request")
            response = error_reply(internal_error)
        if response is not None:
            request.complete(write_all(request, response))
