"""H.264 encoding through the whole virtio-video-py path vs PyAV directly.

Device path: the host-side driver writes each raw NV12 picture into a guest
input buffer (shared guest RAM, as a guest's camera or compositor would have
it there) and queues it through qtest; QEMU hands the buffers to the Python
device model (``-device virtio-video-py-pci,role=encoder``), the stream's
worker copies the picture into an FFmpeg frame, encodes it with libx264
(preset veryfast, tune zerolatency, the bitrate, level and headers the
device's controls give) and writes each packet into a guest output buffer.
References, measured in the same run on the same pictures with the same
options: the device's own encode session (pyemb.pyav_encoder, opened with
the settings the device reports) called directly in this process, and plain
PyAV (a libx264 CodecContext given the same AVOptions, pictures through
``VideoFrame.from_ndarray``).  The pictures are made once, up front, and kept
in memory: their making is counted nowhere.  By default a guest has its
pictures in its RAM already, as a camera or compositor leaves them there:
``INPUT_BUFFERS`` pictures are written into the guest's input buffers once,
before the timed span, and picture i is the one in buffer i % INPUT_BUFFERS
(the references get the same sequence); ``--copy`` makes the stand-in
driver write every picture into guest RAM in the timed span instead (one
copy, notified at once, as a guest driver's QBUF), which is the driver's
cost, not the device's.  The references count the copy into the encoder's
frame, as the device does.  Every run opens its encoder inside
the timed span (the device opens it on the first picture); a short
warm-up stream of each kind at each size goes first, uncounted.
The device stream is not drained: with zerolatency each picture's packet
comes out at once, and a drain would end the session and x264's threads
before their CPU could be read.
Prints frames per second over the whole run and from the first tenth of the
pictures on (the rate once the stream flows), the ratios (best of the
repeats, and the median of ratios of runs made back to back, which the
machine's noise disturbs less), whether the bitstreams are the device's to
the byte (then all did the very same work), and the CPU time
per frame of every thread involved, in all and by role (x264's threads, the
stream worker ``pyemb-venc-<id>``, QEMU's main loop, the host driver; PyAV's
calling thread), read from each thread's schedstat: on a machine with as few
cores as this one's, extra CPU is what costs frames.
Target: device >= 0.95 x the engine's session called directly.

    .venv/bin/python -m bench.encode_throughput [--frames 240] [--repeat 3]
        [--sizes 720p,1080p] [--poll-ms 5]
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np

from bench.threads import Threads, roles_line, threads_of
from pyemb.pyav_encoder import DEFAULT_ENCODERS, H264_LEVELS, _rate_control, h264_level
from pyemb.video import protocol as p
from pyemb.video_backend import EncoderSettings, PyAVBackend, RawImage
from tests.encoder_client import EncodeRun, raw_pictures
from tests.hostdriver import Machine
from tests.video_client import VideoClient

SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}
# Bitrate and VBR peak of each size, bits per second, at FRAME_RATE.
BITRATES = {(1280, 720): (4_000_000, 6_000_000), (1920, 1080): (8_000_000, 12_000_000)}
FRAME_RATE = 30
NOISE = 6           # camera-like grain: x264 has real work on every picture
INPUT_BUFFERS, OUTPUT_BUFFERS = 16, 8

@dataclass
class Timing:
    """When a run started and when each packet came out (perf_counter)."""

    start: float
    packets: list[float] = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)
    headers: bytes = b""        # SPS/PPS kept apart (plain PyAV's extradata)

    @property
    def fps(self) -> float:
        """The whole run: the encoder's opening included."""
        return len(self.packets) / (self.packets[-1] - self.start)

    def steady_fps(self, skip: int) -> float:
        """From packet ``skip`` to the last: the stream's rate once it flows."""
        return (len(self.packets) - 1 - skip) / (self.packets[-1] - self.packets[skip])

    @property
    def first_ms(self) -> float:
        return (self.packets[0] - self.start) * 1e3

    @property
    def kbps(self) -> float:
        return sum(map(len, self.data)) * 8 * FRAME_RATE / len(self.data) / 1e3


