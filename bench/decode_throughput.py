"""H.264 decoding through the whole virtio-video-py path vs PyAV directly.

Device path: the host-side driver feeds frame-sized input buffers through
qtest and shared guest RAM, QEMU hands them to the Python device model, the
stream's worker decodes with PyAV and writes NV12 into guest output buffers.
References, measured in the same run on the same stream with the same
decoder threads: PyAV decoding directly (to frames, and to NV12 as the device
must), and the ffmpeg CLI when one is installed (`make bench` installs
Debian's; its FFmpeg is older than PyAV's).  Prints frames per second over
the whole run and from the first tenth of the pictures on (the stream's rate
once it flows: the device's first pictures wait for the size event and the
driver's output buffers, a one-off cost printed as the time to the first
picture), the ratios (best of the repeats, and the median of ratios of runs
made back to back, which the machine's noise disturbs less), and the CPU time per frame
of every thread involved, in all and by role (FFmpeg's decoder threads, the
stream worker, QEMU's main loop, the host driver; PyAV's calling thread),
read from each thread's schedstat: on a machine with as few cores as this
one's, extra CPU is what costs frames.
Target: device >= 0.95 x PyAV direct (to NV12).

    .venv/bin/python -m bench.decode_throughput [--frames 600] [--repeat 3] [--poll-ms 2]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import av

from bench.threads import roles_line, threads_of
from pyemb.video import protocol as p
from pyemb.video.decoder import DecoderStream, align
from pyemb.video.resources import Resource
from pyemb.video_backend import PyAVSession
from tests.fakes import FakeChunk, FakeRequest
from tests.hostdriver import Machine
from tests.streams import encode, split_frames
from tests.video_client import StreamRun, VideoClient


@dataclass
class Timing:
    """When a run started and when each picture came out (perf_counter)."""

    start: float
    pictures: list[float] = field(default_factory=list)

    @property
    def fps(self) -> float:
        """The whole run: start-up and drain included."""
        return len(self.pictures) / (self.pictures[-1] - self.start)

    def steady_fps(self, skip: int) -> float:
        """From picture ``skip`` to the last: the stream's rate once it flows,
        without the one-off start (the device's first pictures wait for the
        driver to learn their size and allocate buffers for it)."""
        return (len(self.pictures) - 1 - skip) / (self.pictures[-1] - self.pictures[skip])

    @property
    def first_ms(self) -> float:
        return (self.pictures[0] - self.start) * 1e3


def pyav_direct(frames: list[bytes], to_nv12: bool,
                threads: list[collections.Counter[str]] | None = None) -> Timing:
    """``threads``: gets the CPU by thread role at the start and at the end,
    while the decoder's threads still live."""
    ctx = av.CodecContext.create("h264", "r")
    ctx.thread_type = "AUTO"
    ctx.thread_count = 0
    if threads is not None:
        threads.append(thread_cpu(os.getpid(), "PyAV caller"))
    timing = Timing(time.perf_counter())
    out = timing.pictures
    for chunk in [*frames, None]:
        for pkt in ctx.parse(chunk):
            for frame in ctx.decode(pkt):
                if to_nv12:
                    frame.reformat(format="nv12", threads=1)
                out.append(time.perf_counter())
    for frame in ctx.decode(None):
        if to_nv12:
            frame.reformat(format="nv12", threads=1)
        out.append(time.perf_counter())
    if threads is not None:
        threads.append(thread_cpu(os.getpid(), "PyAV caller"))
    return timing


class MeasuredRun(StreamRun):
    """Takes the CPU by thread role just before the stream is destroyed."""

    def __init__(self, *args, qemu_pid: int, **kw) -> None:
        super().__init__(*args, **kw)
        self.qemu_pid = qemu_pid
        self.threads: list[collections.Counter[str]] = []
        self.timing = Timing(0.0)

    def take_output(self, token: int, reply: bytes, requeue: bool) -> None:
        seen = len(self.result.pictures)
        super().take_output(token, reply, requeue)
        if len(self.result.pictures) > seen:
            self.timing.pictures.append(time.perf_counter())

    def snapshot(self) -> None:
        self.threads.append(thread_cpu(os.getpid(), "host driver")
                            + thread_cpu(self.qemu_pid, "QEMU main loop"))

    def destroy(self) -> None:
        self.snapshot()
        super().destroy()


def device(client: VideoClient, sid: int, frames: list[bytes], poll_s: float,
           threads: list[collections.Counter[str]]) -> Timing:
    run = MeasuredRun(client, sid, p.Format.H264, [(f, i) for i, f in enumerate(frames)],
                      input_buffers=16, output_buffers=24, read_pictures=False,
                      qemu_pid=client.m.proc.pid)
    run.start()     # stream and input resources: set-up, not throughput
    run.snapshot()
    run.timing.start = time.perf_counter()
    result = client.run([run], poll_interval=poll_s)[0]
    assert len(result.pictures) == len(frames)
    threads += run.threads
    return run.timing


