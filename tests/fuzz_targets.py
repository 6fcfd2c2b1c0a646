"""The protocol fuzzer's generators, one per device (see tests/protocol_fuzz.py).

Each makes valid commands of its protocol with the protocol modules, with
the ids the driver side knows (streams it created, sessions the device
opened, MMAP offsets QUERYBUF gave, resources it made), at weights that
reach the devices' deep paths: parameters set, buffers made and queued,
streams started, pictures decoded and encoded, clears, drains and destroys
in the middle of all that.  The mutator does the rest.

Guest memory a command points at (virtio-video resources, USERPTR
buffers) is in the fuzzer's pool: a *library* of real bitstream (H.264,
VP8, VP9 packets of small pictures, one per 32 KiB slot, written again at
each reset) and *scratch* space for pictures and bitstream out.
"""

from __future__ import annotations

import ctypes as C
import errno
import random
import struct
from typing import TYPE_CHECKING, Any

from pyemb.media import protocol as mp
from pyemb.media import v4l2
from pyemb.snd import protocol as sp
from pyemb.video import protocol as vp
from tests.protocol_fuzz import Op, ctypes_fields, struct_fields

if TYPE_CHECKING:
    from tests.protocol_fuzz import Fuzzer

SLOT = 32 << 10                 # library slot: one packet, zeros after it
LIBRARY = 8 << 20               # the library's part of the pool; scratch after it
POOL_SCRATCH = 56 << 20         # the scratch part of the pool
SCRATCH_SLOT = 256 << 10


def pick(rng: random.Random, weighted: dict[Any, int]) -> Any:
    return rng.choices(list(weighted), weights=list(weighted.values()))[0]


def odd_id(rng: random.Random) -> int:
    return rng.choice((0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, rng.getrandbits(32)))


