"""Control elements (VIRTIO 1.3 VIRTIO_SND_F_CTLS): volume and mute per stream.

The Linux driver turns each element into an ALSA mixer control named as
the device says, so the names follow ALSA's conventions ("PCM Playback
Volume" + "PCM Playback Switch" make amixer's simple control 'PCM';
"Capture Volume" + "Capture Switch" make 'Capture').  The values are
applied to the samples on the host side by the stream (see
:meth:`StreamControls.gains`).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

from pyemb.device import ProtocolError
from pyemb.snd import protocol as p

# Volume: 0..VOLUME_MAX in VOLUME_STEP_CDB hundredths of a dB, 0 = mute,
# VOLUME_MAX = 0 dB; published to the guest as an ALSA dB-scale TLV.
VOLUME_MAX = 100
VOLUME_STEP_CDB = 50
VOLUME_MIN_CDB = -VOLUME_MAX * VOLUME_STEP_CDB


def volume_gain(value: int) -> float:
    """Linear gain of a volume step (0 is silence, VOLUME_MAX is unity)."""
    if value <= 0:
        return 0.0
    return 10.0 ** ((value - VOLUME_MAX) * VOLUME_STEP_CDB / 2000.0)


class Control:
    """One element: an integer or boolean value per channel."""

    def __init__(self, name: str, index: int, role: p.CtlRole, ctl_type: p.CtlType,
                 count: int, initial: int, lo: int = 0, hi: int = 1, nid: int = 0) -> None:
        self.name = name
        self.index = index
        self.role = role
        self.type = ctl_type
        self.count = count
        self.lo, self.hi = lo, hi
        self.nid = nid
        self.values = [initial] * count
        self.access = (1 << p.CtlAccess.READ) | (1 << p.CtlAccess.WRITE)
        if self.tlv():
            self.access |= 1 << p.CtlAccess.TLV_READ

    def info(self) -> bytes:
        value = p.CTL_INTEGER_RANGE.pack(self.lo, self.hi, 1).ljust(24, b"\0")
        return p.CTL_INFO.pack(self.nid, self.role, self.type, self.access, self.count,
                               self.index, self.name.encode()[:43], value)

    def read(self) -> bytes:
        """virtio_snd_ctl_value: count le32 integers, zero padded to 512 bytes."""
        return struct.pack(f"<{self.count}I", *self.values).ljust(p.CTL_VALUE_SIZE, b"\0")

    def write(self, value: bytes) -> bool:
        """Set from a virtio_snd_ctl_value; True if anything changed."""
        new = list(struct.unpack_from(f"<{self.count}i", value))
        if any(not self.lo <= v <= self.hi for v in new):
            raise ProtocolError(p.Status.BAD_MSG, f"{self.name}: value out of range")
        changed = new != self.values
        self.values = new
        return changed

    def tlv(self) -> bytes:
        """ALSA TLV metadata (empty if none)."""
        return b""


class VolumeControl(Control):
    def __init__(self, name: str, index: int, count: int, nid: int = 0) -> None:
        super().__init__(name, index, p.CtlRole.VOLUME, p.CtlType.INTEGER, count,
                         VOLUME_MAX, 0, VOLUME_MAX, nid)

    def tlv(self) -> bytes:
        # SNDRV_CTL_TLVT_DB_SCALE {min in 0.01 dB, step | mute-at-minimum}
        return struct.pack("<IIiI", p.TLV_DB_SCALE, 8, VOLUME_MIN_CDB,
                           VOLUME_STEP_CDB | p.TLV_DB_SCALE_MUTE)


class SwitchControl(Control):
    def __init__(self, name: str, index: int, count: int, nid: int = 0) -> None:
        super().__init__(name, index, p.CtlRole.MUTE, p.CtlType.BOOLEAN, count, 1, 0, 1, nid)


class StreamControls:
    """The volume and switch of one stream, read by its pacing thread."""

    def __init__(self, volume: VolumeControl | None, switch: SwitchControl | None) -> None:
        self.volume = volume
        self.switch = switch
        self._lock = threading.Lock()
        self._gains: list[float] | None = None   # None: unity, samples pass untouched
        self.update()

    def update(self) -> None:
        """Recompute the gains after a write."""
        count = max(c.count for c in (self.volume, self.switch) if c) if (
            self.volume or self.switch) else 1
        gains = [1.0] * count
        if self.volume:
            gains = [g * volume_gain(v) for g, v in zip(gains, self.volume.values, strict=True)]
        if self.switch:
            gains = [g if on else 0.0
                     for g, on in zip(gains, self.switch.values, strict=True)]
        with self._lock:
            self._gains = None if all(g == 1.0 for g in gains) else gains

    def gains(self) -> list[float] | None:
        with self._lock:
            return self._gains


class ControlSet:
    """Every control element of the card, by id, and the CTL_* requests."""

    def __init__(self, notify: Callable[[int, int], None]) -> None:
        self.controls: list[Control] = []
        self._owners: dict[int, StreamControls] = {}
        self._notify = notify
        self._lock = threading.Lock()

    def add_stream(self, name: str, index: int, channels: int, volume: bool,
                   mute: bool, nid: int) -> StreamControls:
        vol = VolumeControl(f"{name} Volume", index, channels, nid) if volume else None
        sw = SwitchControl(f"{name} Switch", index, channels, nid) if mute else None
        owner = StreamControls(vol, sw)
        for control in (vol, sw):
            if control is not None:
                self._owners[len(self.controls)] = owner
                self.controls.append(control)
        return owner

    def __len__(self) -> int:
        return len(self.controls)

    def get(self, control_id: int) -> Control:
        if control_id >= len(self.controls):
            raise ProtocolError(p.Status.BAD_MSG, f"no control element {control_id}")
        return self.controls[control_id]

    def read(self, control_id: int) -> bytes:
        control = self.get(control_id)
        with self._lock:
            return p.status_reply(p.Status.OK) + control.read()

    def write(self, control_id: int, value: bytes) -> bytes:
        control = self.get(control_id)
        with self._lock:
            changed = control.write(value)
        self._owners[control_id].update()
        if changed:
            self._notify(control_id, 1 << p.CTL_EVT_MASK_VALUE)
        return p.status_reply(p.Status.OK)

    def tlv_read(self, control_id: int, reply_room: int) -> bytes:
        control = self.get(control_id)
        tlv = control.tlv()
        if not tlv:
            raise ProtocolError(p.Status.NOT_SUPP, f"{control.name} has no TLV")
        if reply_room < p.HDR.size + len(tlv):
            raise ProtocolError(p.Status.BAD_MSG, "TLV reply buffer too small")
        return p.status_reply(p.Status.OK) + tlv