def model_alone(frames: list[bytes], poll_s: float, width: int, height: int) -> Timing:
    """The device's own stream logic (DecoderStream on a PyAV session, the
    same buffers and counts) fed from this process, without QEMU, the
    virtqueues or the stand-in driver: what the device model costs by
    itself, to tell it apart from the transport's share."""
    stream = DecoderStream(1, p.Format.H264, p.MemType.GUEST_PAGES, p.MemType.GUEST_PAGES,
                           PyAVSession("h264"), lambda kind, sid: None,
                           lambda e, what: print(f"model: {what}: {e}"), contextlib.nullcontext)
    inputs = [Resource(rid, p.QueueType.INPUT, p.PlanesLayout.SINGLE_BUFFER, [0],
                       [FakeChunk(1 << 20)]) for rid in range(16)]
    outputs = [Resource(rid, p.QueueType.OUTPUT, p.PlanesLayout.SINGLE_BUFFER, [0],
                        [FakeChunk(align(width) * align(height) * 3 // 2)]) for rid in range(24)]
    resp = p.RESOURCE_QUEUE_RESP.size
    in_flight: list[tuple[FakeRequest, Resource]] = []
    out_flight: list[tuple[FakeRequest, Resource]] = []
    todo = list(frames)
    timing = Timing(time.perf_counter())
    with stream.lock:
        for res in outputs:
            out_flight.append((FakeRequest([], [resp]), res))
            stream.queue_output(out_flight[-1][0], res)
    eos = drain_sent = False
    try:
        while not eos:
            with stream.lock:
                stream.output_set_up()    # the driver follows the size event
                for req, res in [x for x in in_flight if x[0].done]:
                    in_flight.remove((req, res))
                    inputs.append(res)
                for req, res in [x for x in out_flight if x[0].done]:
                    out_flight.remove((req, res))
                    if p.RESOURCE_QUEUE_RESP.unpack(req.reply)[3] & p.BufferFlag.EOS:
                        eos = True
                        continue
                    timing.pictures.append(time.perf_counter())
                    out_flight.append((FakeRequest([], [resp]), res))
                    stream.queue_output(out_flight[-1][0], res)
                while todo and inputs:
                    res, data = inputs.pop(), todo.pop(0)
                    res.chunks[0].view[:len(data)] = data
                    in_flight.append((FakeRequest([], [resp]), res))
                    stream.queue_input(in_flight[-1][0], res, len(data), 0)
                if not todo and not drain_sent:
                    stream.start_drain(FakeRequest([], [64]))
                    drain_sent = True
            time.sleep(poll_s)
    finally:
        with stream.lock:
            stream.destroy()
        stream.thread.join(5)
    return timing


def thread_cpu(pid: int, main_role: str) -> collections.Counter[str]:
    """CPU nanoseconds so far of every live thread of ``pid``, summed by
    role.  Decoder threads end with their stream: take it before that."""
    roles: collections.Counter[str] = collections.Counter()
    for tid, (name, ns) in threads_of(pid).items():
        if name.startswith("av:"):
            role = "FFmpeg threads"
        elif name.startswith("pyemb-video"):
            role = "stream worker"
        elif tid == pid:
            role = main_role
        else:
            role = "other threads"
        roles[role] += ns
    return roles


def per_frame(before: collections.Counter[str], after: collections.Counter[str],
              frames: int) -> dict[str, float]:
    """Microseconds of CPU per frame by thread role, busiest first."""
    used = {role: (after[role] - before[role]) / frames / 1e3 for role in after}
    return dict(sorted(((r, us) for r, us in used.items() if us >= 1), key=lambda x: -x[1]))


def ffmpeg_cli(data: bytes) -> float | None:
    exe = shutil.which("ffmpeg")
    if exe is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".h264") as f:
        f.write(data)
        f.flush()
        cmd = [exe, "-v", "error", "-threads", "0", "-i", f.name, "-f", "null", "-"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        elapsed = time.perf_counter() - t0
    return len(split_frames(data)) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--poll-ms", type=float, default=2.0,
                    help="how long the host driver sleeps between looks at the used ring "
                         "(it has no interrupt; 16 input and 24 output buffers cover it)")
    args = ap.parse_args()
    # Guest RAM faulted in up front (-mem-prealloc style): a guest's buffers
    # are pages its kernel has already touched, the driver's fresh ones not.
    # The driver's allocator never frees: every stream takes fresh buffers.
    with Machine.x86(["-device", "virtio-video-py-pci"], mem_mb=max(1024, 400 * args.repeat),
                     prealloc=True, count_interrupts=False) as m:
        dev = m.find_virtio(p.DECODER_DEVICE_ID)
        dev.initialize(want_features=0b11)
        client = VideoClient(m, dev)
        sid = 1
        for (width, height), noise in itertools.product(((1280, 720), (1920, 1080)), (0, 12)):
            data = b"".join(d for d, _ in encode("h264", width, height, args.frames,
                                                 noise=noise))
            frames = split_frames(data)
            runs: dict[str, list[Timing]] = {"direct": [], "nv12": [], "device": [],
                                             "model": []}
            cli_fps: list[float] = []
            used: dict[str, list[dict[str, float]]] = {"nv12": [], "device": []}
            for _ in range(args.repeat):          # interleaved: noise hits both alike
                runs["direct"].append(pyav_direct(frames, to_nv12=False))
                direct_threads: list[collections.Counter[str]] = []
                runs["nv12"].append(pyav_direct(frames, True, direct_threads))
                device_threads: list[collections.Counter[str]] = []
                runs["device"].append(device(client, sid, frames, args.poll_ms / 1000,
                                             device_threads))
                runs["model"].append(model_alone(frames, args.poll_ms / 1000, width, height))
                used["nv12"].append(per_frame(*direct_threads, len(frames)))
                used["device"].append(per_frame(*device_threads, len(frames)))
                sid += 1
                cli = ffmpeg_cli(data)
                if cli is not None:
                    cli_fps.append(cli)
            skip = len(frames) // 10
            whole = {k: [t.fps for t in v] for k, v in runs.items()}
            steady = {k: [t.steady_fps(skip) for t in v] for k, v in runs.items()}
            ratios = [d / n for d, n in zip(whole["device"], whole["nv12"], strict=True)]
            steady_ratios = [d / n for d, n in zip(steady["device"], steady["nv12"], strict=True)]
            content = "grainy pattern" if noise else "smooth pattern"
            print(f"{width}x{height} H.264, {content}, {len(data) * 8 * 25 // len(frames) // 1000}"
                  f" kbit/s at 25 fps, {len(frames)} frames, best of {args.repeat}, "
                  f"fps over the whole run / from picture {skip + 1} on:")
            for name, key in (("PyAV direct, frames:", "direct"), ("PyAV direct, to NV12:", "nv12"),
                              ("virtio-video-py (device):", "device"),
                              ("device model alone:", "model")):
                print(f"  {name:27} {max(whole[key]):7.1f} / {max(steady[key]):7.1f} fps")
            if cli_fps:
                print(f"  ffmpeg CLI ({av_version_cli()}): {max(cli_fps):7.1f} fps (whole run)")
            print(f"  device / PyAV direct NV12, whole run:       {statistics.median(ratios):.3f} "
                  f"median of paired runs, {max(whole['device']) / max(whole['nv12']):.3f} best")
            print(f"  device / PyAV direct NV12, from picture {skip + 1:<4} "
                  f"{statistics.median(steady_ratios):.3f} median of paired runs, "
                  f"{max(steady['device']) / max(steady['nv12']):.3f} best")
            model_ratios = [m.steady_fps(skip) / n.steady_fps(skip)
                            for m, n in zip(runs["model"], runs["nv12"], strict=True)]
            print(f"  device model alone (no QEMU, no driver) / PyAV direct NV12, from "
                  f"picture {skip + 1}: {statistics.median(model_ratios):.3f} median")
            print(f"  device / PyAV direct (frames), whole run:   "
                  f"{max(whole['device']) / max(whole['direct']):.3f} best")
            if cli_fps:
                print(f"  device / ffmpeg CLI, whole run:             "
                      f"{max(whole['device']) / max(cli_fps):.3f} best")
            first = {k: statistics.median(t.first_ms for t in v) for k, v in runs.items()}
            print(f"  first picture after: device {first['device']:.1f} ms (the size event, "
                  f"then output buffers), PyAV direct NV12 {first['nv12']:.1f} ms (medians)")
            nv12_ms = statistics.median(sum(u.values()) for u in used["nv12"]) / 1e3
            device_ms = statistics.median(sum(u.values()) for u in used["device"]) / 1e3
            print(f"  CPU per frame, all threads: PyAV direct NV12 {nv12_ms:.2f} ms, "
                  f"device {device_ms:.2f} ms, ratio {device_ms / nv12_ms:.3f} (medians)")
            middle = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]
            print(f"  us per frame by thread, median paired run: PyAV direct NV12: "
                  f"{roles_line(used['nv12'][middle])}; device: "
                  f"{roles_line(used['device'][middle])}")
        times = []
        for _ in range(500):
            t0 = time.perf_counter()
            client.call(p.QUERY_CONTROL.pack(p.Cmd.QUERY_CONTROL, 0, p.Control.LEVEL,
                                             p.Format.H264))
            times.append(time.perf_counter() - t0)
        print(f"synchronous command round trip (QUERY_CONTROL), median: "
              f"{statistics.median(times) * 1e6:.0f} us (host driver and qtest included; "
              "see bench.control_roundtrip for the shim's own share)")


def av_version_cli() -> str:
    out = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout
    return out.split()[2] if out else "?"


if __name__ == "__main__":
    main()