class Target:
    device_id = 0
    features = 0
    mem_mb = 256
    event_queue: int | None = None
    event_size = 0
    event_buffers = 8

    def qemu_args(self, tmp) -> list[str]:  # noqa: ANN001
        raise NotImplementedError

    def prepare(self, fz: Fuzzer) -> None:
        """Once per QEMU, before the first initialization."""

    def initialized(self, fz: Fuzzer) -> None:
        """After each (re)initialization: the device forgot everything."""

    def generate(self, rng: random.Random, fz: Fuzzer) -> Op:
        raise NotImplementedError

    def event_op(self, rng: random.Random) -> Op:
        """An event buffer of an odd size, or of the right one."""
        size = rng.choice((self.event_size, self.event_size, 1, self.event_size - 1,
                           self.event_size + 1, 4096, rng.randrange(1, 2 * self.event_size)))
        return Op("event-buffer", self.event_queue, in_size=size,
                  prompt=size < self.event_size, mutate=False)

    def check(self, op: Op, writable: int, written: int, data: bytes) -> str | None:
        return None

    def prompt(self, op: Op) -> bool:
        """Whether the device answers ``op`` (as mutated) at once."""
        if op.queue == self.event_queue:
            return op.in_size < self.event_size
        return op.prompt

    def status(self, op: Op, written: int, data: bytes) -> str:
        return f"{written}B" if written < 4 else f"0x{int.from_bytes(data[:4], 'little'):x}"

    def on_used(self, fz: Fuzzer, op: Op, written: int, data: bytes) -> None:
        pass

    def submitted(self, op: Op) -> None:
        """``op`` (as mutated) went to the device."""

    def keep_off_driver(self, fz: Fuzzer, op: Op) -> None:
        """Guest memory ``op`` (as mutated) names for the device to write
        into must not be the driver's own rings and buffers: a guest that
        points its device at them corrupts itself, and nothing the oracles
        see after that is the device's doing.  Devices that take guest
        addresses in their commands move such ranges into the pool."""

    @staticmethod
    def _move_ranges(fz: Fuzzer, data: bytearray, start: int, step: int) -> None:
        """Every (le64 address, le32 length) at ``start`` + k * ``step``
        that overlaps the driver's memory moves into the pool's scratch."""
        lo, hi = fz.rings[0].desc, fz.arena.end
        for off in range(start, len(data) - 11, step):
            addr, length = struct.unpack_from("<QI", data, off)
            if addr < hi and addr + max(length, 1) > lo:
                struct.pack_into("<Q", data, off,
                                 fz.pool + LIBRARY + (addr % (POOL_SCRATCH // 2)) // 4096 * 4096)

    def probe(self, fz: Fuzzer) -> str | None:
        """A known-good request: None if it was answered as it should be."""
        return None

    def teardown(self, fz: Fuzzer) -> list[Op]:
        return []

    # -- shared helpers -----------------------------------------------------------------
    @staticmethod
    def write_pool(fz: Fuzzer, offset: int, data: bytes) -> None:
        a = fz.pool - fz.base + offset
        fz.mm[a:a + len(data)] = data

    @staticmethod
    def scratch(fz: Fuzzer, slot: int) -> int:
        return fz.pool + LIBRARY + (slot % 200) * SCRATCH_SLOT


# -- virtio-snd ---------------------------------------------------------------------------
SND_CONFIG = """
[[snd.streams]]
direction = "output"
channels = [1, 2]
formats = ["U8", "S16", "S32", "FLOAT"]
rates = [8000, 44100, 48000]
backend = "null"

[[snd.streams]]
direction = "input"
channels = [1, 2]
formats = ["S16", "S24"]
rates = [48000]
backend = "null"

[[snd.jacks]]
device = "headphone"
remap = true

[[snd.jacks]]
device = "mic"
connected = false
"""
SND_FORMATS = [sp.FORMAT_INDEX[f] for f in ("U8", "S8", "S16", "S24", "S32", "FLOAT")]
SND_RATES = [sp.RATE_INDEX[r] for r in (8000, 44100, 48000)]
# What SND_CONFIG's streams take, to reach PREPARE and START often.
SND_STREAM_FORMATS = [[sp.FORMAT_INDEX[f] for f in ("U8", "S16", "S32", "FLOAT")],
                      [sp.FORMAT_INDEX[f] for f in ("S16", "S24")]]
SND_STREAM_RATES = [[sp.RATE_INDEX[r] for r in (8000, 44100, 48000)], [sp.RATE_INDEX[48000]]]
SND_WIDTH = {sp.FORMAT_INDEX["U8"]: 1, sp.FORMAT_INDEX["S8"]: 1, sp.FORMAT_INDEX["S16"]: 2,
             sp.FORMAT_INDEX["S24"]: 4, sp.FORMAT_INDEX["S32"]: 4,
             sp.FORMAT_INDEX["FLOAT"]: 4}
SND_STATUSES = {int(s) for s in sp.Status}


class Snd(Target):
    device_id = sp.DEVICE_ID
    features = 1 << sp.F_CTLS
    event_queue = sp.EVENT_QUEUE
    event_size = sp.EVENT.size

    def qemu_args(self, tmp) -> list[str]:  # noqa: ANN001
        cfg = tmp / "snd.toml"
        cfg.write_text(SND_CONFIG)
        return ["-device", f"virtio-snd-py-pci,config={cfg}"]

    def prepare(self, fz: Fuzzer) -> None:
        t = fz.t
        self.jacks, self.streams, self.chmaps, self.controls = (
            t.config_read(4 * i, 4) for i in range(4))
        self.params: dict[int, tuple[int, int]] = {}

    def initialized(self, fz: Fuzzer) -> None:
        self.params = {}

    def _sid(self, rng: random.Random) -> int:
        return rng.randrange(self.streams) if rng.random() < 0.95 else odd_id(rng)

    def generate(self, rng: random.Random, fz: Fuzzer) -> Op:
        r = rng.random()
        if r < 0.5:
            return self._control(rng)
        if r < 0.75:
            return self._xfer(rng, sp.TX_QUEUE)
        if r < 0.97:
            return self._xfer(rng, sp.RX_QUEUE)
        return self.event_op(rng)

    def _xfer(self, rng: random.Random, queue: int) -> Op:
        sid = (0 if queue == sp.TX_QUEUE else 1) if rng.random() < 0.9 else self._sid(rng)
        frame, period = self.params.get(sid, (4, 256))
        r = rng.random()
        n = (period if r < 0.7 else frame * rng.randrange(1, 64) if r < 0.85
             else rng.choice((1, frame - 1, frame + 1, 2 * period, 1 << 20)))
        n = max(n, 1)
        head = sp.PCM_XFER.pack(sid)
        if queue == sp.TX_QUEUE:
            # 64 random bytes over and over (a case's recorded inputs stay
            # small); the whole chunk is drawn, as the corpus cases' were.
            chunk = rng.randbytes(min(n, 4096))[:64]
            data = (chunk * (n // len(chunk) + 1))[:n]
            return Op("tx", queue, head + data, sp.PCM_STATUS.size,
                      struct_fields(sp.PCM_XFER), prompt=False)
        return Op("rx", queue, head, n + sp.PCM_STATUS.size, struct_fields(sp.PCM_XFER),
                  prompt=False)

    def _control(self, rng: random.Random) -> Op:
        code = pick(rng, {sp.Code.PCM_SET_PARAMS: 16, sp.Code.PCM_PREPARE: 12,
                          sp.Code.PCM_START: 12, sp.Code.PCM_STOP: 9, sp.Code.PCM_RELEASE: 9,
                          sp.Code.PCM_INFO: 4, sp.Code.JACK_INFO: 3, sp.Code.JACK_REMAP: 3,
                          sp.Code.CHMAP_INFO: 3, sp.Code.CTL_INFO: 3,
                          sp.Code.CTL_ENUM_ITEMS: 2, sp.Code.CTL_READ: 4,
                          sp.Code.CTL_WRITE: 6, sp.Code.CTL_TLV_READ: 3,
                          sp.Code.CTL_TLV_WRITE: 1, sp.Code.CTL_TLV_COMMAND: 1, 0: 2})
        name = code.name if isinstance(code, sp.Code) else "unknown"
        if code == sp.Code.PCM_SET_PARAMS:
            sid = self._sid(rng)
            known = sid < len(SND_STREAM_FORMATS) and rng.random() < 0.85
            fmt = rng.choice(SND_STREAM_FORMATS[sid] if known else SND_FORMATS)
            rate = rng.choice(SND_STREAM_RATES[sid] if known else SND_RATES)
            channels = rng.choice((1, 2, 2) if known else (1, 2, 0, 3))
            frame = SND_WIDTH[fmt] * max(channels, 1)
            period = frame * rng.choice((16, 32, 64, 128, 480))
            buffer = period * rng.choice((1, 2, 4, 8))
            features = rng.choice((0, 0, 1 << sp.PcmFeature.EVT_XRUNS))
            cmd = sp.SetParams(sid, buffer, period, features, channels, fmt, rate).pack()
            return Op(name, sp.CONTROL_QUEUE, cmd, 4, struct_fields(sp.PCM_SET_PARAMS),
                      note=(sid, frame, period))
        if code in (sp.Code.PCM_PREPARE, sp.Code.PCM_START, sp.Code.PCM_STOP,
                    sp.Code.PCM_RELEASE):
            return Op(name, sp.CONTROL_QUEUE, sp.PCM_HDR.pack(code, self._sid(rng)), 4,
                      struct_fields(sp.PCM_HDR))
        if code in (sp.Code.PCM_INFO, sp.Code.JACK_INFO, sp.Code.CHMAP_INFO, sp.Code.CTL_INFO):
            total, size = {sp.Code.PCM_INFO: (self.streams, sp.PCM_INFO.size),
                           sp.Code.JACK_INFO: (self.jacks, sp.JACK_INFO.size),
                           sp.Code.CHMAP_INFO: (self.chmaps, sp.CHMAP_INFO.size),
                           sp.Code.CTL_INFO: (self.controls, sp.CTL_INFO.size)}[code]
            start = rng.randrange(total) if total and rng.random() < 0.9 else odd_id(rng)
            count = rng.randrange(1, max(2, total - start + 1)) if start < total else 1
            return Op(name, sp.CONTROL_QUEUE, sp.QUERY_INFO.pack(code, start, count, size),
                      4 + count * size, struct_fields(sp.QUERY_INFO))
        if code == sp.Code.JACK_REMAP:
            cmd = sp.JACK_REMAP.pack(code, rng.randrange(self.jacks + 1),
                                     rng.randrange(4), rng.randrange(16))
            return Op(name, sp.CONTROL_QUEUE, cmd, 4, struct_fields(sp.JACK_REMAP))
        cid = rng.randrange(self.controls + 1) if rng.random() < 0.95 else odd_id(rng)
        head = sp.CTL_HDR.pack(code, cid)
        fields = struct_fields(sp.CTL_HDR)
        if code == sp.Code.CTL_WRITE:
            values = [rng.choice((0, 1, 5, 100, 0x7FFFFFFF, 0xFFFFFFFF, rng.getrandbits(32)))
                      for _ in range(8)]
            body = struct.pack("<8I", *values).ljust(sp.CTL_VALUE_SIZE, b"\0")
            return Op(name, sp.CONTROL_QUEUE, head + body, 4,
                      fields + [(8 + 4 * i, 4) for i in range(8)])
        if code in (sp.Code.CTL_TLV_WRITE, sp.Code.CTL_TLV_COMMAND):
            tlv = struct.pack("<IIiI", sp.TLV_DB_SCALE, 8, -9600, 100)
            return Op(name, sp.CONTROL_QUEUE, head + tlv, 4, fields + [(8, 4), (12, 4)])
        reply = {sp.Code.CTL_READ: 4 + sp.CTL_VALUE_SIZE, sp.Code.CTL_TLV_READ: 4 + 64,
                 sp.Code.CTL_ENUM_ITEMS: 4 + 4 * sp.CTL_ENUM_ITEM_SIZE}.get(code, 4)
        return Op(name, sp.CONTROL_QUEUE, head, reply, fields)

    def check(self, op: Op, writable: int, written: int, data: bytes) -> str | None:
        if op.queue == sp.CONTROL_QUEUE and writable >= 4:
            if written < 4:
                return f"{written} bytes written into {writable}: no status"
            status = int.from_bytes(data[:4], "little")
            if status not in SND_STATUSES:
                return f"status 0x{status:x}"
        return None

    def status(self, op: Op, written: int, data: bytes) -> str:
        if op.queue in (sp.TX_QUEUE, sp.RX_QUEUE) and written >= 8:
            return f"0x{int.from_bytes(data[-8:-4], 'little'):x}"
        return super().status(op, written, data)

    def on_used(self, fz: Fuzzer, op: Op, written: int, data: bytes) -> None:
        if (op.kind == "PCM_SET_PARAMS" and op.note and not op.mutated and written >= 4
                and int.from_bytes(data[:4], "little") == sp.Status.OK):
            sid, frame, period = op.note
            self.params[sid] = (frame, period)

    def probe(self, fz: Fuzzer) -> str | None:
        size = sp.PCM_INFO.size
        got = fz.call(Op("probe PCM_INFO", sp.CONTROL_QUEUE,
                         sp.QUERY_INFO.pack(sp.Code.PCM_INFO, 0, self.streams, size),
                         4 + self.streams * size, mutate=False))
        if got is None:
            return "PCM_INFO got no answer"
        if got[0] < 4 or int.from_bytes(got[1][:4], "little") != sp.Status.OK:
            return f"PCM_INFO answered {got[1][:4].hex()}"
        return None

    def teardown(self, fz: Fuzzer) -> list[Op]:
        self.params = {}
        return [Op(f"teardown {code.name}", sp.CONTROL_QUEUE, sp.PCM_HDR.pack(code, sid), 4,
                   mutate=False)
                for sid in range(self.streams) for code in (sp.Code.PCM_STOP,
                                                             sp.Code.PCM_RELEASE)]


# -- virtio-video ---------------------------------------------------------------------------
VIDEO_RESPONSES = {int(r) for r in vp.Resp}
DECODER_CODED = [vp.Format.H264, vp.Format.H264, vp.Format.H264, vp.Format.VP8, vp.Format.VP9,
                 vp.Format.HEVC, vp.Format.MPEG2, vp.Format.MPEG4]
ENCODER_CODED = [vp.Format.H264, vp.Format.H264, vp.Format.VP8, vp.Format.VP9]
RAW = [vp.Format.NV12, vp.Format.NV12, vp.Format.YUV420]
SIZES = [(96, 64), (96, 64), (176, 144), (64, 48), (16, 16), (0, 0), (17, 9), (4096, 4096),
         (8192, 8192)]


def library() -> list[tuple[int, bytes]]:
    """(virtio-video coded format, packet) of small streams, made once."""
    global _LIBRARY
    if _LIBRARY is None:
        from tests.streams import encode
        out = []
        for codec, fmt, (w, h), n in (("h264", vp.Format.H264, (96, 64), 12),
                                      ("h264", vp.Format.H264, (176, 144), 6),
                                      ("vp8", vp.Format.VP8, (96, 64), 6),
                                      ("vp9", vp.Format.VP9, (96, 64), 6)):
            kw = {"repeat_headers": True} if codec == "h264" else {}
            out += [(fmt, data) for data, _ in encode(codec, w, h, n, **kw)]
        _LIBRARY = [(f, d) for f, d in out if len(d) <= SLOT]
    return _LIBRARY


_LIBRARY: list[tuple[int, bytes]] | None = None


def nv12_size(w: int, h: int) -> int:
    return w * h + 2 * ((w + 1) // 2) * ((h + 1) // 2)


class Video(Target):
    event_queue = vp.EVENT_QUEUE
    event_size = vp.EVENT.size
    features = (1 << vp.F_RESOURCE_GUEST_PAGES) | (1 << vp.F_RESOURCE_NON_CONTIG)
    role = "decoder"

    def qemu_args(self, tmp) -> list[str]:  # noqa: ANN001
        role = ",role=encoder" if self.role == "encoder" else ""
        return ["-device", f"virtio-video-py-pci{role}"]

    def prepare(self, fz: Fuzzer) -> None:
        self.library = library()
        self.state_clear()

    def state_clear(self) -> None:
        self.created: set[int] = set()                 # stream ids STREAM_CREATE went to
        self.resources: dict[tuple[int, int, int], int] = {}   # -> library slot (input) or -1
        self.sizes: dict[int, tuple[int, int]] = {}    # stream -> its picture size

    def initialized(self, fz: Fuzzer) -> None:
        self.state_clear()
        for i, (_, data) in enumerate(self.library):
            self.write_pool(fz, i * SLOT, data.ljust(SLOT, b"\0"))

    def _sid(self, rng: random.Random) -> int:
        return rng.choice((1, 1, 1, 2, 2, 3)) if rng.random() < 0.95 else odd_id(rng)

    def _queue(self, rng: random.Random) -> int:
        r = rng.random()
        return (vp.QueueType.INPUT if r < 0.48 else vp.QueueType.OUTPUT if r < 0.96
                else odd_id(rng))

    def generate(self, rng: random.Random, fz: Fuzzer) -> Op:
        if rng.random() < 0.03:
            return self.event_op(rng)
        C_ = vp.Cmd
        cmd = pick(rng, {C_.QUERY_CAPABILITY: 2, C_.STREAM_CREATE: 7, C_.STREAM_DESTROY: 3,
                         C_.STREAM_DRAIN: 4, C_.RESOURCE_CREATE: 16, C_.RESOURCE_QUEUE: 30,
                         C_.RESOURCE_DESTROY_ALL: 3, C_.QUEUE_CLEAR: 4, C_.GET_PARAMS: 2,
                         C_.GET_PARAMS_EXT: 2, C_.SET_PARAMS: 4, C_.SET_PARAMS_EXT: 5,
                         C_.QUERY_CONTROL: 2, C_.GET_CONTROL: 2, C_.SET_CONTROL: 4, 0: 1})
        name = cmd.name if isinstance(cmd, vp.Cmd) else "unknown"
        sid = self._sid(rng)
        hdr = struct_fields(vp.HDR)
        if cmd == C_.QUERY_CAPABILITY:
            return Op(name, 0, vp.QUERY_CAPABILITY.pack(cmd, 0, self._queue(rng)), 4096,
                      struct_fields(vp.QUERY_CAPABILITY))
        if cmd == C_.STREAM_CREATE:
            coded = rng.choice(DECODER_CODED if self.role == "decoder" else ENCODER_CODED)
            mem = rng.choice((0, 0, 0, 1))
            return Op(name, 0, vp.STREAM_CREATE.pack(cmd, sid, mem, mem, coded, 0, b"fuzz"),
                      8, struct_fields(vp.STREAM_CREATE), note=sid)
        if cmd in (C_.STREAM_DESTROY, C_.STREAM_DRAIN, 0):
            return Op(name, 0, vp.HDR.pack(cmd, sid), 8, hdr,
                      prompt=cmd != C_.STREAM_DRAIN)
        if cmd in (C_.RESOURCE_DESTROY_ALL, C_.QUEUE_CLEAR, C_.GET_PARAMS, C_.GET_PARAMS_EXT):
            reply = 8 + (vp.PARAMS_EXT.size if cmd == C_.GET_PARAMS_EXT else vp.PARAMS.size)
            return Op(name, 0, vp.QUEUE_CMD.pack(cmd, sid, self._queue(rng)), reply,
                      struct_fields(vp.QUEUE_CMD))
        if cmd in (C_.SET_PARAMS, C_.SET_PARAMS_EXT):
            return self._set_params(rng, cmd, sid)
        if cmd == C_.RESOURCE_CREATE:
            return self._resource_create(rng, fz, sid)
        if cmd == C_.RESOURCE_QUEUE:
            return self._resource_queue(rng, sid)
        control = rng.choice(list(vp.Control) + [0, 8, 0xFFFFFFFF])
        if cmd == C_.QUERY_CONTROL:
            fmt = rng.choice(DECODER_CODED + [0])
            return Op(name, 0, vp.QUERY_CONTROL.pack(cmd, sid, control, fmt), 8 + 8 + 4 * 32,
                      struct_fields(vp.QUERY_CONTROL))
        if cmd == C_.GET_CONTROL:
            return Op(name, 0, vp.GET_CONTROL.pack(cmd, sid, control), vp.GET_CONTROL_RESP.size,
                      struct_fields(vp.GET_CONTROL))
        if control in (vp.Control.BITRATE, vp.Control.BITRATE_PEAK):
            value = rng.choice((100000, 500000, 1000000, 4000000, 0, 1, 2, 0x7FFFFFFF,
                                0xFFFFFFFF, rng.randrange(0, 64)))
        else:
            value = rng.choice((0, 1, 2, 3, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(0, 64)))
        return Op(name, 0, vp.SET_CONTROL.pack(cmd, sid, control, value), 8,
                  struct_fields(vp.SET_CONTROL))

    def _set_params(self, rng: random.Random, cmd: int, sid: int) -> Op:
        queue = self._queue(rng)
        w, h = rng.choice(SIZES)
        coded = self.role == "decoder" and queue == vp.QueueType.INPUT or \
            self.role == "encoder" and queue == vp.QueueType.OUTPUT
        fmt = (rng.choice(DECODER_CODED if self.role == "decoder" else ENCODER_CODED)
               if coded else rng.choice(RAW))
        if coded:
            planes = [(rng.choice((0, 4096, 65536, 1 << 20)), 0)]
        elif fmt == vp.Format.NV12:
            planes = [(w * h, w), (w * ((h + 1) // 2), w)]
        else:
            planes = [(w * h, w), ((w + 1) // 2 * ((h + 1) // 2), (w + 1) // 2)] * 2
            planes = planes[:3]
        params = vp.Params(queue, fmt, w, h, rng.choice((0, 1, 4, 32)), 32, (0, 0, w, h),
                           rng.choice((0, 30, 30, 1, 120, 1000)), planes, 0)
        body = params.pack_ext() if cmd == vp.Cmd.SET_PARAMS_EXT else params.pack()
        if not coded and rng.random() < 0.8:
            self.sizes[sid] = (w, h)
        return Op(cmd.name, 0, vp.HDR.pack(cmd, sid) + body, 8,
                  struct_fields(vp.HDR) + struct_fields(vp.PARAMS_EXT, 8))

    def _resource_create(self, rng: random.Random, fz: Fuzzer, sid: int) -> Op:
        queue = self._queue(rng)
        rid = rng.randrange(8) if rng.random() < 0.95 else odd_id(rng)
        w, h = self.sizes.get(sid, (96, 64))
        picture = nv12_size(w, h)
        bitstream_in = (queue == vp.QueueType.INPUT) == (self.role == "decoder")
        slot = -1
        if bitstream_in:
            slot = rng.randrange(len(self.library))
            base, size = fz.pool + slot * SLOT, SLOT
            if self.role == "encoder":
                base, size = self.scratch(fz, 100 + rid), rng.choice((4096, 65536, 1 << 18))
        else:
            base = self.scratch(fz, (sid % 4) * 16 + rid % 16)
            size = min(rng.choice((picture, picture, 4096, 65536, SCRATCH_SLOT, 100)),
                       SCRATCH_SLOT)
        n = rng.choice((1, 1, 1, 2, 3, 4))
        if size < n * 4096:
            n = 1
        step = size // n
        entries = [(base + i * step, step if i + 1 < n else size - i * step) for i in range(n)]
        if rng.random() < 0.05:
            entries.append((rng.choice((0, 0xFFFFFFFFF000, 1 << 32)), 4096))
        layout = vp.PlanesLayout.SINGLE_BUFFER if rng.random() < 0.85 else vp.PlanesLayout.PER_PLANE
        num_planes = 1 if bitstream_in or rng.random() < 0.5 else 2
        offsets = [0, w * h][:num_planes] + [0] * (8 - num_planes)
        counts = [len(entries)] + [0] * 7
        if layout == vp.PlanesLayout.PER_PLANE and num_planes == 2 and len(entries) >= 2:
            counts = [1, len(entries) - 1] + [0] * 6
        cmd = vp.RESOURCE_CREATE.pack(vp.Cmd.RESOURCE_CREATE, sid, queue, rid, layout,
                                      num_planes, *offsets, *counts)
        body = b"".join(vp.MEM_ENTRY.pack(a, n) for a, n in entries)
        fields = struct_fields(vp.RESOURCE_CREATE) + [
            (vp.RESOURCE_CREATE.size + 16 * i + o, s) for i in range(len(entries))
            for o, s in ((0, 8), (8, 4))]
        return Op("RESOURCE_CREATE", 0, cmd + body, 8, fields,
                  note=(sid, queue, rid, slot))

    def _resource_queue(self, rng: random.Random, sid: int) -> Op:
        made = [key for key in self.resources if key[0] == sid]
        if made and rng.random() < 0.85:
            _, queue, rid = rng.choice(made)
        else:
            queue = self._queue(rng)
            rid = rng.randrange(8) if rng.random() < 0.95 else odd_id(rng)
        slot = self.resources.get((sid, queue, rid), -1)
        if slot >= 0 and rng.random() < 0.9:
            size = len(self.library[slot][1])
        else:
            size = rng.choice((0, 1, 100, 4096, SLOT, SLOT + 1, 0xFFFFFFFF))
        n = 1 if rng.random() < 0.9 else rng.choice((0, 2, 8, 9))
        sizes = [size] + [rng.randrange(0, 4096) for _ in range(7)]
        cmd = vp.RESOURCE_QUEUE.pack(vp.Cmd.RESOURCE_QUEUE, sid, queue, rid,
                                     rng.getrandbits(40), n, *sizes)
        return Op("RESOURCE_QUEUE", 0, cmd, vp.RESOURCE_QUEUE_RESP.size,
                  struct_fields(vp.RESOURCE_QUEUE), prompt=False)

    def prompt(self, op: Op) -> bool:
        if op.queue != vp.COMMAND_QUEUE:
            return super().prompt(op)
        held = (vp.Cmd.RESOURCE_QUEUE, vp.Cmd.STREAM_DRAIN)
        return len(op.out) < 4 or int.from_bytes(op.out[:4], "little") not in held

    def check(self, op: Op, writable: int, written: int, data: bytes) -> str | None:
        if op.queue == vp.COMMAND_QUEUE and writable >= 8:
            if written < 8:
                return f"{written} bytes written into {writable}: no response header"
            kind = int.from_bytes(data[:4], "little")
            if kind not in VIDEO_RESPONSES:
                return f"response type 0x{kind:x}"
        return None

    def status(self, op: Op, written: int, data: bytes) -> str:
        if op.queue == vp.COMMAND_QUEUE and written >= 4:
            kind = int.from_bytes(data[:4], "little")
            if op.kind == "RESOURCE_QUEUE" and written >= 24 and kind < 0x300:
                flags = int.from_bytes(data[16:20], "little")
                return f"{vp.Resp(kind).name} flags 0x{flags:x}"
            return vp.Resp(kind).name if kind in VIDEO_RESPONSES else hex(kind)
        return super().status(op, written, data)

    def on_used(self, fz: Fuzzer, op: Op, written: int, data: bytes) -> None:
        if (op.kind == "RESOURCE_CREATE" and op.note and not op.mutated and written >= 8
                and int.from_bytes(data[:4], "little") == vp.Resp.OK_NODATA):
            sid, queue, rid, slot = op.note
            self.resources[(sid, queue, rid)] = slot

    def keep_off_driver(self, fz: Fuzzer, op: Op) -> None:
        if (op.queue == vp.COMMAND_QUEUE and len(op.out) > vp.RESOURCE_CREATE.size
                and int.from_bytes(op.out[:4], "little") == vp.Cmd.RESOURCE_CREATE):
            data = bytearray(op.out)
            self._move_ranges(fz, data, vp.RESOURCE_CREATE.size, vp.MEM_ENTRY.size)
            op.out = bytes(data)

    def submitted(self, op: Op) -> None:
        """Streams a STREAM_CREATE may have made (whatever comes back)."""
        if len(op.out) >= 8 and int.from_bytes(op.out[:4], "little") == vp.Cmd.STREAM_CREATE:
            self.created.add(int.from_bytes(op.out[4:8], "little"))

    def probe(self, fz: Fuzzer) -> str | None:
        got = fz.call(Op("probe QUERY_CAPABILITY", 0,
                         vp.QUERY_CAPABILITY.pack(vp.Cmd.QUERY_CAPABILITY, 0,
                                                  vp.QueueType.INPUT), 4096, mutate=False))
        if got is None:
            return "QUERY_CAPABILITY got no answer"
        if got[0] < 8 or int.from_bytes(got[1][:4], "little") != vp.Resp.OK_QUERY_CAPABILITY:
            return f"QUERY_CAPABILITY answered {got[1][:8].hex()}"
        return None

    def teardown(self, fz: Fuzzer) -> list[Op]:
        """Every stream a STREAM_CREATE went to, whatever its reply said."""
        ops = []
        ids = sorted(self.created | {1, 2, 3})
        self.state_clear()
        for sid in ids:
            ops.append(Op("teardown STREAM_DESTROY", 0,
                          vp.HDR.pack(vp.Cmd.STREAM_DESTROY, sid), 8, mutate=False))
        return ops


class VideoDecoder(Video):
    device_id = vp.DECODER_DEVICE_ID
    role = "decoder"


class VideoEncoder(Video):
    device_id = vp.ENCODER_DEVICE_ID
    role = "encoder"


# -- virtio-media -------------------------------------------------------------------------------
NAMES = {io.name: io for io in mp.IOCTLS.values()}
CAMERA_CONFIG = """
[camera]
source = "pattern"
sizes = ["64x48", "160x120", "320x240"]
frame_rates = [30, 60, 120]
"""
CTRL_IDS = [v4l2.CID_BRIGHTNESS, v4l2.CID_CONTRAST, v4l2.CID_SATURATION, v4l2.CID_TEST_PATTERN,
            v4l2.CID_MIN_BUFFERS_FOR_CAPTURE, v4l2.CTRL_CLASS_USER | 1,
            v4l2.CTRL_CLASS_CAMERA | 1, v4l2.CTRL_CLASS_IMAGE_PROC | 1, 0,
            v4l2.CTRL_FLAG_NEXT_CTRL, v4l2.CTRL_FLAG_NEXT_CTRL | v4l2.CTRL_FLAG_NEXT_COMPOUND,
            v4l2.CID_BRIGHTNESS | v4l2.CTRL_FLAG_NEXT_CTRL]
RAW_FOURCCS = [v4l2.fourcc(f) for f in ("YUYV", "NV12", "YU12")]
CODED_FOURCCS = [v4l2.fourcc(f) for f in ("H264", "H264", "VP80", "VP90", "HEVC", "MPG2",
                                            "MPG4")]
MEDIA_SIZES = [(64, 48), (160, 120), (320, 240), (96, 64), (176, 144), (0, 0), (1, 1),
               (4096, 4096), (65535, 65535)]
SELECTION_TARGETS = [v4l2.SEL_TGT_CROP, v4l2.SEL_TGT_CROP_DEFAULT, v4l2.SEL_TGT_CROP_BOUNDS,
                     v4l2.SEL_TGT_COMPOSE, v4l2.SEL_TGT_COMPOSE_DEFAULT,
                     v4l2.SEL_TGT_COMPOSE_BOUNDS, v4l2.SEL_TGT_COMPOSE_PADDED, 0xFFFF]
PLANE = C.sizeof(v4l2.Plane)
EXT_CONTROL = C.sizeof(v4l2.ExtControl)


class Media(Target):
    device_id = mp.DEVICE_ID
    event_queue = mp.EVENT_QUEUE
    event_size = mp.EVENT_SIZE
    role = "camera"
    shm = "16M"

    def qemu_args(self, tmp) -> list[str]:  # noqa: ANN001
        cfg = tmp / "media.toml"
        cfg.write_text(CAMERA_CONFIG)
        role = ",role=decoder" if self.role == "decoder" else ""
        return ["-device", f"virtio-media-py-pci,shm-size={self.shm},config={cfg}{role}"]

    def prepare(self, fz: Fuzzer) -> None:
        self.library = library() if self.role == "decoder" else []
        self.state_clear()

    def state_clear(self) -> None:
        self.sessions: list[int] = []
        self.offsets: list[int] = []        # MMAP offsets QUERYBUF & co. reported
        self.mapped: list[int] = []         # what CMD_MMAP mapped, not yet unmapped
        self.queues: dict[int, tuple[int, int]] = {}   # buffer type -> (memory, count)
        self.owner: dict[int, int] = {}                # buffer type -> session with buffers
        self.sizeimage: dict[int, int] = {}            # buffer type -> from G/S_FMT
        # Session ids go up by one an OPEN, reset or not: every id from
        # ``low`` to the highest seen plus the OPENs whose reply did not
        # say may be open, and the teardown closes them all.
        self.low = getattr(self, "high", 0) + getattr(self, "unseen", 0) + 1
        self.high = self.low - 1
        self.unseen = 0

    def initialized(self, fz: Fuzzer) -> None:
        self.state_clear()
        for i, (_, data) in enumerate(self.library):
            self.write_pool(fz, i * SLOT, data.ljust(SLOT, b"\0"))

    def _session(self, rng: random.Random) -> int:
        r = rng.random()
        if self.sessions and r < 0.5:
            return self.sessions[0]         # the oldest: it likely owns the buffers
        if self.sessions and r < 0.92:
            return rng.choice(self.sessions[-4:])
        return rng.choice((0, 1, 2, odd_id(rng)))

    def _type(self, rng: random.Random) -> int:
        if self.role == "camera":
            return v4l2.BUF_TYPE_VIDEO_CAPTURE if rng.random() < 0.9 else rng.choice(
                (2, 9, 10, 0, 0xFFFFFFFF))
        r = rng.random()
        return (v4l2.BUF_TYPE_VIDEO_OUTPUT_MPLANE if r < 0.47
                else v4l2.BUF_TYPE_VIDEO_CAPTURE_MPLANE if r < 0.94
                else rng.choice((1, 2, 0, 0xFFFFFFFF)))

    def generate(self, rng: random.Random, fz: Fuzzer) -> Op:
        r = rng.random()
        if r < 0.06 and len(self.sessions) < 3 or r < 0.02 or not self.sessions and r < 0.5:
            return Op("OPEN", 0, mp.HEADER.pack(mp.Cmd.OPEN, 0), mp.OPEN_REPLY.size,
                      struct_fields(mp.HEADER))
        if r < 0.08:
            sid = self._session(rng)
            return Op("CLOSE", 0, struct.pack("<IIII", mp.Cmd.CLOSE, 0, sid, 0), 0,
                      [(0, 4), (8, 4)], note=sid)
        if r < 0.13:
            offset = rng.choice(self.offsets) if self.offsets and rng.random() < 0.85 \
                else rng.choice((0, 4096, 1 << 24, 0xFFFFFFFF, rng.getrandbits(32)))
            cmd = mp.MMAP.pack(mp.Cmd.MMAP, 0, self._session(rng), rng.choice((0, 1, 1, 2)),
                               offset)
            return Op("MMAP", 0, cmd, mp.MMAP_REPLY.size, struct_fields(mp.MMAP))
        if r < 0.16:
            addr = rng.choice(self.mapped) if self.mapped and rng.random() < 0.85 \
                else rng.choice((0, 4096, 1 << 40, rng.getrandbits(64)))
            return Op("MUNMAP", 0, mp.MUNMAP.pack(mp.Cmd.MUNMAP, 0, addr), 8,
                      struct_fields(mp.MUNMAP), note=addr)
        if r < 0.18:
            return self.event_op(rng)
        if r < 0.185:
            return Op("unknown", 0, struct.pack("<II", rng.choice((0, 6, 0xFFFFFFFF)), 0), 8,
                      [(0, 4), (4, 4)])
        return self._ioctl(rng, fz)

    # -- IOCTL payloads ----------------------------------------------------------------------
    def _ioctl(self, rng: random.Random, fz: Fuzzer) -> Op:
        decoder = self.role == "decoder"
        name = pick(rng, {
            "enum_fmt": 3, "g_fmt": 3, "s_fmt": 6, "try_fmt": 3, "reqbufs": 8, "querybuf": 6,
            "qbuf": 16, "streamon": 7, "streamoff": 4, "g_parm": 1, "s_parm": 2, "g_std": 1,
            "s_std": 1, "enuminput": 1, "g_ctrl": 2, "s_ctrl": 3, "queryctrl": 2,
            "querymenu": 2, "g_input": 1, "s_input": 1, "g_output": 1, "s_output": 1,
            "querystd": 1, "g_priority": 1, "s_priority": 1, "g_ext_ctrls": 2,
            "s_ext_ctrls": 3, "try_ext_ctrls": 1, "enum_framesizes": 2,
            "enum_frameintervals": 2, "subscribe_event": 4, "unsubscribe_event": 1,
            "create_bufs": 4, "prepare_buf": 4, "g_selection": 2, "s_selection": 1,
            "decoder_cmd": 6 if decoder else 1, "try_decoder_cmd": 1, "query_ext_ctrl": 2,
            "bogus": 1})
        session = self._session(rng)
        if name in ("qbuf", "prepare_buf", "querybuf", "streamon", "streamoff", "reqbufs",
                    "create_bufs") and self.owner and rng.random() < 0.7:
            session = rng.choice(list(self.owner.values()))
        if name == "bogus":
            code = rng.choice((0, 17, 89, 1000, 0xFFFFFFFF))
            return Op("IOCTL bogus", 0, mp.IOCTL.pack(mp.Cmd.IOCTL, 0, session, code), 8,
                      struct_fields(mp.IOCTL))
        io = NAMES[name]
        payload, extra, *sg = getattr(self, "_p_" + name, self._p_default)(rng, io, fz)
        head = mp.IOCTL.pack(mp.Cmd.IOCTL, 0, session, io.code)
        fields = struct_fields(mp.IOCTL) + [(16 + o, s) for o, s in ctypes_fields(io.payload)]
        # USERPTR scatter lists go to the device only.
        readable = head + (bytes(payload) + extra + b"".join(sg) if io.direction & mp.W
                           else b"")
        writable = 8 + (io.size + len(extra) if io.direction & mp.R else 0)
        return Op(f"IOCTL {name}", 0, readable, writable, fields,
                  note=(name, payload, session))

    def _p_default(self, rng: random.Random, io: mp.Ioctl, fz: Fuzzer) -> tuple[Any, bytes]:
        payload = io.payload()
        data = bytearray(bytes(payload))
        for off, size in rng.sample(ctypes_fields(io.payload),
                                    min(2, len(ctypes_fields(io.payload)))):
            data[off:off + size] = rng.choice((0, 0, 1, rng.getrandbits(8))).to_bytes(
                size, "little")
        return io.payload.parse(bytes(data)), b""

    def _fmt(self, rng: random.Random, buf_type: int) -> v4l2.Format:
        f = v4l2.Format()
        f.type = buf_type
        w, h = rng.choice(MEDIA_SIZES)
        if buf_type in v4l2.MPLANE_TYPES:
            pix = f.fmt.pix_mp
            pix.width, pix.height = w, h
            pix.pixelformat = rng.choice(CODED_FOURCCS if buf_type ==
                                         v4l2.BUF_TYPE_VIDEO_OUTPUT_MPLANE else RAW_FOURCCS)
            pix.num_planes = rng.choice((1, 1, 1, 0, 2, 8, 9))
            pix.plane_fmt[0].sizeimage = rng.choice((0, 4096, 65536, 1 << 20, 16 << 20,
                                                     0xFFFFFFFF, nv12_size(w, h)))
            pix.plane_fmt[0].bytesperline = w
        else:
            pix = f.fmt.pix
            pix.width, pix.height = w, h
            pix.pixelformat = rng.choice(RAW_FOURCCS + [rng.getrandbits(32)])
            pix.sizeimage = rng.choice((0, 2 * w * h, 1 << 20))
            pix.bytesperline = 2 * w
        return f

    def _p_g_fmt(self, rng, io, fz):  # noqa: ANN001, ANN202
        return self._fmt(rng, self._type(rng)), b""

    _p_s_fmt = _p_try_fmt = _p_g_fmt

    def _p_enum_fmt(self, rng, io, fz):  # noqa: ANN001, ANN202
        f = v4l2.Fmtdesc()
        f.index, f.type = rng.choice((0, 0, 1, 2, 3, 7, 0xFFFFFFFF)), self._type(rng)
        return f, b""

    def _memory(self, rng: random.Random) -> int:
        r = rng.random()
        return (v4l2.MEMORY_MMAP if r < 0.5 else v4l2.MEMORY_USERPTR if r < 0.95
                else rng.choice((0, v4l2.MEMORY_DMABUF, 3, 0xFFFFFFFF)))

    def _p_reqbufs(self, rng, io, fz):  # noqa: ANN001, ANN202
        r = v4l2.RequestBuffers()
        r.count = rng.choice((0, 1, 2, 3, 4, 4, 8, 32, 33, 1000, 0xFFFFFFFF))
        r.type, r.memory = self._type(rng), self._memory(rng)
        return r, b""

    def _p_create_bufs(self, rng, io, fz):  # noqa: ANN001, ANN202
        cb = v4l2.CreateBuffers()
        cb.count = rng.choice((0, 1, 2, 4, 32, 0xFFFFFFFF))
        cb.memory = self._memory(rng)
        cb.format = self._fmt(rng, self._type(rng))
        return cb, b""

    def _buffer(self, rng: random.Random, fz: Fuzzer, queueing: bool) -> tuple[Any, ...]:
        b = v4l2.Buffer()
        b.type = self._type(rng)
        memory, count = self.queues.get(b.type, (0, 0))
        if count and rng.random() < 0.85:
            b.index, b.memory = rng.randrange(count), memory
        else:
            b.index = rng.randrange(8) if rng.random() < 0.95 else odd_id(rng)
            b.memory = self._memory(rng)
        b.timestamp.tv_sec, b.timestamp.tv_usec = rng.randrange(1000), rng.randrange(1000000)
        b.field = rng.choice((0, 1, 1, 7))
        mplane = b.type in v4l2.MPLANE_TYPES
        output = b.type in (v4l2.BUF_TYPE_VIDEO_OUTPUT, v4l2.BUF_TYPE_VIDEO_OUTPUT_MPLANE)
        length, bytesused, address = 0, 0, 0
        if output and self.library:
            slot = rng.randrange(len(self.library))
            address = fz.pool + slot * SLOT
            bytesused = len(self.library[slot][1]) if rng.random() < 0.9 else rng.choice(
                (0, 1, SLOT, 1 << 24, 0xFFFFFFFF))
            length = rng.choice((SLOT, SLOT, 1 << 20, bytesused or 1))
        else:
            address = self.scratch(fz, rng.randrange(32))
            length = rng.choice((6144, 38400, 153600, 65536, 4096, 1 << 20, nv12_size(96, 64),
                                 nv12_size(176, 144), 0))
            if b.type in self.sizeimage and rng.random() < 0.7:
                length = min(self.sizeimage[b.type], SCRATCH_SLOT)
            bytesused = rng.choice((0, length))
        sg = b""
        if b.memory == v4l2.MEMORY_USERPTR and queueing and length:
            n = rng.choice((1, 1, 1, 2, 3, -(-length // 4096)))
            step = -(-length // n)
            entries = [(address + i * step, min(step, length - i * step)) for i in range(n)
                       if length - i * step > 0]
            if rng.random() < 0.05:
                entries[0] = (rng.choice((0, 1 << 40, 1 << 32)), entries[0][1])
            sg = b"".join(mp.SG_ENTRY.pack(a, s, 0) for a, s in entries)
        if mplane:
            b.length = rng.choice((1, 1, 1, 0, 2, 8, 9))
            plane = v4l2.Plane()
            plane.bytesused, plane.length = bytesused, length
            plane.m.userptr = 0x7F0000000000 + rng.getrandbits(20) * 4096
            planes = bytes(plane) + bytes(PLANE) * (min(b.length, 8) - 1 if b.length else 0)
            return b, planes, sg
        b.bytesused, b.length = bytesused, length
        b.m.userptr = 0x7F0000000000 + rng.getrandbits(20) * 4096
        return b, b"", sg

    def _p_querybuf(self, rng, io, fz):  # noqa: ANN001, ANN202
        return self._buffer(rng, fz, queueing=False)

    def _p_qbuf(self, rng, io, fz):  # noqa: ANN001, ANN202
        return self._buffer(rng, fz, queueing=True)

    _p_prepare_buf = _p_qbuf

    def _p_streamon(self, rng, io, fz):  # noqa: ANN001, ANN202
        t = v4l2.Int()
        t.value = self._type(rng)
        return t, b""

    _p_streamoff = _p_streamon

    def _p_s_parm(self, rng, io, fz):  # noqa: ANN001, ANN202
        parm = v4l2.StreamParm()
        parm.type = self._type(rng)
        tpf = parm.parm.capture.timeperframe
        tpf.numerator, tpf.denominator = rng.choice(((1, 30), (1, 60), (1, 15), (0, 0), (1, 0),
                                                    (0xFFFFFFFF, 1), (1, 0xFFFFFFFF)))
        return parm, b""

    _p_g_parm = _p_s_parm

    def _control(self, rng: random.Random) -> int:
        return rng.choice(CTRL_IDS) if rng.random() < 0.95 else rng.getrandbits(32)

    def _value(self, rng: random.Random) -> int:
        return rng.choice((0, 1, 2, 3, 127, 128, 255, 256, -128, -129, 0x7FFFFFFF, -1))

    def _p_g_ctrl(self, rng, io, fz):  # noqa: ANN001, ANN202
        c = v4l2.Control()
        c.id, c.value = self._control(rng), self._value(rng)
        return c, b""

    _p_s_ctrl = _p_g_ctrl

    def _p_queryctrl(self, rng, io, fz):  # noqa: ANN001, ANN202
        q = io.payload()
        q.id = self._control(rng)
        return q, b""

    _p_query_ext_ctrl = _p_queryctrl

    def _p_querymenu(self, rng, io, fz):  # noqa: ANN001, ANN202
        m = v4l2.Querymenu()
        m.id, m.index = self._control(rng), rng.choice((0, 1, 2, 3, 7, 0xFFFFFFFF))
        return m, b""

    def _p_g_ext_ctrls(self, rng, io, fz):  # noqa: ANN001, ANN202
        ec = v4l2.ExtControls()
        ec.which = rng.choice((v4l2.CTRL_WHICH_CUR_VAL, v4l2.CTRL_WHICH_CUR_VAL,
                               v4l2.CTRL_WHICH_DEF_VAL, v4l2.CTRL_WHICH_REQUEST_VAL,
                               v4l2.CTRL_CLASS_USER, v4l2.CTRL_CLASS_CAMERA, 0xFFFFFFFF))
        ec.count = rng.choice((0, 1, 1, 2, 3))
        ec.controls = 0x7F0000000000
        controls = b""
        for _ in range(ec.count):
            c = v4l2.ExtControl()
            c.id, c.size = self._control(rng), rng.choice((0, 0, 4, 8, 0xFFFFFFFF))
            c.u.value = self._value(rng)
            controls += bytes(c)
        return ec, controls

    _p_s_ext_ctrls = _p_try_ext_ctrls = _p_g_ext_ctrls

    def _p_enum_framesizes(self, rng, io, fz):  # noqa: ANN001, ANN202
        f = v4l2.Frmsizeenum()
        f.index = rng.choice((0, 0, 1, 2, 3, 0xFFFFFFFF))
        f.pixel_format = rng.choice(RAW_FOURCCS + CODED_FOURCCS + [0])
        return f, b""

    def _p_enum_frameintervals(self, rng, io, fz):  # noqa: ANN001, ANN202
        f = v4l2.Frmivalenum()
        f.index = rng.choice((0, 0, 1, 2, 3, 0xFFFFFFFF))
        f.pixel_format = rng.choice(RAW_FOURCCS + [0])
        f.width, f.height = rng.choice(MEDIA_SIZES)
        return f, b""

    def _p_subscribe_event(self, rng, io, fz):  # noqa: ANN001, ANN202
        s = v4l2.EventSubscription()
        s.type = rng.choice((v4l2.EVENT_CTRL, v4l2.EVENT_CTRL, v4l2.EVENT_SOURCE_CHANGE,
                             v4l2.EVENT_SOURCE_CHANGE, v4l2.EVENT_EOS, 0, 0xFFFFFFFF))
        s.id = self._control(rng) if s.type == v4l2.EVENT_CTRL else rng.choice((0, 0, 1))
        s.flags = rng.choice((0, v4l2.EVENT_SUB_FL_SEND_INITIAL, 0xFFFFFFFF))
        return s, b""

    _p_unsubscribe_event = _p_subscribe_event

    def _p_g_selection(self, rng, io, fz):  # noqa: ANN001, ANN202
        s = v4l2.Selection()
        s.type = rng.choice((1, 1, 9, 2, 10))
        s.target = rng.choice(SELECTION_TARGETS)
        s.r.width, s.r.height = rng.choice(MEDIA_SIZES)
        return s, b""

    _p_s_selection = _p_g_selection

    def _p_decoder_cmd(self, rng, io, fz):  # noqa: ANN001, ANN202
        d = v4l2.DecoderCmd()
        d.cmd = rng.choice((v4l2.DEC_CMD_START, v4l2.DEC_CMD_STOP, v4l2.DEC_CMD_STOP,
                            v4l2.DEC_CMD_PAUSE, v4l2.DEC_CMD_RESUME, 0xFFFFFFFF))
        d.flags = rng.choice((0, 0, 0, 1, 2))
        return d, b""

    _p_try_decoder_cmd = _p_decoder_cmd

    def _p_s_input(self, rng, io, fz):  # noqa: ANN001, ANN202
        i = v4l2.Int()
        i.value = rng.choice((0, 0, 1, 0xFFFFFFFF))
        return i, b""

    _p_s_output = _p_s_priority = _p_g_input = _p_s_input

    def _p_enuminput(self, rng, io, fz):  # noqa: ANN001, ANN202
        i = v4l2.Input()
        i.index = rng.choice((0, 0, 1, 0xFFFFFFFF))
        return i, b""

    # -- replies ------------------------------------------------------------------------------
    def check(self, op: Op, writable: int, written: int, data: bytes) -> str | None:
        if op.queue != mp.COMMAND_QUEUE or op.out[:4] == struct.pack("<I", mp.Cmd.CLOSE):
            return None
        if writable >= 8 and written < 8:
            return f"{written} bytes written into {writable}: no reply header"
        if written >= 4:
            status = int.from_bytes(data[:4], "little")
            if status and not 0 < status < 4096:
                return f"status {status}"
        return None

    def status(self, op: Op, written: int, data: bytes) -> str:
        if op.queue == mp.COMMAND_QUEUE and written >= 4:
            status = int.from_bytes(data[:4], "little")
            return errno.errorcode.get(status, str(status)) if status else "OK"
        return super().status(op, written, data)

    def on_used(self, fz: Fuzzer, op: Op, written: int, data: bytes) -> None:
        if op.queue != mp.COMMAND_QUEUE or written < 8 or int.from_bytes(data[:4], "little"):
            if op.kind.startswith("CLOSE") and len(op.out) >= 12:
                self._forget(int.from_bytes(op.out[8:12], "little"))
            return
        if op.kind in ("OPEN", "probe OPEN") and written >= 12:
            sid = int.from_bytes(data[8:12], "little")
            self.unseen -= 1
            self.high = max(self.high, sid)
            if sid not in self.sessions and op.kind == "OPEN":
                self.sessions.append(sid)
        elif op.kind == "MMAP" and written >= 16:
            self.mapped.append(int.from_bytes(data[8:16], "little"))
        elif op.kind.startswith("MUNMAP") and op.note in self.mapped:
            self.mapped.remove(op.note)
        elif op.kind in ("IOCTL reqbufs", "IOCTL create_bufs") and len(op.out) >= 16:
            # What was sent (mutated or not) and what came back.
            session, code = struct.unpack_from("<II", op.out, 8)
            if code == NAMES["reqbufs"].code:
                payload = v4l2.RequestBuffers.parse(op.out[16:])
                buf_type, count = payload.type, v4l2.RequestBuffers.parse(data[8:]).count
            elif code == NAMES["create_bufs"].code:
                payload = v4l2.CreateBuffers.parse(op.out[16:])
                cb = v4l2.CreateBuffers.parse(data[8:])
                buf_type, count = payload.format.type, cb.index + cb.count
            else:
                return
            self.queues[buf_type] = (payload.memory, count)
            if count:
                self.owner[buf_type] = session
            else:
                self.owner.pop(buf_type, None)
        elif op.kind in ("IOCTL g_fmt", "IOCTL s_fmt") and not op.mutated:
            f = v4l2.Format.parse(data[8:])
            self.sizeimage[f.type] = (f.fmt.pix_mp.plane_fmt[0].sizeimage
                                      if f.type in v4l2.MPLANE_TYPES else f.fmt.pix.sizeimage)
        elif op.kind in ("IOCTL querybuf", "IOCTL qbuf", "IOCTL prepare_buf") \
                and written >= 8 + C.sizeof(v4l2.Buffer):
            b = v4l2.Buffer.parse(data[8:])
            if b.memory == v4l2.MEMORY_MMAP:
                offset = b.m.offset
                if b.type in v4l2.MPLANE_TYPES and written >= 8 + C.sizeof(v4l2.Buffer) + PLANE:
                    offset = v4l2.Plane.parse(data[8 + C.sizeof(v4l2.Buffer):]).m.mem_offset
                if offset not in self.offsets:
                    self.offsets = [*self.offsets[-31:], offset]

    def keep_off_driver(self, fz: Fuzzer, op: Op) -> None:
        # USERPTR scatter lists follow the v4l2_buffer and its planes (at an
        # offset that is 8 mod 16): every 8 bytes after the buffer is looked at.
        head = mp.IOCTL.size + C.sizeof(v4l2.Buffer)
        if (op.queue == mp.COMMAND_QUEUE and len(op.out) > head
                and int.from_bytes(op.out[:4], "little") == mp.Cmd.IOCTL):
            data = bytearray(op.out)
            self._move_ranges(fz, data, head, 8)
            op.out = bytes(data)

    def submitted(self, op: Op) -> None:
        if len(op.out) >= 8 and int.from_bytes(op.out[:4], "little") == mp.Cmd.OPEN:
            self.unseen += 1

    def _forget(self, sid: Any) -> None:
        if sid in self.sessions:
            self.sessions.remove(sid)
        for buf_type, owner in list(self.owner.items()):
            if owner == sid:
                del self.owner[buf_type]
                self.queues.pop(buf_type, None)

    def probe(self, fz: Fuzzer) -> str | None:
        got = fz.call(Op("probe OPEN", 0, mp.HEADER.pack(mp.Cmd.OPEN, 0), mp.OPEN_REPLY.size,
                         mutate=False))
        if got is None:
            return "OPEN got no answer"
        written, data = got
        status = int.from_bytes(data[:4], "little") if written >= 4 else -1
        if status == errno.ENOMEM:          # max_sessions open: answered all the same
            return None
        if written < 16 or status:
            return f"OPEN answered {data.hex()}"
        return None

    def teardown(self, fz: Fuzzer) -> list[Op]:
        ops = [Op("teardown MUNMAP", 0, mp.MUNMAP.pack(mp.Cmd.MUNMAP, 0, a), 8, mutate=False,
                  note=a) for a in self.mapped]
        upper = self.high + max(self.unseen, 0)
        ops += [Op("CLOSE teardown", 0, struct.pack("<IIII", mp.Cmd.CLOSE, 0, sid, 0), 0,
                   mutate=False, note=sid) for sid in range(self.low, upper + 1)]
        self.mapped, self.offsets, self.sessions = [], [], []
        self.owner, self.queues = {}, {}
        self.low, self.high, self.unseen = upper + 1, upper, 0
        return ops


class MediaCamera(Media):
    role = "camera"


class MediaDecoder(Media):
    role = "decoder"


TARGETS = {"snd": Snd, "video-decoder": VideoDecoder, "video-encoder": VideoEncoder,
           "media-camera": MediaCamera, "media-decoder": MediaDecoder}


def make_target(name: str) -> Target:
    return TARGETS[name]()
