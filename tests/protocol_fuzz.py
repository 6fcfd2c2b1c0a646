"""A structured protocol fuzzer of pyemb's devices, on the host driver.

Each device (:data:`DEVICES`: ``snd``, ``video-decoder``, ``video-encoder``,
``media-camera``, ``media-decoder``) has a generator in
:mod:`tests.fuzz_targets` that makes one *input* at a time: one request on
one virtqueue, a valid command of that protocol built with the protocol
modules (every command code, with the ids of streams, sessions, resources
and buffers the driver side knows of, so that deep paths are reached), then
mutated here: fields overwritten with boundary values (0, 1, -1,
0x7fffffff, huge sizes) or random ones, the command truncated or extended,
the chain cut into random descriptor pieces (direct or through an indirect
table), its writable part too small, oversized or absent; event buffers of
odd sizes; at a low rate a device reset (the driver initializes the device
again).  Never a zero-length descriptor, a writable descriptor before a
readable one or an address outside guest RAM: QEMU's own virtqueue code
marks the device broken for those, which is not our models' business (QEMU's
generic-fuzz covers that layer).

Input ``k`` of ``(device, seed)`` is always made by the same random stream
(``random.Random`` seeded with device, seed and k), so a run is named by
``(device, seed, start, stop)`` and replays as it ran: ids the device hands
out (virtio-media sessions, MMAP offsets) are taken from its replies, which
a fresh QEMU gives again, up to the devices' own timing (worker threads).

Oracles, at every *checkpoint* (after each input whose index is a multiple
of ``batch``, and at the end):

- QEMU is alive (a crash is caught at once, on the qtest socket), its main
  loop answers qtest within :data:`MAIN_LOOP_S` (a hang, with gdb's
  backtraces of QEMU's threads), and no request holds that loop up longer
  than :data:`STALL_S` (a stall: timed at every notification);
- no queue hangs: every request the device answers at once (everything but
  PCM transfers, RESOURCE_QUEUE, STREAM_DRAIN and event buffers) is
  answered within :data:`PROMPT_S`; a known-good request (PCM_INFO,
  QUERY_CAPABILITY, CMD_OPEN) is answered within :data:`PROMPT_S`; after
  the driver tears everything down (PCM_STOP + PCM_RELEASE, STREAM_DESTROY,
  MUNMAP + CMD_CLOSE), every request the device held comes back within
  :data:`HELD_S`; the device did not set NEEDS_RESET;
- after each request: the used length is within the writable buffers, and
  a reply's status is one of the protocol's;
- QEMU's stderr: no Python traceback and no other sign of a model bug
  (:data:`MODEL_BUGS`: the shim's stale-view warning, a Python warning), and
  at most :data:`STDERR_BATCH_BOUND` bytes a checkpoint and
  :data:`STDERR_RUN_BOUND` bytes a QEMU (a run, however long): a guest
  cannot flood the host's log;
- growth, sampled after each teardown: QEMU's anonymous RSS and its thread
  count do not keep rising (:func:`growth`: the last quarter's floor at most
  :data:`RSS_BOUND_KB`, :data:`THREADS_BOUND` above the first half's top).

``run(device, seed, start, stop)`` runs a range and stops at the first
finding; ``minimise`` bisects a finding's range; corpus cases are JSON files
in :data:`CORPUS` (see ``bench/protocol_fuzz.py``): the range, what tripped,
and the inputs as they went (replayed instead of the range once the
generators change: :data:`GENERATORS`).  Rates on this 2-core machine, shared:
see README.md, "Tests and benchmarks".
"""

from __future__ import annotations

import base64
import ctypes as C
import json
import random
import re
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.hostdriver import Machine, QemuExited
from tests.hostdriver.qtest import QTestError
from tests.hostdriver.virtio import (
    ACKNOWLEDGE,
    DESC,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    NEEDS_RESET,
    U16,
    USED_ELEM,
    VIRTIO_F_VERSION_1,
    store_u16,
)

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "fuzz-corpus" / "protocol"
DEVICES = ("snd", "video-decoder", "video-encoder", "media-camera", "media-decoder")
# Which inputs a (device, seed, index) names: bump a device's with any change
# to its generator (tests/fuzz_targets.py) or to the mutator that changes
# them, so that older corpus cases replay their recorded inputs instead.
GENERATORS = {"snd": 1, "video-decoder": 2, "video-encoder": 2, "media-camera": 2,
              "media-decoder": 2}

BATCH = 500                 # inputs between checkpoints
PROMPT_S = 5.0              # a request answered at once: within this
HELD_S = 10.0               # a held request after teardown: back within this
MAIN_LOOP_S = 20.0          # QEMU answers a qtest command within this
STALL_S = 2.0               # ... and within this, or a request held its main loop up
STDERR_BATCH_BOUND = 4096   # bytes of stderr a checkpoint may add
STDERR_RUN_BOUND = 64 << 10  # bytes of stderr one QEMU may write in a run
WARMUP = 6                  # checkpoints before the growth baseline
RSS_BOUND_KB = 32 << 10     # anonymous RSS above the baseline (32 MiB)
THREADS_BOUND = 16          # threads above the baseline
RESET_RATE = 1 / 1500       # inputs that reset the device
INDIRECT_RATE = 0.08        # chains through an indirect table, where negotiated
MUTATE_RATE = 0.5           # inputs whose command is mutated
KICK_RATE = 0.6             # inputs notified at once (the others wait for a later one)

VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
DESC_F_INDIRECT = 4
TRACEBACK = "Traceback (most recent call last)"
# What QEMU's stderr says only of a model bug, besides a traceback: views of
# guest memory kept past a completion (the shim's once-per-device warning)
# and a Python warning (numpy's, say) raised by the model's code.
MODEL_BUGS = re.compile(r"keeps views of guest memory|\.py:\d+: \w*Warning: ")
GUARD_MB = 48
ARENA_MB = 96
POOL_MB = 64


