"""Host memory through a long soak: does anything a guest repeats grow QEMU?

Two QEMUs, driven by the host driver for ``--minutes`` each, at the same
time: one with virtio-video-py (decoder) and virtio-video-py
(role=encoder), looping create stream / decode a short H.264 clip / destroy
and create / encode 8 pictures / destroy; one with virtio-snd-py looping
set_params / prepare / start / play 4 periods / stop / release.  QEMU's
RSS (from /proc) is sampled every ``--every`` seconds.  The reference is
the same process earlier in the run: the growth over the last half must be
under 1 MB (issue 15's target).  Prints the curve, loops per second and the
growth.

    .venv/bin/python -m bench.soak [--minutes 10] [--every 30]
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import threading
import time
from pathlib import Path

from bench.heap import rss_mb
from pyemb.snd import protocol as snd
from pyemb.video import protocol as p
from tests.encoder_client import EncodeRun, raw_pictures
from tests.hostdriver import Machine
from tests.streams import encode
from tests.test_snd_qtest import PERIOD, ctl, ok, set_params, start_card
from tests.video_client import StreamRun, VideoClient


def free_buffers(client: VideoClient, run: StreamRun | EncodeRun) -> None:
    """Give a finished run's guest buffers back to the driver's allocator."""
    for entries in [*run.inputs.values(), *run.outputs.values()]:
        for addr, _ in entries:
            client.m.alloc.free(addr)


def video_loop(stop: threading.Event, counts: dict[str, int], pids: dict[str, int]) -> None:
    clip = [(data, i) for i, (data, _) in enumerate(encode("h264", 160, 96, 12))]
    pictures = raw_pictures(160, 96, 8)
    m = Machine.x86(["-device", "virtio-video-py-pci",
                     "-device", "virtio-video-py-pci,role=encoder"], mem_mb=256,
                    count_interrupts=False).start()
    try:
        pids["video"] = m.proc.pid
        devices = {d.device_id: d for d in m.virtio_devices()}     # enumerated once
        decoder = VideoClient(m, init(devices[p.DECODER_DEVICE_ID]))
        encoder = VideoClient(m, init(devices[p.ENCODER_DEVICE_ID]))
        while not stop.is_set():
            decode = StreamRun(decoder, 1, p.Format.H264, clip)
            decoder.run([decode])
            free_buffers(decoder, decode)
            encode_run = EncodeRun(encoder, 1, p.Format.H264, pictures, 160, 96)
            encoder.run([encode_run])
            free_buffers(encoder, encode_run)
            counts["video"] += 1
    finally:
        m.stop()


def init(dev):
    dev.initialize(want_features=0b11)
    return dev


def snd_loop(stop: threading.Event, counts: dict[str, int], pids: dict[str, int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        m, dev = start_card("pci", Path(tmp))
        try:
            pids["snd"] = m.proc.pid
            tx = dev.queues[snd.TX_QUEUE]
            while not stop.is_set():
                assert ok(set_params(dev, 0))
                assert ok(ctl(dev, snd.PCM_HDR.pack(snd.Code.PCM_PREPARE, 0)))
                for _ in range(4):
                    tx.add([struct.pack("<I", 0), bytes(PERIOD)], [8])
                tx.kick()
                assert ok(ctl(dev, snd.PCM_HDR.pack(snd.Code.PCM_START, 0)))
                for _ in range(4):
                    tx.wait(timeout=5)
                assert ok(ctl(dev, snd.PCM_HDR.pack(snd.Code.PCM_STOP, 0)))
                assert ok(ctl(dev, snd.PCM_HDR.pack(snd.Code.PCM_RELEASE, 0)))
                counts["snd"] += 1
        finally:
            m.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--every", type=float, default=30)
    args = ap.parse_args()
    stop = threading.Event()
    counts = {"video": 0, "snd": 0}
    pids: dict[str, int] = {}
    errors: list[BaseException] = []

    def guarded(loop):
        def run() -> None:
            try:
                loop(stop, counts, pids)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                stop.set()
        return run

    threads = [threading.Thread(target=guarded(loop)) for loop in (video_loop, snd_loop)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    curve: dict[str, list[tuple[float, float]]] = {"video": [], "snd": []}
    try:
        while time.monotonic() - t0 < args.minutes * 60 and not stop.is_set():
            time.sleep(args.every)
            for name, pid in pids.items():
                if stop.is_set():
                    break
                curve[name].append((time.monotonic() - t0, rss_mb(pid)))
                print(f"{curve[name][-1][0]:6.0f} s  {name:5}  RSS {curve[name][-1][1]:7.1f} MB"
                      f"  {counts[name]} loops", flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    if errors:
        raise errors[0]
    for name, points in curve.items():
        if len(points) < 2:
            continue
        half = [mb for s, mb in points if s >= points[-1][0] / 2]
        growth = half[-1] - half[0]
        elapsed = points[-1][0]
        print(f"{name}: {counts[name] / elapsed:.1f} loops/s, RSS {points[0][1]:.1f} -> "
              f"{points[-1][1]:.1f} MB, over the last half {growth:+.2f} MB "
              f"({'under' if growth < 1 else 'NOT under'} the 1 MB target)")


if __name__ == "__main__":
    main()
