"""The camera node of virtio-media-py: a V4L2 video capture device.

Like vivid or crosvm's simple capture device: one input, the formats,
sizes and frame rates of its source (:mod:`pyemb.camera_source`),
brightness / contrast / saturation and a test-pattern menu, single-planar
capture with MMAP (in shared memory region 0) or USERPTR buffers.

The format, frame interval and controls belong to the device, shared by
all its sessions; the buffers belong to the session that allocated them
(the others get EBUSY, as from a V4L2 driver).  A pacing thread renders a
picture every frame interval into the next queued buffer and returns it
with a DQBUF event: monotonic timestamps (the host's CLOCK_MONOTONIC at
capture), sequence numbers counting every interval, so a picture with no
buffer to go to leaves a gap (``dropped``).
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pyemb import log
from pyemb.camera_source import CameraSource, adjust, source_class
from pyemb.config import ConfigError, section
from pyemb.media import v4l2
from pyemb.media.buffers import Buffer, BufferQueue
from pyemb.media.controls import ControlSet, ControlSpec, ctrl_event
from pyemb.media.formats import RAW_FORMATS, ImageFormat
from pyemb.media.protocol import V4L2Error
from pyemb.media.session import Session
from pyemb.threadname import set_native_name

if TYPE_CHECKING:
    from pyemb.media.device import MediaDevice

CAPTURE = v4l2.BUF_TYPE_VIDEO_CAPTURE
MIN_BUFFERS = 2
STOP_TIMEOUT_S = 1.0


class Camera:
    card = "pyemb camera"
    device_caps = v4l2.CAP_VIDEO_CAPTURE | v4l2.CAP_STREAMING | v4l2.CAP_EXT_PIX_FORMAT

    def __init__(self, device: MediaDevice, config: Mapping[str, Any],
                 backend_class: type | None) -> None:
        self.device = device
        table = section(config, "camera")
        options = {k: v for k, v in table.items() if k != "source"}
        name = table.get("source", "pattern")
        if not isinstance(name, str):
            raise ConfigError("config: camera.source must be a string")
        cls = backend_class or source_class(name)
        if not issubclass(cls, CameraSource):
            raise ConfigError(f"backend {cls.__name__} is not a CameraSource")
        self.source: CameraSource = cls(options)
        self.formats = [f for f in self.source.formats() if f in RAW_FORMATS]
        self.sizes = self.source.sizes()
        self.rates = self.source.frame_rates()
        if not self.formats or not self.sizes or not self.rates:
            raise ConfigError("camera source offers no format, size or frame rate")
        w, h = min(self.sizes, key=lambda s: abs(s[0] - 640) + abs(s[1] - 480))
        self.fmt = ImageFormat(self.formats[0], w, h)
        self.fps = 30 if 30 in self.rates else self.rates[-1]
        specs = [
            ControlSpec(v4l2.CID_BRIGHTNESS, "Brightness", v4l2.CTRL_TYPE_INTEGER, -128, 127, 1, 0),
            ControlSpec(v4l2.CID_CONTRAST, "Contrast", v4l2.CTRL_TYPE_INTEGER, 0, 255, 1, 128),
            ControlSpec(v4l2.CID_SATURATION, "Saturation", v4l2.CTRL_TYPE_INTEGER, 0, 255, 1, 128),
        ]
        menu = self.source.patterns()
        if menu:
            specs.append(ControlSpec(v4l2.CID_TEST_PATTERN, "Test Pattern", v4l2.CTRL_TYPE_MENU,
                                     0, len(menu) - 1, 1, 0, menu=menu))
        self.controls = ControlSet(specs, self._control_changed)
        self.lock = threading.RLock()
        self.queue = BufferQueue(CAPTURE, device.handle, device.shm)
        self.pacer: Pacer | None = None
        self._start_failed = False

    # -- sessions -----------------------------------------------------------------
    def open_session(self, session_id: int) -> CameraSession:
        return CameraSession(self.device, session_id, self)

    def close_session(self, session: Session) -> None:
        with self.lock:
            session.close()
            if self.queue.owner == session.id:
                self.stop()
                self.queue.free()
                self.queue.owner = None

    def close(self) -> None:
        with self.lock:
            self.stop()
            self.queue.free()
        self.source.close()

    def _control_changed(self, spec: ControlSpec, value: int, origin: object) -> None:
        event = ctrl_event(spec, value)
        for session in list(self.device.sessions.values()):
            if session is not origin:
                session.post_event(event)

    # -- streaming --------------------------------------------------------------------
    def start(self, owner: Session) -> None:
        try:
            self.source.start(self.fmt, self.fps)
        except Exception as e:  # noqa: BLE001 - a host fault (no camera): EIO, said once
            if not self._start_failed:
                self._start_failed = True
                log.warning(f"{self.device.handle.name}: camera source "
                            f"{type(self.source).__name__} cannot start: "
                            f"{type(e).__name__}: {e}")
            raise V4L2Error(errno.EIO, "camera source cannot start") from None
        self.pacer = Pacer(self, owner)
        self.pacer.start()

    def stop(self) -> None:
        pacer, self.pacer = self.pacer, None
        if pacer is not None:
            pacer.stop()
            self.source.stop()


class Pacer:
    """The thread that captures a picture every frame interval."""

    def __init__(self, camera: Camera, owner: Session) -> None:
        self.camera = camera
        self.owner = owner
        self.delivered = 0
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pyemb-camera", daemon=True)
        self._failed = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Called holding the camera's lock: the thread gives up waiting for
        it once told to stop.  A source that hangs is not waited for long."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(STOP_TIMEOUT_S)

    def _lock(self) -> bool:
        """Take the camera's lock, unless told to stop meanwhile."""
        while not self.camera.lock.acquire(timeout=0.005):
            if self._stop.is_set():
                return False
        if self._stop.is_set():
            self.camera.lock.release()
            return False
        return True

    def _run(self) -> None:
        set_native_name("pyemb-camera")
        cam = self.camera
        interval_ns = 1_000_000_000 // cam.fps
        start = time.monotonic_ns()
        sequence = 0
        while True:
            due = start + sequence * interval_ns
            wait = (due - time.monotonic_ns()) / 1e9
            if wait > 0 and self._stop.wait(wait):
                return
            if self._stop.is_set():
                return
            late = (time.monotonic_ns() - due) // interval_ns
            if late > 0:                       # fell behind: those intervals are lost
                self.dropped += late
                sequence += late
            self._capture(sequence)
            sequence += 1

    def _capture(self, sequence: int) -> None:
        cam = self.camera
        if not self._lock():
            return
        try:
            buf = cam.queue.take()
            fmt = cam.fmt
            pattern = cam.controls.values.get(v4l2.CID_TEST_PATTERN, 0)
            pic = (cam.controls[v4l2.CID_BRIGHTNESS], cam.controls[v4l2.CID_CONTRAST],
                   cam.controls[v4l2.CID_SATURATION])
        finally:
            cam.lock.release()
        if buf is None:
            self.dropped += 1
            return
        timestamp_us = time.monotonic_ns() // 1000
        error = not self._render(buf, fmt, sequence, pattern, pic)
        if not self._lock():
            return
        try:
            buf.planes[0].bytesused = fmt.sizeimage
            buf.sequence = sequence
            buf.timestamp_us = timestamp_us
            buf.flags = v4l2.BUF_FLAG_ERROR if error else 0
            done = cam.queue.dequeue(buf)
            if done is not None:
                self.owner.post_dqbuf(*done)
                self.delivered += 1
        finally:
            cam.lock.release()

    def _render(self, buf: Buffer, fmt: ImageFormat, sequence: int, pattern: int,
                pic: tuple[int, int, int]) -> bool:
        shm = self.camera.device.shm
        views = buf.views(shm)
        try:
            if len(views) == 1 and len(views[0]) >= fmt.sizeimage:
                target = np.frombuffer(views[0], np.uint8, fmt.sizeimage)
                self.camera.source.render(sequence, target, pattern)
                adjust(fmt, target, *pic)
                del target
            else:
                scratch = np.empty(fmt.sizeimage, np.uint8)
                self.camera.source.render(sequence, scratch, pattern)
                adjust(fmt, scratch, *pic)
                buf.write(shm, scratch)
            return True
        except Exception as e:  # noqa: BLE001 - a source's bug: that picture is an error
            if not self._failed:
                self._failed = True
                log.exception(self.camera.device.handle.name, "rendering a camera picture", e)
            return False