# -- what the generators make ---------------------------------------------------------
@dataclass
class Op:
    """One input: a request on ``queue`` (``out`` readable, ``in_size``
    writable bytes) or, with ``reset``, a device reset.  ``fields`` are the
    (offset, size) of ``out``'s fields, for the mutator; ``prompt``: the
    device answers it at once; ``note``: the generator's own, for
    :meth:`Target.on_used`."""

    kind: str
    queue: int = 0
    out: bytes = b""
    in_size: int = 0
    fields: list[tuple[int, int]] = field(default_factory=list)
    prompt: bool = True
    reset: bool = False
    mutate: bool = True
    note: Any = None
    mutated: str = ""       # what the mutator did, for the description
    replayed: bool = False  # from a corpus case's recorded inputs: no note, no state


@dataclass
class Input:
    """An input as it goes to the device: the request, its chain's shape
    (readable and writable descriptor sizes, through an indirect table or
    not) and whether the driver notifies the queue right after it."""

    op: Op
    outs: list[int] = field(default_factory=list)
    ins: list[int] = field(default_factory=list)
    indirect: bool = False
    kick: bool = True

    def to_json(self) -> dict[str, Any]:
        op = self.op
        if op.reset:
            return {"reset": True}
        return {"kind": op.kind + op.mutated, "queue": op.queue, "out": op.out.hex(),
                "in": op.in_size, "outs": self.outs, "ins": self.ins,
                "indirect": self.indirect, "kick": self.kick, "prompt": op.prompt}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Input:
        if d.get("reset"):
            return cls(Op("reset", reset=True))
        op = Op(d["kind"], d["queue"], bytes.fromhex(d["out"]), d["in"], prompt=d["prompt"],
                mutate=False, replayed=True)
        return cls(op, d["outs"], d["ins"], d["indirect"], d["kick"])


def pack_inputs(inputs: list[Input]) -> str:
    """Inputs as they went, for a corpus case: JSON, zlib, base64."""
    raw = json.dumps([i.to_json() for i in inputs], separators=(",", ":")).encode()
    return base64.b64encode(zlib.compress(raw, 9)).decode()


def unpack_inputs(text: str) -> list[Input]:
    return [Input.from_json(d) for d in json.loads(zlib.decompress(base64.b64decode(text)))]


BOUNDARY = (0, 1, 2, 3, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000, 0x7FFF, 0x8000,
            0xFFFF, 0x10000, 0x100000, 0xFFFFFF, 0x1000000, 0x7FFFFFFF, 0x80000000,
            0xFFFFFFFE, 0xFFFFFFFF, 0x100000000, 0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF)

_STRUCT_CODE = re.compile(r"(\d*)([xcbB?hHiIlLqQnNefdsp])")
_SIZES = {"c": 1, "b": 1, "B": 1, "?": 1, "h": 2, "H": 2, "i": 4, "I": 4, "l": 4, "L": 4,
          "q": 8, "Q": 8, "e": 2, "f": 4, "d": 8}
_field_cache: dict[Any, list[tuple[int, int]]] = {}


def struct_fields(s: struct.Struct, base: int = 0) -> list[tuple[int, int]]:
    """(offset, size) of each field of a little-endian ``struct.Struct``."""
    key = (s.format, base)
    if key not in _field_cache:
        out, off = [], 0
        for count, code in _STRUCT_CODE.findall(s.format.lstrip("<=!>@")):
            n = int(count) if count else 1
            if code == "x":
                off += n
            elif code in "sp":
                out.append((base + off, min(n, 8)))
                off += n
            else:
                size = _SIZES[code]
                out += [(base + off + i * size, size) for i in range(n)]
                off += n * size
        _field_cache[key] = out
    return _field_cache[key]


def ctypes_fields(cls: type, base: int = 0) -> list[tuple[int, int]]:
    """(offset, size) of each leaf field of a ctypes structure (arrays of
    structures: their first two elements; byte arrays: their first word)."""
    key = (cls, base)
    if key in _field_cache:
        return _field_cache[key]
    out: list[tuple[int, int]] = []
    for entry in cls._fields_:
        name, typ = entry[0], entry[1]
        off = base + getattr(cls, name).offset
        if issubclass(typ, (C.Structure, C.Union)):
            out += ctypes_fields(typ, off)
        elif issubclass(typ, C.Array):
            elem, n = typ._type_, typ._length_
            if issubclass(elem, (C.Structure, C.Union)):
                for i in range(min(n, 2)):
                    out += ctypes_fields(elem, off + i * C.sizeof(elem))
            elif C.sizeof(elem) == 1:
                out.append((off, min(n, 4)))
            else:
                out += [(off + i * C.sizeof(elem), C.sizeof(elem)) for i in range(min(n, 4))]
        else:
            out.append((off, C.sizeof(typ)))
    out = sorted(set(out))
    _field_cache[key] = out
    return out


def boundary(rng: random.Random, size: int) -> int:
    r = rng.random()
    if r < 0.55:
        v = rng.choice(BOUNDARY)
    elif r < 0.75:
        v = rng.randrange(0, 64)
    elif r < 0.85:
        v = -rng.randrange(1, 4)            # -1, -2, -3
    else:
        v = rng.getrandbits(8 * size)
    return v & ((1 << (8 * size)) - 1)


