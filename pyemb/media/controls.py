"""V4L2 controls of a media device: QUERYCTRL / QUERY_EXT_CTRL / QUERYMENU,
G/S_CTRL and G/S/TRY_EXT_CTRLS, with V4L2's rules: integers are clamped to
the range and rounded to the step, booleans normalized, a menu index out of
range is ERANGE; an extended call that fails says which control in
``error_idx`` (``count`` if validation failed before anything was set).
Each class in use has its class control.
"""

from __future__ import annotations

import ctypes as C
import errno
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pyemb.media import v4l2
from pyemb.media.protocol import V4L2Error

CH_VALUE = 1                     # V4L2_EVENT_CTRL_CH_VALUE
CTRL_FLAG_WRITE_ONLY = 0x0040
CLASS_NAMES = {v4l2.CTRL_CLASS_USER: "User Controls",
               v4l2.CTRL_CLASS_IMAGE_PROC: "Image Processing Controls"}


@dataclass
class ControlSpec:
    id: int
    name: str
    type: int
    minimum: int
    maximum: int
    step: int = 1
    default: int = 0
    flags: int = 0
    menu: list[str] = field(default_factory=list)

    @property
    def ctrl_class(self) -> int:
        return self.id & 0x0FFF0000

    def validate(self, value: int) -> int:
        if self.flags & v4l2.CTRL_FLAG_READ_ONLY:
            raise V4L2Error(errno.EACCES, f"{self.name} is read-only")
        if self.type == v4l2.CTRL_TYPE_BOOLEAN:
            return 1 if value else 0
        if self.type == v4l2.CTRL_TYPE_MENU:
            if not self.minimum <= value <= self.maximum:
                raise V4L2Error(errno.ERANGE, f"{self.name}: no menu entry {value}")
            return value
        value = min(max(value, self.minimum), self.maximum)
        offset = value - self.minimum
        return self.minimum + (offset + self.step // 2) // self.step * self.step


def class_control(ctrl_class: int) -> ControlSpec:
    return ControlSpec(ctrl_class | 1, CLASS_NAMES.get(ctrl_class, "Controls"),
                       v4l2.CTRL_TYPE_CTRL_CLASS, 0, 0, 0, 0,
                       v4l2.CTRL_FLAG_READ_ONLY | CTRL_FLAG_WRITE_ONLY)


def ctrl_event(spec: ControlSpec, value: int, changes: int = CH_VALUE) -> v4l2.Event:
    event = v4l2.Event()
    event.type = v4l2.EVENT_CTRL
    event.id = spec.id
    data = struct.pack("<IIqIiiii", changes, spec.type, value, spec.flags, spec.minimum,
                       spec.maximum, spec.step, spec.default)
    C.memmove(C.addressof(event.u), data, len(data))
    return event


# Called with (spec, new value, the session that set it) after a change.
OnChange = Callable[[ControlSpec, int, object], None]


class ControlSet:
    def __init__(self, specs: list[ControlSpec], on_change: OnChange | None = None) -> None:
        classes = sorted({s.ctrl_class for s in specs})
        self.specs = sorted([*specs, *(class_control(c) for c in classes)], key=lambda s: s.id)
        self._by_id = {s.id: s for s in self.specs}
        self.values = {s.id: s.default for s in self.specs}
        self._on_change = on_change
        self._lock = threading.Lock()

    def __getitem__(self, cid: int) -> int:
        return self.values[cid]

    def spec(self, cid: int) -> ControlSpec:
        spec = self._by_id.get(cid)
        if spec is None:
            raise V4L2Error(errno.EINVAL, f"no control 0x{cid:08x}")
        return spec

    def _find(self, cid: int) -> ControlSpec:
        """QUERYCTRL's lookup: with NEXT_CTRL the first control after the id."""
        if cid & (v4l2.CTRL_FLAG_NEXT_CTRL | v4l2.CTRL_FLAG_NEXT_COMPOUND):
            if not cid & v4l2.CTRL_FLAG_NEXT_CTRL:
                raise V4L2Error(errno.EINVAL, "no compound controls")
            after = cid & v4l2.CTRL_ID_MASK
            for spec in self.specs:
                if spec.id > after:
                    return spec
            raise V4L2Error(errno.EINVAL, "no more controls")
        return self.spec(cid)

    # -- ioctls ---------------------------------------------------------------
    def queryctrl(self, q: v4l2.Queryctrl) -> None:
        spec = self._find(q.id)
        q.id, q.type, q.name = spec.id, spec.type, (C.c_uint8 * 32)(*v4l2.cstr(spec.name))
        q.minimum, q.maximum, q.step = spec.minimum, spec.maximum, spec.step
        q.default_value, q.flags = spec.default, spec.flags
        q.reserved[0] = q.reserved[1] = 0

    def query_ext_ctrl(self, q: v4l2.QueryExtCtrl) -> None:
        spec = self._find(q.id)
        C.memset(C.addressof(q), 0, C.sizeof(q))
        q.id, q.type, q.name = spec.id, spec.type, (C.c_uint8 * 32)(*v4l2.cstr(spec.name))
        q.minimum, q.maximum, q.step = spec.minimum, spec.maximum, spec.step
        q.default_value, q.flags = spec.default, spec.flags
        q.elem_size = 0 if spec.type == v4l2.CTRL_TYPE_CTRL_CLASS else 4
        q.elems = 1

    def querymenu(self, m: v4l2.Querymenu) -> None:
        spec = self.spec(m.id)
        if spec.type != v4l2.CTRL_TYPE_MENU or not spec.minimum <= m.index <= spec.maximum:
            raise V4L2Error(errno.EINVAL, "no such menu entry")
        m.u.name = (C.c_uint8 * 32)(*v4l2.cstr(spec.menu[m.index]))
        m.reserved = 0

    def g_ctrl(self, c: v4l2.Control) -> None:
        spec = self.spec(c.id)
        if spec.flags & CTRL_FLAG_WRITE_ONLY:
            raise V4L2Error(errno.EACCES, "write-only control")
        c.value = self.values[spec.id]

    def s_ctrl(self, c: v4l2.Control, origin: object = None) -> None:
        spec = self.spec(c.id)
        if spec.type == v4l2.CTRL_TYPE_CTRL_CLASS:
            raise V4L2Error(errno.EACCES, "class control")
        c.value = self._set(spec, spec.validate(c.value), origin)

    def ext_ctrls(self, which: str, ec: v4l2.ExtControls, controls: list[v4l2.ExtControl],
                  origin: object = None) -> None:
        """G/S/TRY_EXT_CTRLS (``which``: "get", "set", "try")."""
        cls = ec.which
        if cls == v4l2.CTRL_WHICH_REQUEST_VAL:
            raise V4L2Error(errno.EACCES, "requests are not supported")
        default = cls == v4l2.CTRL_WHICH_DEF_VAL
        if default and which != "get":
            raise V4L2Error(errno.EINVAL, "cannot set default values")
        checked: list[tuple[ControlSpec, int]] = []
        for i, ctrl in enumerate(controls):
            ec.error_idx = i if which == "get" or which == "try" else ec.count
            spec = self._by_id.get(ctrl.id)
            if spec is None or (cls and not default and spec.ctrl_class != cls):
                ec.error_idx = i if which == "try" else ec.count
                raise V4L2Error(errno.EINVAL, f"no control 0x{ctrl.id:08x}")
            if which == "get" and spec.flags & CTRL_FLAG_WRITE_ONLY:
                ec.error_idx = ec.count
                raise V4L2Error(errno.EACCES, f"{spec.name} is write-only")
            if ctrl.size:
                raise V4L2Error(errno.EINVAL, "no compound controls")
            if which != "get":
                if spec.flags & v4l2.CTRL_FLAG_READ_ONLY:
                    ec.error_idx = ec.count if which == "set" else i
                    raise V4L2Error(errno.EACCES, f"{spec.name} is read-only")
                checked.append((spec, spec.validate(ctrl.u.value)))
            else:
                checked.append((spec, 0))
        for (spec, value), ctrl in zip(checked, controls, strict=True):
            if which == "get":
                ctrl.u.value64 = 0
                ctrl.u.value = spec.default if default else self.values[spec.id]
            elif which == "set":
                ctrl.u.value = self._set(spec, value, origin)
            else:
                ctrl.u.value = value
        ec.error_idx = ec.count if which != "get" else 0

    def _set(self, spec: ControlSpec, value: int, origin: object) -> int:
        with self._lock:
            changed = self.values[spec.id] != value
            self.values[spec.id] = value
        if changed and self._on_change is not None:
            self._on_change(spec, value, origin)
        return value