def by_role(before: Threads, after: Threads,
            role: Callable[[int, str], str]) -> collections.Counter[str]:
    """CPU nanoseconds used between the two snapshots, summed by role."""
    used: collections.Counter[str] = collections.Counter()
    for tid, (name, ns) in after.items():
        used[role(tid, name)] += ns - before.get(tid, ("", 0))[1]
    return used


def per_frame(used: collections.Counter[str], frames: int) -> dict[str, float]:
    """Microseconds of CPU per frame by thread role, busiest first."""
    us = {role: ns / frames / 1e3 for role, ns in used.items()}
    return dict(sorted(((r, u) for r, u in us.items() if u >= 1), key=lambda x: -x[1]))


def in_process_roles(before: Threads) -> Callable[[int, str], str]:
    """This process running an encoder itself: the calling (main) thread,
    and x264's threads, the ones that were not there before it opened."""
    pid = os.getpid()

    def role(tid: int, name: str) -> str:
        if tid == pid:
            return "PyAV caller"
        return "other threads" if tid in before else "x264 threads"
    return role


def session_direct(pictures: list[np.ndarray], settings: EncoderSettings,
                   cpu: list[dict[str, float]]) -> Timing:
    """The device's engine session (PyAVBackend.open_encoder) called here:
    the pictures through ``take`` (from memory, as the worker reads a guest
    buffer) and ``encode``.  ``cpu``: gets the CPU per frame by role."""
    w, h = settings.width, settings.height
    layout = [(0, w), (w * h, w)]
    before = threads_of(os.getpid())
    timing = Timing(time.perf_counter())
    session = PyAVBackend({}).open_encoder(settings)
    for i, picture in enumerate(pictures):
        image = RawImage(p.Format.NV12, w, h, picture.ctypes.data, picture.nbytes, layout)
        for packet in session.encode(session.take(image), i, False):
            timing.packets.append(time.perf_counter())
            timing.data.append(packet.data)
    cpu.append(per_frame(by_role(before, threads_of(os.getpid()), in_process_roles(before)),
                         len(pictures)))
    assert not session.flush()          # zerolatency: nothing held back
    session.close()
    return timing


def plain_options(settings: EncoderSettings) -> tuple[str, dict[str, str]]:
    """The encoder and AVOptions the device gives libx264 for ``settings``
    (what PyAVEncodeSession does, written out)."""
    codec, options = DEFAULT_ENCODERS[p.Format.H264]
    choice = PyAVBackend({}).encoders[p.Format.H264]
    options = {**options, **_rate_control(choice, settings), "forced-idr": "1",
               "level": H264_LEVELS[h264_level(settings)][0]}
    if settings.profile in choice.profiles:
        options["profile"] = choice.profiles[settings.profile]
    if settings.cbr:
        options["x264-params"] = "nal-hrd=cbr"
    return codec, options


def plain_pyav(pictures: list[np.ndarray], settings: EncoderSettings,
               cpu: list[dict[str, float]]) -> Timing:
    """Plain PyAV: a libx264 CodecContext with the same options, the
    pictures through ``VideoFrame.from_ndarray(format="nv12")``."""
    codec, options = plain_options(settings)
    before = threads_of(os.getpid())
    timing = Timing(time.perf_counter())
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height, ctx.pix_fmt = settings.width, settings.height, "nv12"
    ctx.time_base = Fraction(1, settings.frame_rate)
    ctx.framerate = Fraction(settings.frame_rate, 1)
    ctx.bit_rate = settings.bitrate
    ctx.max_b_frames = 0
    ctx.thread_count = 0
    ctx.flags |= av.codec.context.Flags.global_header
    ctx.options = options
    ctx.open()
    for i, picture in enumerate(pictures):
        frame = av.VideoFrame.from_ndarray(picture.reshape(-1, settings.width), format="nv12")
        frame.pts = i
        for packet in ctx.encode(frame):
            timing.packets.append(time.perf_counter())
            timing.data.append(bytes(packet))
    cpu.append(per_frame(by_role(before, threads_of(os.getpid()), in_process_roles(before)),
                         len(pictures)))
    assert not ctx.encode(None)
    timing.headers = bytes(ctx.extradata)
    return timing