def mutate(rng: random.Random, op: Op) -> None:
    """Mutate ``op.out`` in place: fields, truncation, extension, noise."""
    data = bytearray(op.out)
    r = rng.random()
    if r < 0.72 and data:
        n = 1 + int(rng.random() < 0.3) + int(rng.random() < 0.1)
        for _ in range(n):
            fields = [f for f in op.fields if f[0] + f[1] <= len(data)]
            if fields and rng.random() < 0.9:
                off, size = rng.choice(fields)
            else:
                size = rng.choice((1, 2, 4, 4, 8))
                off = rng.randrange(0, max(1, len(data) - size + 1)) & ~(size - 1)
                size = min(size, len(data) - off)
            data[off:off + size] = boundary(rng, size).to_bytes(size, "little")
            op.mutated += f" field@{off}/{size}"
    elif r < 0.82 and data:
        cut = rng.randrange(0, len(data))
        del data[cut:]
        op.mutated += f" truncated to {cut}"
    elif r < 0.92:
        extra = rng.choice((1, 4, 8, 16, 64, rng.randrange(1, 4096)))
        data += rng.randbytes(extra)
        op.mutated += f" extended by {extra}"
    elif r < 0.96 and data:
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        op.mutated += " bit flips"
    else:
        data = bytearray(rng.randbytes(rng.choice((4, 8, 16, 24, 64, rng.randrange(1, 512)))))
        op.mutated += f" random {len(data)} bytes"
    op.out = bytes(data)


def mutate_writable(rng: random.Random, op: Op) -> None:
    r = rng.random()
    if r < 0.84 or op.in_size == 0 and r < 0.94:
        return
    if r < 0.90 and op.in_size > 1:
        op.in_size = rng.randrange(1, op.in_size)
        op.mutated += f" writable {op.in_size}"
    elif r < 0.95:
        op.in_size += rng.choice((1, 8, 4096, rng.randrange(1, 65536)))
        op.mutated += f" writable {op.in_size}"
    else:
        op.in_size = 0
        op.mutated += " no writable"


