"""1080p30 capture through virtio-media-py's camera, as a guest would stream it.

The host test driver opens the camera node over the commandq, sets
1920x1080 at 30 fps, allocates MMAP buffers in shared memory region 0,
queues them, streams for ``--seconds`` and re-queues every buffer as soon as
its DQBUF event arrives (a client that keeps up: what is lost is the
device's doing).  Prints:

- frames delivered vs asked (seconds x 30; target: none dropped), and the
  gaps in the sequence numbers;
- jitter of the frame timestamps against the ideal clock (sequence x
  1/30 s from the median phase): median, p99 and worst, in ms;
- CPU per frame by thread role in QEMU (the camera's pacing thread
  ``pyemb-camera``, QEMU's main loop, the rest), and the reference: the
  same source rendering the same pictures directly in this process, with
  the ratio device / reference for the pacing thread.

    .venv/bin/python -m bench.media_capture [--seconds 30] [--format YUYV] [--buffers 6]
        [--memory mmap|userptr]

``--memory userptr`` puts the buffers in guest RAM instead (the device maps
each one at QBUF): the difference in CPU per frame is what MMAP saves or
costs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from bench.threads import roles_line, threads_of
from pyemb.camera_source import TestPattern
from pyemb.media import protocol as p
from pyemb.media import v4l2
from pyemb.media.formats import ImageFormat
from tests.hostdriver.machine import Machine
from tests.media_client import HostDriverMedia

FPS = 30
WIDTH, HEIGHT = 1920, 1080


def role(name: str) -> str:
    if name.startswith("pyemb-camera"):
        return "pacing thread"
    if name.startswith("qemu-system"):
        return "main loop"
    return "other"


def cpu_by_role(before: dict, after: dict) -> dict[str, int]:
    used: dict[str, int] = {}
    for tid, (name, ns) in after.items():
        start = before.get(tid, (name, 0))[1]
        used[role(name)] = used.get(role(name), 0) + ns - start
    return used


def device_run(seconds: float, fourcc: str, buffers: int, userptr: bool) -> dict:
    with Machine.x86(["-device", "virtio-media-py-pci"], mem_mb=256,
                     count_interrupts=False) as m:
        media = HostDriverMedia(m, m.find_virtio(p.DEVICE_ID))
        c = media.client
        s = c.open()
        c.s_fmt(s, fourcc, WIDTH, HEIGHT)
        parm = v4l2.StreamParm(type=v4l2.BUF_TYPE_VIDEO_CAPTURE)
        parm.parm.capture.timeperframe.numerator = 1
        parm.parm.capture.timeperframe.denominator = FPS
        c.ioctl(s, "s_parm", parm)
        size = ImageFormat(v4l2.fourcc(fourcc), WIDTH, HEIGHT).sizeimage
        memory = v4l2.MEMORY_USERPTR if userptr else v4l2.MEMORY_MMAP
        c.reqbufs(s, buffers, memory=memory)
        # USERPTR: each buffer one range of guest RAM, as a guest's pages
        # would be after the driver merged them.
        sgs = {i: p.SG_ENTRY.pack(m.alloc.alloc(size, 4096), size, 0) for i in range(buffers)}

        def queue(i: int) -> None:
            if userptr:
                c.qbuf(s, i, memory=memory, userptr=0x10000 * (i + 1), length=size, sg=sgs[i])
            else:
                c.qbuf(s, i)

        for i in range(buffers):
            queue(i)
        before = threads_of(m.proc.pid)
        c.stream(s, True)
        frames: list[tuple[int, int]] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for event in media.events(1, timeout=0.2):
                b = event.buffer
                frames.append((b.sequence, b.timestamp.tv_sec * 1_000_000 + b.timestamp.tv_usec))
                queue(b.index)
        after = threads_of(m.proc.pid)
        c.stream(s, False)
    return {"frames": frames, "cpu": cpu_by_role(before, after)}


def reference_us_per_frame(fourcc: str, count: int = 300) -> float:
    """The source rendering into a buffer in this process: its CPU per picture."""
    fmt = ImageFormat(v4l2.fourcc(fourcc), WIDTH, HEIGHT)
    source = TestPattern()
    source.start(fmt, FPS)
    target = np.zeros(fmt.sizeimage, np.uint8)
    source.render(0, target)
    start = time.thread_time_ns()
    for i in range(count):
        source.render(i, target)
    return (time.thread_time_ns() - start) / count / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--format", default="YUYV", choices=["YUYV", "NV12", "YU12"])
    parser.add_argument("--buffers", type=int, default=6)
    parser.add_argument("--memory", default="mmap", choices=["mmap", "userptr"])
    args = parser.parse_args()
    run = device_run(args.seconds, args.format, args.buffers, args.memory == "userptr")
    frames = run["frames"]
    asked = int(args.seconds * FPS)
    sequences = [s for s, _ in frames]
    gaps = sum(b - a - 1 for a, b in zip(sequences, sequences[1:], strict=False))
    print(f"1080p{FPS} {args.format}, {args.buffers} {args.memory.upper()} buffers, "
          f"{args.seconds:.0f} s")
    print(f"frames delivered {len(frames)} of {asked} asked ({len(frames) / asked:.3f}), "
          f"sequence gaps {gaps}")
    if len(frames) > 1:
        # The ideal clock's phase: the median offset, so one late first
        # frame does not shift every other one.
        t0 = statistics.median(ts - seq * 1_000_000 / FPS for seq, ts in frames)
        jitter = [abs(ts - (t0 + seq * 1_000_000 / FPS)) / 1000 for seq, ts in frames]
        jitter.sort()
        print(f"timestamp jitter vs ideal clock: median {statistics.median(jitter):.2f} ms, "
              f"p99 {jitter[int(len(jitter) * 0.99) - 1]:.2f} ms, worst {jitter[-1]:.2f} ms")
    count = max(len(frames), 1)
    per_frame = {r: ns / count / 1000 for r, ns in sorted(run["cpu"].items())}
    print("device CPU per frame (us):", roles_line(per_frame))
    ref = reference_us_per_frame(args.format)
    print(f"reference: the source rendering in process, {ref:.0f} us per frame; "
          f"pacing thread / reference = {per_frame.get('pacing thread', 0) / ref:.2f}")


if __name__ == "__main__":
    main()
