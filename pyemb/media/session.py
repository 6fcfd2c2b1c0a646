"""One open of a virtio-media node (CMD_OPEN ... CMD_CLOSE): the ioctls
every kind of node answers the same way, and the dispatch to the rest.

A node kind (the camera, the decoder) subclasses :class:`Session` and
implements ``ioctl_<name>(payload, extra) -> bytes | None`` for each ioctl
of :data:`pyemb.media.protocol.IOCTLS` it supports; the others answer
ENOTTY.  ``payload`` is the parsed V4L2 structure and ``extra`` what
followed it (planes, controls, scatter-gather lists); the return value is
what follows the payload in the reply (planes, controls), or None.
"""

from __future__ import annotations

import errno
import threading
from typing import TYPE_CHECKING

from pyemb.media import protocol as p
from pyemb.media import v4l2
from pyemb.media.protocol import V4L2Error

if TYPE_CHECKING:
    from collections.abc import Callable

    from pyemb.media.device import MediaDevice


class Session:
    # Event types SUBSCRIBE_EVENT accepts besides control events.
    event_types: tuple[int, ...] = ()

    def __init__(self, device: MediaDevice, session_id: int) -> None:
        self.device = device
        self.id = session_id
        self.lock = threading.RLock()
        self.subscriptions: set[tuple[int, int]] = set()
        self.closed = False

    # -- dispatch -------------------------------------------------------------
    def ioctl(self, io: p.Ioctl, payload: v4l2.Struct, extra: bytes) -> bytes | None:
        method = getattr(self, "ioctl_" + io.name, None)
        if method is None:
            raise V4L2Error(errno.ENOTTY, f"{io.name} not supported")
        with self.lock:
            if self.closed:
                raise V4L2Error(errno.EBADF, "session closed")
            return method(payload, extra)

    def close(self) -> None:
        """CMD_CLOSE or device reset: give back everything the session holds."""
        self.closed = True

    def answer_later(self, send: Callable[[], None]) -> bool:
        """After an ioctl, on QEMU's main loop: True if the session's own
        thread calls ``send`` (which answers the ioctl) itself, because it has
        completed buffers or raised events that are not on the used ring yet
        (its batch is pushed when it ends): an answer pushed now would
        overtake them, and a DQBUF raised before a STREAMOFF would reach the
        driver after it."""
        return False

    # -- events -----------------------------------------------------------------
    def ioctl_subscribe_event(self, sub: v4l2.EventSubscription, extra: bytes) -> None:
        if sub.type == v4l2.EVENT_CTRL:
            controls = self.controls()
            if controls is None:
                raise V4L2Error(errno.EINVAL, "no controls")
            spec = controls.spec(sub.id)
            self.subscriptions.add((sub.type, sub.id))
            # A class control has no value: no initial event for it.
            if (sub.flags & v4l2.EVENT_SUB_FL_SEND_INITIAL
                    and spec.type != v4l2.CTRL_TYPE_CTRL_CLASS):
                from pyemb.media.controls import ctrl_event
                self.post_event(ctrl_event(spec, controls[spec.id], changes=3))
            return
        if sub.type not in self.event_types:
            raise V4L2Error(errno.EINVAL, f"no events of type {sub.type}")
        self.subscriptions.add((sub.type, 0))

    def ioctl_unsubscribe_event(self, sub: v4l2.EventSubscription, extra: bytes) -> None:
        if sub.type == 0xFFFFFFFF:                   # V4L2_EVENT_ALL
            self.subscriptions.clear()
            return
        key = (sub.type, sub.id if sub.type == v4l2.EVENT_CTRL else 0)
        self.subscriptions.discard(key)

    def subscribed(self, event_type: int, event_id: int = 0) -> bool:
        return (event_type, event_id) in self.subscriptions

    def post_event(self, event: v4l2.Event) -> None:
        if not self.closed and self.subscribed(event.type, event.id):
            self.device.events.post(p.v4l2_event(self.id, event))

    def post_dqbuf(self, b: v4l2.Buffer, planes: list[v4l2.Plane]) -> None:
        if not self.closed:
            self.device.events.post(p.dqbuf_event(self.id, b, planes))

    def controls(self):  # noqa: ANN201 - ControlSet | None, imported lazily
        return None

    # -- controls, for nodes that have them -------------------------------------
    def _ctrls(self):  # noqa: ANN202
        controls = self.controls()
        if controls is None:
            raise V4L2Error(errno.ENOTTY, "no controls")
        return controls

    def ioctl_queryctrl(self, q: v4l2.Queryctrl, extra: bytes) -> None:
        self._ctrls().queryctrl(q)

    def ioctl_query_ext_ctrl(self, q: v4l2.QueryExtCtrl, extra: bytes) -> None:
        self._ctrls().query_ext_ctrl(q)

    def ioctl_querymenu(self, m: v4l2.Querymenu, extra: bytes) -> None:
        self._ctrls().querymenu(m)

    def ioctl_g_ctrl(self, c: v4l2.Control, extra: bytes) -> None:
        self._ctrls().g_ctrl(c)

    def ioctl_s_ctrl(self, c: v4l2.Control, extra: bytes) -> None:
        self._ctrls().s_ctrl(c, origin=self)

    def _ext_ctrls(self, which: str, ec: v4l2.ExtControls, extra: bytes) -> bytes:
        controls = [v4l2.ExtControl.parse(extra[i * 20:(i + 1) * 20]) for i in range(ec.count)]
        try:
            self._ctrls().ext_ctrls(which, ec, controls, origin=self)
        except V4L2Error as e:
            e.payload = bytes(ec) + b"".join(map(bytes, controls))
            raise
        return b"".join(map(bytes, controls))

    def ioctl_g_ext_ctrls(self, ec: v4l2.ExtControls, extra: bytes) -> bytes:
        return self._ext_ctrls("get", ec, extra)

    def ioctl_s_ext_ctrls(self, ec: v4l2.ExtControls, extra: bytes) -> bytes:
        return self._ext_ctrls("set", ec, extra)

    def ioctl_try_ext_ctrls(self, ec: v4l2.ExtControls, extra: bytes) -> bytes:
        return self._ext_ctrls("try", ec, extra)