def pieces(rng: random.Random, total: int) -> list[int]:
    """``total`` bytes cut into 1 to 6 non-empty pieces."""
    if total <= 1:
        return [total] if total else []
    r = rng.random()
    n = 1 if r < 0.7 else 2 if r < 0.85 else rng.randrange(3, 7)
    n = min(n, total)
    if n == 1:
        return [total]
    cuts = sorted(rng.sample(range(1, total), n - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


# -- the driver side: rings and buffers of our own ------------------------------------------
class Arena:
    """Guest RAM for chain buffers in power-of-two blocks, reused once their
    chain is back."""

    def __init__(self, base: int, size: int) -> None:
        self.base, self.end, self.next = base, base + size, base
        self.free: dict[int, list[int]] = {}
        self.sizes: dict[int, int] = {}

    def alloc(self, n: int) -> int | None:
        size = max(64, 1 << (max(n, 1) - 1).bit_length())
        free = self.free.get(size)
        if free:
            return free.pop()
        align = min(size, 4096)
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            return None
        self.next = addr + size
        self.sizes[addr] = size
        return addr

    def release(self, addr: int) -> None:
        self.free.setdefault(self.sizes[addr], []).append(addr)


@dataclass
class Chain:
    queue: int
    head: int
    descs: list[int]
    blocks: list[int]
    writable: int
    op: Op
    index: int              # the input that made it (-1: the driver's own)
    token: int = 0
    waiter: list[tuple[int, bytes]] | None = None     # the driver's own call waits on it
    # (address, length, flags) as written, the indirect table's if any: what
    # a NEEDS_RESET report compares guest memory with
    written_descs: list[tuple[int, int, int]] = field(default_factory=list)


class Ring:
    """One split virtqueue, its memory allocated once and reused across resets."""

    def __init__(self, machine: Machine, index: int, size: int) -> None:
        self.index, self.size = index, size
        self.mm, self.base = machine.mem.mm, machine.mem.base
        self.desc = machine.alloc.alloc(16 * size, 4096)
        self.avail = machine.alloc.alloc(6 + 2 * size, 4096)
        self.used = machine.alloc.alloc(6 + 8 * size, 4096)
        self.clear()

    def clear(self, at: int = -1) -> None:
        """After a reset (at input ``at``): descriptors the device held then
        are taken last, so that one of them coming back now (a completion
        that crossed the reset) cannot pass for a new chain's."""
        for addr, n in ((self.desc, 16 * self.size), (self.avail, 6 + 2 * self.size),
                        (self.used, 6 + 8 * self.size)):
            self.mm[addr - self.base:addr - self.base + n] = bytes(n)
        held = set(getattr(self, "inflight", {}))
        self.dropped = {head: at for head in held}      # held at the reset
        self.free = sorted(held) + [i for i in range(self.size) if i not in held]
        self.avail_idx = 0
        self.last_used = 0
        self.inflight: dict[int, Chain] = {}
        self.recent: dict[int, tuple[int, int]] = {}     # head -> (input, used position)

    def publish(self, chain: Chain, descs: list[tuple[int, int, int]]) -> None:
        """``descs``: (address, length, flags) in ring descriptors taken from ``free``."""
        ids = [self.free.pop() for _ in descs]
        d = self.desc - self.base
        for i, (addr, length, flags) in enumerate(descs):
            nxt = ids[i + 1] if i + 1 < len(ids) else 0
            if i + 1 < len(ids):
                flags |= DESC_F_NEXT
            DESC.pack_into(self.mm, d + 16 * ids[i], addr, length, flags, nxt)
        chain.head, chain.descs = ids[0], ids
        self.inflight[chain.head] = chain
        a = self.avail - self.base
        store_u16(self.mm, a + 4 + 2 * (self.avail_idx % self.size), chain.head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        store_u16(self.mm, a + 2, self.avail_idx)

    def poll(self) -> tuple[Chain, int] | None:
        u = self.used - self.base
        if U16.unpack_from(self.mm, u + 2)[0] == self.last_used:
            return None
        head, written = USED_ELEM.unpack_from(self.mm, u + 4 + 8 * (self.last_used % self.size))
        self.last_used = (self.last_used + 1) & 0xFFFF
        chain = self.inflight.pop(head, None)
        if chain is None:
            if head in self.dropped:
                why = (f"a request the device held at the reset of input "
                       f"{self.dropped[head]} came back after it")
            elif head in self.recent:
                why = (f"the request of input {self.recent[head][0]} came back again "
                       f"(first at used position {self.recent[head][1]})")
            else:
                why = "not the head of a chain it holds"
            raise FuzzError(f"queue {self.index}: the device used descriptor {head} "
                            f"({written} bytes written): {why}; used ring at "
                            f"{self.last_used - 1}, {len(self.inflight)} chains in flight, "
                            f"avail at {self.avail_idx}")
        self.recent[head] = (chain.index, self.last_used - 1)
        self.dropped.pop(head, None)
        self.free.extend(chain.descs)
        return chain, written


class StartError(Exception):
    """QEMU could not be started (the host, not the device)."""


class FuzzError(Exception):
    """A finding that ends the run at once (a crash, a protocol violation)."""


@dataclass
class Finding:
    kind: str               # crash, hang, held, unanswered, probe, traceback, log-flood, ...
    index: int              # the input at (or the checkpoint after) which it showed
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} at input {self.index}: {self.detail}"


@dataclass
class Report:
    device: str
    seed: int
    start: int
    stop: int                       # the first input not run
    inputs: int = 0                 # requests made (resets included)
    skipped: int = 0                # inputs with no room in their queue
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    stderr_bytes: int = 0
    stderr_sample: str = ""         # the first lines QEMU wrote
    statuses: Counter = field(default_factory=Counter)    # (kind, status) -> count

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


# -- one QEMU, one device, one range of inputs ------------------------------------------------
class Fuzzer:
    def __init__(self, device: str, seed: int, batch: int = BATCH,
                 log: Callable[[str], None] | None = None) -> None:
        from tests.fuzz_targets import make_target
        self.device, self.seed, self.batch = device, seed, batch
        self.target = make_target(device)
        self.log = log
        self.machine: Machine | None = None
        self.serial = 0
        self.unkicked: set[int] = set()
        self.features = 0
        self.report: Report | None = None
        self.last_index = -1

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        import subprocess
        import tempfile
        self.tmp = Path(tempfile.mkdtemp(prefix="pyemb-fuzz-"))
        # A machine this loaded may start QEMU slowly: a second try, then
        # the caller's problem (StartError is no finding of the device's).
        for attempt in range(3):
            m = Machine.x86(self.target.qemu_args(self.tmp), mem_mb=self.target.mem_mb)
            try:
                m.start()
                break
            except (OSError, QemuExited, subprocess.TimeoutExpired) as e:
                if attempt == 2:
                    raise StartError(f"QEMU did not start: {type(e).__name__}: {e}") from e
                time.sleep(5)
        self.machine = m
        m.qtest.sock.settimeout(MAIN_LOOP_S)
        self.dev = m.find_virtio(self.target.device_id)
        self.t = self.dev.transport
        self.mm, self.base = m.mem.mm, m.mem.base
        self.t.set_status(0)
        # The driver's own memory where no address a command names can reach
        # it: a mutated address or length makes the device write pictures,
        # bitstream or capture buffers wherever it says, and a guest that
        # points its device at its own rings is its own problem.  Low RAM,
        # then a guard the boundary values (0x1000000, 0xffffff and lengths
        # of up to 16 MiB from there) fall into, then the rings and the
        # arena, then the pool the commands point at (above them: a length
        # from a pool address cannot reach back).
        m.alloc.alloc(GUARD_MB << 20, 4096)
        self.rings = [Ring(m, i, self.t.queue_max_size(i)) for i in range(self.t.num_queues())]
        self.arena = Arena(m.alloc.alloc(ARENA_MB << 20, 4096), ARENA_MB << 20)
        self.pool = m.alloc.alloc(POOL_MB << 20, 4096)
        self.target.prepare(self)
        self.stderr_seen = 0
        self.stderr_total = 0
        self.initialize()

    def close(self) -> None:
        import shutil
        if self.machine is not None:
            self.machine.stop(timeout=10)
            self.machine = None
        shutil.rmtree(getattr(self, "tmp", "/nonexistent"), ignore_errors=True)

    def initialize(self) -> None:
        """Reset the device and set it up again, as a driver does after a reset."""
        t = self.t
        t.set_status(0)
        for ring in self.rings:
            for chain in ring.inflight.values():
                for block in chain.blocks:
                    self.arena.release(block)
            ring.clear(self.last_index)
        t.set_status(ACKNOWLEDGE)
        t.set_status(ACKNOWLEDGE | DRIVER)
        offered = t.device_features()
        want = self.target.features | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX)
        self.features = (offered & want) | (1 << VIRTIO_F_VERSION_1)
        t.set_driver_features(self.features)
        t.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        if not t.get_status() & FEATURES_OK:
            raise FuzzError("the device refused its own features")
        t.setup_config_vector()
        for ring in self.rings:
            t.setup_queue(ring.index, ring.size, ring.desc, ring.avail, ring.used)
        t.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        self.unkicked.clear()
        self.target.initialized(self)
        self.post_event_buffers()

    # -- requests -------------------------------------------------------------------
    def submit(self, op: Op, index: int, shape: Input | None = None,
               waiter: list[tuple[int, bytes]] | None = None) -> Chain | None:
        """Make ``op`` available (not notified), in one readable and one
        writable descriptor or as ``shape`` says; None if its queue has no
        room."""
        ring = self.rings[op.queue]
        if shape is not None:
            outs, ins, indirect = shape.outs, shape.ins, shape.indirect
        else:
            outs = [len(op.out)] if op.out else []
            ins = [op.in_size] if op.in_size else []
            indirect = False
        if not outs and not ins:
            ins = [1]
        indirect = indirect and bool(self.features >> VIRTIO_F_INDIRECT_DESC & 1)
        need = 1 if indirect else len(outs) + len(ins)
        if need > len(ring.free):
            self.poll()
            if need > len(ring.free):
                self.kick()
                self.poll()
                if need > len(ring.free):
                    return None
        blocks, descs = [], []
        pos = 0
        for n in outs:
            addr = self._block(n, blocks)
            if addr is None:
                return None
            self.mm[addr - self.base:addr - self.base + n] = op.out[pos:pos + n]
            pos += n
            descs.append((addr, n, 0))
        for n in ins:
            addr = self._block(n, blocks)
            if addr is None:
                return None
            self.mm[addr - self.base:addr - self.base + n] = bytes(n)
            descs.append((addr, n, DESC_F_WRITE))
        if indirect:
            table = self._block(16 * len(descs), blocks)
            if table is None:
                return None
            t = table - self.base
            for i, (addr, n, flags) in enumerate(descs):
                last = i + 1 == len(descs)
                DESC.pack_into(self.mm, t + 16 * i, addr, n, flags | (0 if last else DESC_F_NEXT),
                               0 if last else i + 1)
            written = list(descs)
            descs = [(table, 16 * len(descs), DESC_F_INDIRECT)]
        else:
            written = list(descs)
        chain = Chain(op.queue, 0, [], blocks, sum(ins), op, index, self.serial, waiter,
                      written)
        self.serial += 1
        ring.publish(chain, descs)
        self.unkicked.add(op.queue)
        self.target.submitted(op)
        return chain

    def _block(self, n: int, blocks: list[int]) -> int | None:
        addr = self.arena.alloc(n)
        if addr is None:
            for b in blocks:
                self.arena.release(b)
            blocks.clear()
            return None
        blocks.append(addr)
        return addr

    def queue_status(self, index: int) -> str:
        """What QEMU says of virtqueue ``index`` (x-query-virtio-queue-status)."""
        try:
            qmp = self.machine.qmp
            path = qmp.execute("x-query-virtio")[0]["path"]
            st = qmp.execute("x-query-virtio-queue-status", path=path, queue=index)
            return ", ".join(f"{k} {st[k]}" for k in ("last-avail-idx", "shadow-avail-idx",
                                                       "used-idx", "inuse") if k in st)
        except Exception as e:  # noqa: BLE001 - a diagnostic only
            return f"unknown ({e})"

    def kick(self) -> None:
        """Notify the queues with new chains.  qtest answers once QEMU's
        main loop is back to it: a request that held the loop up longer
        than STALL_S (its vCPUs would have stalled) is a finding."""
        t0 = time.monotonic()
        for q in sorted(self.unkicked):
            self.t.notify(q, True)
        self.unkicked.clear()
        self._stalled(t0)

    def ping(self) -> None:
        """A qtest round trip: the main loop is done with what it had."""
        t0 = time.monotonic()
        self.machine.qtest.cmd("endianness")
        self._stalled(t0)

    def _stalled(self, t0: float) -> None:
        took = time.monotonic() - t0
        if took > STALL_S:
            raise _finding("stall", f"QEMU's main loop was held up {took:.1f} s, "
                                    f"around input {self.last_index}")

    def poll(self) -> int:
        """Take every used chain back; the number taken."""
        n = 0
        for ring in self.rings:
            while True:
                try:
                    done = ring.poll()
                except FuzzError as e:
                    raise FuzzError(f"{e}; QEMU's view: {self.queue_status(ring.index)}") \
                        from None
                if done is None:
                    break
                self._used(*done)
                n += 1
        eq = self.target.event_queue
        if n and eq is not None and len(self.rings[eq].inflight) < self.target.event_buffers:
            self.post_event_buffers()
        return n

    def _used(self, chain: Chain, written: int) -> None:
        data = b""
        if written > chain.writable:
            raise FuzzError(f"queue {chain.queue}: used length {written} beyond the "
                            f"{chain.writable} writable bytes of {chain.op.kind}"
                            f"{chain.op.mutated} (input {chain.index})")
        if written:
            data = self._read_writable(chain, written)
        for block in chain.blocks:
            self.arena.release(block)
        problem = self.target.check(chain.op, chain.writable, written, data)
        if problem:
            raise FuzzError(f"{chain.op.kind}{chain.op.mutated} (input {chain.index}): {problem}")
        if self.report is not None:
            self.report.statuses[(chain.op.kind, self.target.status(chain.op, written, data))] += 1
        if chain.waiter is not None:
            chain.waiter.append((written, data))
        self.target.on_used(self, chain.op, written, data)

    def _read_writable(self, chain: Chain, written: int) -> bytes:
        # The writable descriptors are the chain's last ones (or the
        # indirect table's): read them back in order.
        ring = self.rings[chain.queue]
        d = ring.desc - self.base
        entries = []
        for i in chain.descs:
            addr, length, flags, _ = DESC.unpack_from(self.mm, d + 16 * i)
            if flags & DESC_F_INDIRECT:
                t = addr - self.base
                for j in range(length // 16):
                    entries.append(DESC.unpack_from(self.mm, t + 16 * j)[:3])
            else:
                entries.append((addr, length, flags))
        out, left = [], written
        for addr, length, flags in entries:
            if flags & DESC_F_WRITE and left > 0:
                take = min(length, left)
                out.append(self.mm[addr - self.base:addr - self.base + take])
                left -= take
        return b"".join(out)

    def call(self, op: Op, timeout: float = PROMPT_S) -> tuple[int, bytes] | None:
        """One of the driver's own requests, waited for: (written, data),
        or None if it did not come back within ``timeout``."""
        got: list[tuple[int, bytes]] = []
        chain = self.submit(op, -1, waiter=got)
        if chain is None:
            raise FuzzError(f"no room in queue {op.queue} for the driver's {op.kind}")
        self.kick()
        deadline = time.monotonic() + timeout
        while not got:
            self.poll()
            if got:
                break
            if time.monotonic() > deadline:
                return None
            time.sleep(0.0005)
        return got[0]

    def post_event_buffers(self) -> None:
        t = self.target
        if t.event_queue is None:
            return
        ring = self.rings[t.event_queue]
        while len(ring.inflight) < t.event_buffers and ring.free:
            self.submit(Op("event-buffer", t.event_queue, in_size=t.event_size, prompt=False,
                           mutate=False), -1)
        self.kick()

    def held(self, event: bool = False) -> list[Chain]:
        """Chains the device still holds (event buffers only with ``event``)."""
        eq = self.target.event_queue
        return [c for ring in self.rings for c in ring.inflight.values()
                if event or c.queue != eq]

    # -- the run --------------------------------------------------------------------
    def generate(self, index: int) -> Input:
        """Input ``index`` of this device and seed (its ids taken from what
        the device answered so far)."""
        rng = random.Random((zlib.crc32(self.device.encode()) << 96) | (self.seed << 40) | index)
        if rng.random() < RESET_RATE:
            return Input(Op("reset", reset=True))
        op = self.target.generate(rng, self)
        if op.mutate and rng.random() < MUTATE_RATE:
            mutate(rng, op)
        if op.mutate:
            mutate_writable(rng, op)
            op.prompt = self.target.prompt(op)      # what the mutated bytes ask for
            self.target.keep_off_driver(self, op)
        return Input(op, pieces(rng, len(op.out)), pieces(rng, op.in_size),
                     rng.random() < INDIRECT_RATE, rng.random() < KICK_RATE)

    def run(self, start: int, stop: int, deadline: float | None = None,
            inputs: list[Input] | None = None, record: list[Input] | None = None) -> Report:
        """Inputs [start, stop) (until ``deadline``), generated, or taken
        from ``inputs`` (a corpus case's, recorded by an older generator);
        each is appended to ``record``.  Stops at the first finding."""
        report = self.report = Report(self.device, self.seed, start, start)
        t0 = time.monotonic()
        index = last = start
        try:
            if self.machine is None:
                self.start()
            while index < stop:
                last = self.last_index = index
                inp = inputs[index - start] if inputs is not None else self.generate(index)
                op = inp.op
                if record is not None:
                    record.append(inp)
                if self.log:
                    self.log(f"{index}: {op.kind}{op.mutated}")
                if op.reset:
                    self.kick()
                    self.poll()
                    self.initialize()
                    report.inputs += 1
                elif self.submit(op, index, inp) is None:
                    report.skipped += 1
                else:
                    report.inputs += 1
                    if inp.kick or len(self.unkicked) > 1:
                        self.kick()
                    self.poll()
                index += 1
                if index % self.batch == 0 or index == stop:
                    self.checkpoint(index - 1)
                    if deadline is not None and time.monotonic() > deadline:
                        break
        except FuzzError as e:
            report.findings.append(Finding(self._kind(e), last, str(e)))
        except (QTestError, OSError, QemuExited) as e:
            report.findings.append(self._crash(last, e))
        report.stop = last + 1 if report.findings else index
        report.seconds = time.monotonic() - t0
        return report

    def _kind(self, e: FuzzError) -> str:
        return getattr(e, "kind", "protocol")

    def _crash(self, index: int, e: BaseException) -> Finding:
        m = self.machine
        if isinstance(e, TimeoutError) and m is not None and m.alive():
            return Finding("hang", index, f"QEMU's main loop did not answer qtest within "
                                          f"{MAIN_LOOP_S} s{backtraces(m.proc.pid)}")
        if m is not None and m.proc is not None:
            try:
                m.proc.wait(5)
            except Exception:  # noqa: BLE001 - still running: a hang
                pass
        if m is not None and m.proc is not None and m.proc.poll() is not None:
            tail = m.stderr()[-3000:]
            return Finding("crash", index, f"QEMU exited with {m.proc.returncode}: {tail}")
        return Finding("crash", index, f"{type(e).__name__}: {e}")

    # -- oracles ---------------------------------------------------------------------
    def checkpoint(self, index: int) -> None:
        report = self.report
        self.kick()
        self.ping()         # a notification's handler runs after qtest's answer
        self.poll()
        self._check_broken()
        self._wait(lambda: [c for c in self.held() if c.op.prompt], PROMPT_S,
                   "unanswered", "requests the device answers at once")
        problem = self.target.probe(self)
        if problem:
            raise _finding("probe", problem)
        for op in self.target.teardown(self):
            if self.call(op) is None:
                raise _finding("unanswered", f"the teardown's {op.kind} got no answer within "
                                             f"{PROMPT_S} s")
        self._wait(self.held, HELD_S, "held", "requests held after teardown")
        self._check_broken()
        self.post_event_buffers()
        self._check_stderr(index)
        pid = self.machine.proc.pid
        values = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "Threads"):
                    values[key] = int(value.split()[0])
        report.rss_kb.append(values["RssAnon"])
        report.threads.append(values["Threads"])
        for what, samples, bound, unit in (("anonymous RSS", report.rss_kb, RSS_BOUND_KB, "kB"),
                                          ("thread count", report.threads, THREADS_BOUND, "")):
            problem = growth(samples, bound)
            if problem:
                raise _finding("growth", f"QEMU's {what}: {problem} {unit}")

    def _check_broken(self) -> None:
        """QEMU marks a device broken (NEEDS_RESET; it then ignores its
        queues) for what its virtqueue code cannot take: say so, and why."""
        status = self.t.get_status()
        if status & NEEDS_RESET:
            rings = "; ".join(f"queue {r.index}: driver avail {r.avail_idx}, used seen "
                              f"{r.last_used}, {len(r.inflight)} in flight, QEMU: "
                              f"{self.queue_status(r.index)}" for r in self.rings)
            raise _finding("broken", f"the device set NEEDS_RESET (status 0x{status:x}); "
                                     f"QEMU said: {self._stderr_tail()}; {rings}"
                                     f"{self._chain_qemu_stopped_at()}")

    def _chain_qemu_stopped_at(self) -> str:
        """The chain each queue's QEMU popped last (at its last-avail-idx - 1):
        which input made it, and its descriptors as written against guest
        memory now.  A difference is a write by the device (or the model)
        into memory the driver had not given it: the once-in-a-million
        "zero sized buffers" NEEDS_RESET is still unexplained."""
        out = []
        for ring in self.rings:
            m = re.search(r"last-avail-idx (\d+)", self.queue_status(ring.index))
            if m is None or int(m[1]) == 0:
                continue
            a = ring.avail - self.base
            head = U16.unpack_from(self.mm, a + 4 + 2 * ((int(m[1]) - 1) % ring.size))[0]
            # QEMU's shadow-avail-idx was 0 in every such finding: did the
            # avail ring in memory say so (a stray write), or not?
            idx_now = U16.unpack_from(self.mm, a + 2)[0]
            chain = ring.inflight.get(head)
            if chain is None:
                out.append(f"queue {ring.index}: avail idx in memory {idx_now}, head {head} "
                           "is not a chain in flight")
                continue
            now = self._descriptors_now(ring, head)
            out.append(f"queue {ring.index}: avail idx in memory {idx_now}, head {head}, "
                       f"input {chain.index} "
                       f"{chain.op.kind}{chain.op.mutated}, written {chain.written_descs}, "
                       f"in memory now {now}"
                       + (" (changed)" if now != chain.written_descs else ""))
        return "; last chains popped: " + "; ".join(out) if out else ""

    def _descriptors_now(self, ring: Ring, head: int) -> list[tuple[int, int, int]]:
        d, entries, i = ring.desc - self.base, [], head
        for _ in range(ring.size):
            addr, length, flags, nxt = DESC.unpack_from(self.mm, d + 16 * i)
            if flags & DESC_F_INDIRECT:
                t = addr - self.base
                for j in range(min(length // 16, 64)):
                    a_, n_, f_, _ = DESC.unpack_from(self.mm, t + 16 * j)
                    entries.append((a_, n_, f_ & ~DESC_F_NEXT))
                return entries
            entries.append((addr, length, flags & ~DESC_F_NEXT))
            if not flags & DESC_F_NEXT:
                break
            i = nxt % ring.size
        return entries

    def _stderr_tail(self, n: int = 1500) -> str:
        with open(self.machine.stderr_path, "rb") as f:
            f.seek(max(self.stderr_seen, f.seek(0, 2) - n))
            return f.read().decode(errors="replace")

    def _wait(self, pending: Callable[[], list[Chain]], timeout: float, kind: str,
              what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            left = pending()
            if not left:
                return
            if time.monotonic() > deadline:
                names = Counter(f"{c.op.kind}{c.op.mutated}" for c in left)
                first = min(c.index for c in left)
                self._check_broken()
                queues = "; ".join(f"queue {q}: {self.queue_status(q)}"
                                   for q in sorted({c.queue for c in left}))
                raise _finding(kind, f"{len(left)} {what} still held after {timeout} s "
                                     f"(first from input {first}): "
                                     + ", ".join(f"{n} x{k}" for n, k in names.most_common(6))
                                     + f"; QEMU's view: {queues}; device status "
                                     + f"0x{self.t.get_status():x}; stderr: "
                                     + repr(self._stderr_tail(600))
                                     + backtraces(self.machine.proc.pid))
            time.sleep(0.002)

    def _check_stderr(self, index: int) -> None:
        m = self.machine
        with open(m.stderr_path, "rb") as f:
            f.seek(self.stderr_seen)
            new = f.read()
        self.stderr_seen += len(new)
        self.stderr_total += len(new)
        self.report.stderr_bytes = self.stderr_total
        text = new.decode(errors="replace")
        if len(self.report.stderr_sample) < 4000:
            self.report.stderr_sample += text[:4000 - len(self.report.stderr_sample)]
        if TRACEBACK in text:
            start = text.index(TRACEBACK)
            head = text[max(0, text.rfind("\n", 0, start - 1)):]
            raise _finding("traceback", head[:2500])
        bug = MODEL_BUGS.search(text)
        if bug:
            line = text[text.rfind("\n", 0, bug.start()) + 1:]
            raise _finding("model-warning", line[:1000])
        if len(new) > STDERR_BATCH_BOUND:
            raise _finding("log-flood", f"{len(new)} bytes of stderr since the last "
                                        f"checkpoint: {text[:600]!r}")
        if self.stderr_total > STDERR_RUN_BOUND:
            raise _finding("log-flood", f"{self.stderr_total} bytes of stderr in this run; "
                                        f"lately: {text[:600]!r}")


def growth(samples: list[int], bound: int) -> str:
    """Whether ``samples`` (one a checkpoint, after teardown) grow without
    bound: the lowest of the last quarter above the highest of the first
    half (the warm-up's included) by more than ``bound``, once there are
    4 x WARMUP samples; or, sooner, any sample above the warm-up's highest
    by 8 x ``bound``.  A level the allocators settle at (glibc keeps one
    arena a thread, and the encoders' threads fill theirs) does not trip
    it; a floor that keeps rising does."""
    if len(samples) <= WARMUP:
        return ""
    warm = max(samples[:WARMUP])
    if samples[-1] > warm + 8 * bound:
        return f"{samples[-1]} now, {warm} after warm-up"
    if len(samples) < 4 * WARMUP:
        return ""
    first = max(samples[:(len(samples) + WARMUP) // 2])
    floor = min(samples[-(len(samples) - WARMUP) // 4:])
    if floor > first + bound:
        return f"at least {floor} over the last quarter of the run, at most {first} before"
    return ""


def backtraces(pid: int) -> str:
    """QEMU's threads as gdb sees them (C and, where it can, Python frames),
    the frames that matter for a hang: "" without gdb."""
    import shutil
    import subprocess
    if shutil.which("gdb") is None:
        return ""
    try:
        out = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 30"],
                             capture_output=True, text=True, timeout=60).stdout
    except (subprocess.TimeoutExpired, OSError):
        return ""
    threads, current = [], []
    for line in out.splitlines():
        if line.startswith("Thread "):
            current = [line]
            threads.append(current)
        elif current and re.search(r"\b(in|at) \S*(pyemb|virtio|main_loop|Py\w*Lock|"
                                   r"acquire|_wait|poll|sem_|futex|Vectorcall)", line):
            current.append("  " + line.split(" in ", 1)[-1][:160])
    # The main loop's thread (the first one gdb numbers) first.
    threads.sort(key=lambda t: not t[0].startswith("Thread 1 "))
    return "\nthreads:\n" + "\n".join(line for t in threads for line in t[:8])[:6000]


def _finding(kind: str, detail: str) -> FuzzError:
    e = FuzzError(detail)
    e.kind = kind           # type: ignore[attr-defined]
    return e


# -- runs, replays and minimisation ----------------------------------------------------
def run(device: str, seed: int, start: int, stop: int, deadline: float | None = None,
        batch: int = BATCH, log: Callable[[str], None] | None = None,
        inputs: list[Input] | None = None, record: list[Input] | None = None) -> Report:
    """Inputs [start, stop) of (device, seed) in a fresh QEMU (see Fuzzer.run)."""
    fz = Fuzzer(device, seed, batch, log)
    try:
        return fz.run(start, stop, deadline, inputs, record)
    finally:
        fz.close()


def reproduces(device: str, seed: int, start: int, stop: int, kind: str,
               batch: int = BATCH) -> bool:
    report = run(device, seed, start, stop, batch=batch)
    return any(f.kind == kind for f in report.findings)


MAX_FULL_REPLAY = 20000      # inputs: a longer run's findings are replayed by batch only


def minimise(device: str, seed: int, finding: Finding, start: int, batch: int = BATCH,
             budget_s: float = 120.0, log: Callable[[str], None] = print) -> tuple[int, int, bool]:
    """A short range of inputs that trips ``finding`` again: (start, stop,
    reproduced).  Tries the finding's batch alone, then the whole range from
    ``start``; then moves the start forward and the end back by halves
    while it still trips, within ``budget_s``."""
    t_end = time.monotonic() + budget_s
    hi = finding.index + 1
    lo = max(start, (finding.index // batch) * batch)
    if not reproduces(device, seed, lo, hi, finding.kind, batch):
        if lo == start or hi - start > MAX_FULL_REPLAY or \
                not reproduces(device, seed, start, hi, finding.kind, batch):
            log(f"  not reproduced by a replay of [{lo}, {hi})")
            return lo, hi, False
        lo = start
    step = (hi - lo) // 2
    while step >= 1 and time.monotonic() < t_end:
        if reproduces(device, seed, lo + step, hi, finding.kind, batch):
            lo += step
        else:
            step //= 2
    step = (hi - lo) // 2
    while step >= 1 and time.monotonic() < t_end:
        if hi - step > lo and reproduces(device, seed, lo, hi - step, finding.kind, batch):
            hi -= step
        else:
            step //= 2
    return lo, hi, True


def save_case(device: str, seed: int, start: int, stop: int, finding: Finding,
              reproduced: bool, corpus: Path = CORPUS, batch: int = BATCH,
              note: str = "") -> Path:
    """Keep [start, stop) of (device, seed) as a corpus case, with the
    inputs as they went (a replay of them, should the generators change)."""
    corpus.mkdir(parents=True, exist_ok=True)
    record: list[Input] = []
    if stop - start <= MAX_FULL_REPLAY:
        run(device, seed, start, stop, batch=batch, record=record)
    case = {"device": device, "seed": seed, "start": start, "stop": stop,
            "tripped": finding.kind, "detail": finding.detail[:4000],
            "reproduced": reproduced, "found": time.strftime("%Y-%m-%d"),
            "generator": GENERATORS[device], "batch": batch}
    if record:
        case["inputs"] = pack_inputs(record)
    if note:
        case["note"] = note
    path = corpus / f"{device}-{seed}-{start}-{stop}.json"
    path.write_text(json.dumps(case, indent=1) + "\n")
    return path


def load_cases(corpus: Path = CORPUS) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) | {"file": p.name}
            for p in sorted(corpus.glob("*.json"))]


def replay_case(case: dict[str, Any]) -> Report:
    """A corpus case again: by (device, seed, range) while the generators
    are those that made it, else the inputs it recorded."""
    batch = case.get("batch", BATCH)
    if case.get("generator") == GENERATORS[case["device"]] or "inputs" not in case:
        return run(case["device"], case["seed"], case["start"], case["stop"], batch=batch)
    return run(case["device"], case["seed"], case["start"], case["stop"], batch=batch,
               inputs=unpack_inputs(case["inputs"]))