class CameraSession(Session):
    def __init__(self, device: MediaDevice, session_id: int, camera: Camera) -> None:
        super().__init__(device, session_id)
        self.camera = camera

    def controls(self) -> ControlSet:
        return self.camera.controls

    @staticmethod
    def _check_type(buf_type: int) -> None:
        if buf_type != CAPTURE:
            raise V4L2Error(errno.EINVAL, f"buffer type {buf_type}")

    # -- formats --------------------------------------------------------------------
    def ioctl_enum_fmt(self, f: v4l2.Fmtdesc, extra: bytes) -> None:
        self._check_type(f.type)
        if f.index >= len(self.camera.formats):
            raise V4L2Error(errno.EINVAL, "no more formats")
        code = self.camera.formats[f.index]
        f.flags = 0
        f.description = (v4l2.C.c_uint8 * 32)(*v4l2.cstr(RAW_FORMATS[code]))
        f.pixelformat, f.mbus_code = code, 0
        f.reserved[0] = f.reserved[1] = f.reserved[2] = 0

    def _nearest(self, pix: v4l2.PixFormat) -> ImageFormat:
        cam = self.camera
        code = pix.pixelformat if pix.pixelformat in cam.formats else cam.formats[0]
        w, h = min(cam.sizes, key=lambda s: abs(s[0] - pix.width) + abs(s[1] - pix.height))
        return ImageFormat(code, w, h)

    def ioctl_g_fmt(self, f: v4l2.Format, extra: bytes) -> None:
        self._check_type(f.type)
        v4l2.C.memset(v4l2.C.addressof(f.fmt), 0, v4l2.C.sizeof(f.fmt))
        self.camera.fmt.fill_pix(f.fmt.pix)

    def ioctl_try_fmt(self, f: v4l2.Format, extra: bytes) -> None:
        self._check_type(f.type)
        fmt = self._nearest(f.fmt.pix)
        v4l2.C.memset(v4l2.C.addressof(f.fmt), 0, v4l2.C.sizeof(f.fmt))
        fmt.fill_pix(f.fmt.pix)

    def ioctl_s_fmt(self, f: v4l2.Format, extra: bytes) -> None:
        self._check_type(f.type)
        fmt = self._nearest(f.fmt.pix)
        cam = self.camera
        with cam.lock:
            if fmt != cam.fmt and cam.queue.buffers:
                raise V4L2Error(errno.EBUSY, "buffers allocated")
            cam.fmt = fmt
        v4l2.C.memset(v4l2.C.addressof(f.fmt), 0, v4l2.C.sizeof(f.fmt))
        fmt.fill_pix(f.fmt.pix)

    def ioctl_enum_framesizes(self, f: v4l2.Frmsizeenum, extra: bytes) -> None:
        if f.pixel_format not in self.camera.formats or f.index >= len(self.camera.sizes):
            raise V4L2Error(errno.EINVAL, "no more sizes")
        f.type = v4l2.FRMSIZE_TYPE_DISCRETE
        v4l2.C.memset(v4l2.C.addressof(f.u), 0, v4l2.C.sizeof(f.u))
        f.u.discrete.width, f.u.discrete.height = self.camera.sizes[f.index]
        f.reserved[0] = f.reserved[1] = 0

    def ioctl_enum_frameintervals(self, f: v4l2.Frmivalenum, extra: bytes) -> None:
        cam = self.camera
        if (f.pixel_format not in cam.formats or (f.width, f.height) not in cam.sizes
                or f.index >= len(cam.rates)):
            raise V4L2Error(errno.EINVAL, "no more intervals")
        f.type = v4l2.FRMIVAL_TYPE_DISCRETE
        v4l2.C.memset(v4l2.C.addressof(f.u), 0, v4l2.C.sizeof(f.u))
        # Longest interval first, as V4L2 drivers list them.
        f.u.discrete.numerator, f.u.discrete.denominator = 1, cam.rates[f.index]
        f.reserved[0] = f.reserved[1] = 0

    def _fill_parm(self, parm: v4l2.StreamParm) -> None:
        v4l2.C.memset(v4l2.C.addressof(parm.parm), 0, v4l2.C.sizeof(parm.parm))
        cap = parm.parm.capture
        cap.capability = v4l2.CAP_TIMEPERFRAME
        cap.timeperframe.numerator, cap.timeperframe.denominator = 1, self.camera.fps
        cap.readbuffers = 0

    def ioctl_g_parm(self, parm: v4l2.StreamParm, extra: bytes) -> None:
        self._check_type(parm.type)
        self._fill_parm(parm)

    def ioctl_s_parm(self, parm: v4l2.StreamParm, extra: bytes) -> None:
        self._check_type(parm.type)
        tpf = parm.parm.capture.timeperframe
        if tpf.numerator and tpf.denominator:
            want = tpf.denominator / tpf.numerator
            cam = self.camera
            with cam.lock:
                cam.fps = min(cam.rates, key=lambda r: abs(r - want))
        self._fill_parm(parm)

    # -- input ------------------------------------------------------------------------
    def ioctl_enuminput(self, i: v4l2.Input, extra: bytes) -> None:
        if i.index != 0:
            raise V4L2Error(errno.EINVAL, "one input")
        v4l2.C.memset(v4l2.C.addressof(i), 0, v4l2.C.sizeof(i))
        i.name = (v4l2.C.c_uint8 * 32)(*v4l2.cstr("Camera 0"))
        i.type = v4l2.INPUT_TYPE_CAMERA

    def ioctl_g_input(self, i: v4l2.Int, extra: bytes) -> None:
        i.value = 0

    def ioctl_s_input(self, i: v4l2.Int, extra: bytes) -> None:
        if i.value != 0:
            raise V4L2Error(errno.EINVAL, "one input")

    # -- buffers --------------------------------------------------------------------
    def _own_queue(self) -> BufferQueue:
        queue = self.camera.queue
        if queue.owner is not None and queue.owner != self.id:
            raise V4L2Error(errno.EBUSY, "another session owns the buffers")
        return queue

    def ioctl_reqbufs(self, req: v4l2.RequestBuffers, extra: bytes) -> None:
        self._check_type(req.type)
        cam = self.camera
        with cam.lock:
            queue = self._own_queue()
            if req.count == 0:
                cam.stop()
            queue.reqbufs(req, cam.fmt.sizeimage, MIN_BUFFERS)
            queue.owner = self.id if queue.buffers else None

    def ioctl_create_bufs(self, cb: v4l2.CreateBuffers, extra: bytes) -> None:
        self._check_type(cb.format.type)
        cam = self.camera
        size = cb.format.fmt.pix.sizeimage
        if cb.count and size < cam.fmt.sizeimage:
            raise V4L2Error(errno.EINVAL, "CREATE_BUFS buffers too small for the format")
        with cam.lock:
            queue = self._own_queue()
            queue.create_bufs(cb, size)
            if queue.buffers:
                queue.owner = self.id

    def _planes(self, b: v4l2.Buffer) -> list[v4l2.Plane]:
        return []

    def ioctl_querybuf(self, b: v4l2.Buffer, extra: bytes) -> None:
        self._check_type(b.type)
        with self.camera.lock:
            self.camera.queue.querybuf(b, [])

    def ioctl_prepare_buf(self, b: v4l2.Buffer, extra: bytes) -> None:
        self._check_type(b.type)
        cam = self.camera
        with cam.lock:
            queue = self._own_queue()
            buf = queue.prepare(b, [], extra, cam.fmt.sizeimage)
            queue.fill(buf, b, [])

    def ioctl_qbuf(self, b: v4l2.Buffer, extra: bytes) -> None:
        self._check_type(b.type)
        cam = self.camera
        with cam.lock:
            self._own_queue().qbuf(b, [], extra, cam.fmt.sizeimage)

    def ioctl_streamon(self, t: v4l2.Int, extra: bytes) -> None:
        self._check_type(t.value)
        cam = self.camera
        with cam.lock:
            queue = self._own_queue()
            if queue.streaming:
                return
            queue.streamon()
            try:
                cam.start(self)
            except V4L2Error:
                queue.streaming = False
                raise

    def ioctl_streamoff(self, t: v4l2.Int, extra: bytes) -> None:
        self._check_type(t.value)
        cam = self.camera
        with cam.lock:
            queue = self._own_queue()
            cam.stop()
            queue.streamoff()