class MeasuredRun(EncodeRun):
    """Notes when each packet comes back; takes the CPU by thread role of
    this process and QEMU's when the stream starts and just before it is
    destroyed (x264's threads still live then: no drain ended the session).
    Hands its guest buffers back to the allocator once destroyed."""

    def __init__(self, *args, copy: bool = False, **kw) -> None:
        super().__init__(*args, drain=False, **kw)
        self.copy = copy                # each picture into guest RAM in the timed span
        self.qemu_pid = self.c.m.proc.pid
        self.timing = Timing(0.0)
        self.snapshots: list[tuple[Threads, Threads]] = []

    def start(self) -> None:
        super().start()
        w, h = self.width, self.height
        # The device's strides are the packed picture's: each picture goes
        # into guest RAM as it is, in one copy (EncodeRun's lay_out would
        # make it over again in this process first, at each step).
        assert self.in_params.plane_formats == [(w * h, w), (w * h // 2, w)], \
            self.in_params.plane_formats
        if not self.copy:               # the guest's pictures are in its RAM already
            for rid in self.free_inputs:
                self.c.write_entries(self.inputs[rid], self.pictures[rid])

    def step(self, events: list[tuple[int, int]]) -> None:
        """EncodeRun's step with the pictures queued here: each one
        written into a free input buffer and notified at once, as a guest
        driver's QBUF does."""
        free, self.free_inputs = self.free_inputs, []
        super().step(events)            # completions, packets (inputs freed go back)
        self.free_inputs[:0] = free
        c = self.c
        while self.next < len(self.pictures) and self.free_inputs:
            rid = self.free_inputs.pop(0)
            if self.copy:
                c.write_entries(self.inputs[rid], self.pictures[self.next])
            else:               # inputs come back in order: buffer i % INPUT_BUFFERS
                assert rid == self.next % len(self.inputs), (rid, self.next)
            token = c.queue(self.sid, p.QueueType.INPUT, rid, self.timestamps[self.next],
                            kick=False)
            c.kick(wait=False)
            self.in_flight[token] = rid
            self.next += 1

    def awaiting_device(self) -> bool:
        """Only the last packet is a wait to look at often for (the run's
        end): the others come at the encoder's pace, as the inputs do."""
        return not self.finished and len(self.result.packets) >= len(self.pictures) - 1

    def take_output(self, token: int, reply: bytes, requeue: bool = True) -> None:
        """EncodeRun's, reading only the packet's bytes out of the buffer
        (a guest's driver reads what the device wrote, not the whole
        buffer: a raw picture's size)."""
        seen = len(self.result.packets)
        rid, size = self.out_flight[token], p.RESOURCE_QUEUE_RESP.unpack(reply)[4]
        (whole,) = entries = self.outputs[rid]          # one piece each: sg_chunks=1
        self.outputs[rid] = [(whole[0], min(whole[1], size))]
        try:
            super().take_output(token, reply, requeue)
        finally:
            self.outputs[rid] = entries
        if len(self.result.packets) > seen:
            self.timing.packets.append(time.perf_counter())
            self.timing.data.append(self.result.packets[-1].data)

    def snapshot(self) -> None:
        self.snapshots.append((threads_of(os.getpid()), threads_of(self.qemu_pid)))

    def cpu(self) -> collections.Counter[str]:
        (driver0, qemu0), (driver1, qemu1) = self.snapshots
        pid, worker = self.qemu_pid, f"pyemb-venc-{self.sid}"

        def driver_role(tid: int, name: str) -> str:
            return "host driver" if tid == os.getpid() else "other threads"

        def qemu_role(tid: int, name: str) -> str:
            if tid == pid:
                return "QEMU main loop"
            if name == worker:          # x264's threads inherit the worker's name
                return "stream worker" if tid in qemu0 else "x264 threads"
            return "other threads"
        return by_role(driver0, driver1, driver_role) + by_role(qemu0, qemu1, qemu_role)

    def destroy(self) -> None:
        self.snapshot()
        super().destroy()
        # Last freed, first reused: the next stream's inputs get these
        # inputs back (pages this process has written to already), not
        # outputs of the same size (pages it has only read: written to,
        # they fault in again).
        alloc = self.c.m.alloc
        for entries in reversed([*self.inputs.values(), *self.outputs.values()]):
            for addr, _ in reversed(entries):
                alloc.free(addr)


def device(client: VideoClient, sid: int, packed: list[bytes], width: int, height: int,
           poll_s: float, cpu: list[dict[str, float]],
           copy: bool = False) -> tuple[Timing, EncoderSettings]:
    """The pictures through the device; also the settings it encodes with
    (read back from its controls), for the references."""
    rate, peak = BITRATES[width, height]
    run = MeasuredRun(client, sid, p.Format.H264, packed, width, height, copy=copy,
                      input_buffers=INPUT_BUFFERS, output_buffers=OUTPUT_BUFFERS,
                      frame_rate=FRAME_RATE,
                      controls={p.Control.BITRATE: rate, p.Control.BITRATE_PEAK: peak,
                                p.Control.BITRATE_MODE: 0})
    run.start()     # stream, params, controls, resources: set-up, not throughput

    def control(which: int) -> int:
        reply = client.call_ok(p.GET_CONTROL.pack(p.Cmd.GET_CONTROL, sid, which))
        return p.GET_CONTROL_RESP.unpack(reply)[2]
    settings = EncoderSettings(p.Format.H264, width, height, FRAME_RATE,
                               control(p.Control.BITRATE), control(p.Control.BITRATE_PEAK),
                               bool(control(p.Control.BITRATE_MODE)),
                               control(p.Control.PROFILE), control(p.Control.LEVEL),
                               bool(control(p.Control.PREPEND_SPSPPS_TO_IDR)))
    run.snapshot()
    run.timing.start = time.perf_counter()
    result = client.run([run], timeout=600, poll_interval=poll_s)[0]
    assert len(result.packets) == len(packed) and not result.output_errors
    cpu.append(per_frame(run.cpu(), len(packed)))
    return run.timing, settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=240)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sizes", default="720p,1080p",
                    help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--poll-ms", type=float, default=5.0,
                    help="how long the host driver sleeps between looks at the used ring "
                         f"(it has no interrupt; {INPUT_BUFFERS} input and {OUTPUT_BUFFERS} "
                         "output buffers cover it; each look costs it some 50 us of CPU, "
                         "which x264's threads want)")
    ap.add_argument("--copy", action="store_true",
                    help="the driver writes every picture into guest RAM in the timed span "
                         f"(default: {INPUT_BUFFERS} pictures are there already, in turn)")
    args = ap.parse_args()
    sizes = [SIZES[s.strip()] for s in args.sizes.split(",")]
    # Guest RAM faulted in up front (-mem-prealloc style): a guest's buffers
    # are pages its kernel has already touched.  Each stream's buffers go
    # back to the allocator after it, and the next stream of that size reuses them.
    # A kill (SIGTERM) unwinds like ^C does, so that QEMU is stopped below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    m = Machine.x86(["-device", "virtio-video-py-pci,role=encoder"], mem_mb=512,
                    prealloc=True, count_interrupts=False).start()
    try:
        dev = m.find_virtio(p.ENCODER_DEVICE_ID)
        dev.initialize(want_features=0b11)
        client = VideoClient(m, dev)
        sid = 1
        for width, height in sizes:
            packed = raw_pictures(width, height, args.frames if args.copy else INPUT_BUFFERS,
                                  noise=NOISE)
            if not args.copy:           # picture i is the one in buffer i % INPUT_BUFFERS
                packed = [packed[i % INPUT_BUFFERS] for i in range(args.frames)]
            arrays = [np.frombuffer(pic, np.uint8) for pic in packed]
            runs: dict[str, list[Timing]] = {"session": [], "plain": [], "device": []}
            used: dict[str, list[dict[str, float]]] = {k: [] for k in runs}
            same: dict[str, list[bool]] = {"session": [], "plain": []}
            # Warm-up, not counted: QEMU's first encoder session imports
            # the engine's modules, the driver's first buffers of a size are
            # pages it has not touched yet (later streams reuse them).
            _, settings = device(client, sid, packed[:INPUT_BUFFERS], width, height,
                                 args.poll_ms / 1000, [], args.copy)
            sid += 1
            session_direct(arrays[:INPUT_BUFFERS], settings, [])
            plain_pyav(arrays[:INPUT_BUFFERS], settings, [])
            for r in range(args.repeat):    # interleaved, each first in turn: noise hits all
                order = list(runs)[r % 3:] + list(runs)[:r % 3]
                for key in order:
                    if key == "device":
                        timing, _ = device(client, sid, packed, width, height,
                                           args.poll_ms / 1000, used["device"], args.copy)
                        sid += 1
                    elif key == "session":
                        timing = session_direct(arrays, settings, used["session"])
                    else:
                        timing = plain_pyav(arrays, settings, used["plain"])
                    runs[key].append(timing)
                for key in same:        # the device puts the headers before packet 1
                    ref = runs[key][-1]
                    same[key].append(runs["device"][-1].data[0] == ref.headers + ref.data[0]
                                     and runs["device"][-1].data[1:] == ref.data[1:])
            skip = len(packed) // 10
            whole = {k: [t.fps for t in v] for k, v in runs.items()}
            steady = {k: [t.steady_fps(skip) for t in v] for k, v in runs.items()}
            _, options = plain_options(settings)
            source = ("each picture copied into guest RAM" if args.copy else
                      f"{INPUT_BUFFERS} pictures in guest RAM, in turn")
            print(f"{width}x{height} H.264 from NV12 ({source}), libx264 "
                  f"{' '.join(f'{k}={v}' for k, v in options.items())}, {FRAME_RATE} fps "
                  f"content, grain {NOISE}, {len(packed)} frames, best of {args.repeat}, "
                  f"fps over the whole run / from packet {skip + 1} on:")
            for name, key in (("engine session direct:", "session"),
                              ("plain PyAV:", "plain"),
                              ("virtio-video-py (device):", "device")):
                kbps = statistics.median(t.kbps for t in runs[key])
                print(f"  {name:27} {max(whole[key]):7.1f} / {max(steady[key]):7.1f} fps"
                      f"   ({kbps:.0f} kbit/s)")
            print(f"  bitstream identical to the device's: engine session "
                  f"{sum(same['session'])} of {args.repeat} runs, plain PyAV "
                  f"{sum(same['plain'])} of {args.repeat} (headers before packet 1)")
            for ref, label in (("session", "engine session"), ("plain", "plain PyAV")):
                ratios = [d / r for d, r in zip(whole["device"], whole[ref], strict=True)]
                steady_ratios = [d / r for d, r in zip(steady["device"], steady[ref],
                                                       strict=True)]
                print(f"  device / {label + ',':16} whole run:     "
                      f"{statistics.median(ratios):.3f} median of paired runs, "
                      f"{max(whole['device']) / max(whole[ref]):.3f} best")
                print(f"  device / {label + ',':16} from packet {skip + 1:<3} "
                      f"{statistics.median(steady_ratios):.3f} median of paired runs, "
                      f"{max(steady['device']) / max(steady[ref]):.3f} best")
            first = {k: statistics.median(t.first_ms for t in v) for k, v in runs.items()}
            print(f"  first packet after: device {first['device']:.1f} ms, engine session "
                  f"{first['session']:.1f} ms, plain PyAV {first['plain']:.1f} ms (medians)")
            ms = {k: statistics.median(sum(u.values()) for u in v) / 1e3
                  for k, v in used.items()}
            print(f"  CPU per frame, all threads: engine session {ms['session']:.2f} ms, "
                  f"plain PyAV {ms['plain']:.2f} ms, device {ms['device']:.2f} ms, "
                  f"device / engine session {ms['device'] / ms['session']:.3f} (medians)")
            ratios = [d / r for d, r in zip(whole["device"], whole["session"], strict=True)]
            middle = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]
            print(f"  us per frame by thread, median paired run: engine session: "
                  f"{roles_line(used['session'][middle])}; plain PyAV: "
                  f"{roles_line(used['plain'][middle])}; device: "
                  f"{roles_line(used['device'][middle])}")
    finally:
        m.stop()


if __name__ == "__main__":
    main()
