"""Playback pacing: virtio-snd-py-pci vs QEMU's virtio-sound-pci, same run.

The host driver plays S16 stereo 48 kHz in 5 ms periods with four periods
queued (as ALSA does) and notes when each message comes back.  The ideal
device completes message k when the stream clock reaches it: START + k
periods.  Printed per device: the pacing error of completions against that
clock (median, p99, max), the time from PCM_START to the first frame at the
sink (pyemb: measured by a probe backend inside QEMU on the same monotonic
clock), how many host copies a PCM byte takes on its way to the backend,
and the completion-time ratio.

    .venv/bin/python -m bench.snd_pacing [--seconds 30] [--period-ms 5]
"""

from __future__ import annotations

import argparse
import statistics
import struct
import tempfile
import time
from pathlib import Path

from pyemb.snd import protocol as p
from pyemb.snd_backend import SndBackend
from tests.hostdriver import Machine, VirtioDevice

REPO = Path(__file__).resolve().parents[1]
RATE, CHANNELS, WIDTH = 48000, 2, 2


class ProbeSink(SndBackend):
    """Discards frames; appends (monotonic time, frames, zero-copy?) to a file."""

    def __init__(self, options, stream_id, direction):
        super().__init__({}, stream_id, direction)
        self.log = open(options["log"], "a")  # noqa: SIM115 - lives as long as the stream

    def write(self, frames):
        # A memoryview here is guest RAM itself: no copy was made on the way.
        self.log.write(f"{time.monotonic()} {len(frames)} {isinstance(frames, memoryview)}\n")
        self.log.flush()


def ctl(dev: VirtioDevice, command: bytes) -> None:
    reply = dev.queues[p.CONTROL_QUEUE].call([command], [4]).data
    assert p.HDR.unpack_from(reply)[0] == p.Status.OK, reply


class VirtualClock:
    """Under ``-accel qtest`` QEMU's virtual clock stands still unless the test
    steps it, and QEMU's audio subsystem runs on it: step it in real time."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.last = time.monotonic()

    def wait(self, queue) -> None:
        deadline = time.monotonic() + 30
        while queue.poll() is None:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError("no used buffer within 30 s")
            step = int((now - self.last) * 1e9)
            if step > 0:
                self.m.qtest.cmd(f"clock_step {step}")
                self.last = now
            time.sleep(0.0002)


def play(m: Machine, dev: VirtioDevice, seconds: float,
         period_frames: int) -> tuple[float, list[float]]:
    """Returns START time and the completion time of every message."""
    clock = VirtualClock(m)
    period = period_frames * CHANNELS * WIDTH
    ctl(dev, p.SetParams(0, period * 4, period, 0, CHANNELS, p.FORMAT_INDEX["S16"],
                         p.RATE_INDEX[RATE]).pack())
    ctl(dev, p.PCM_HDR.pack(p.Code.PCM_PREPARE, 0))
    tx = dev.queues[p.TX_QUEUE]
    total = int(seconds * RATE / period_frames)
    payload = bytes(period)
    for _ in range(4):
        tx.add([struct.pack("<I", 0), payload], [8])
    tx.kick()
    sent = 4
    started = time.monotonic()
    ctl(dev, p.PCM_HDR.pack(p.Code.PCM_START, 0))
    done: list[float] = []
    while len(done) < total:
        clock.wait(tx)
        done.append(time.monotonic())
        if sent < total:
            tx.add([struct.pack("<I", 0), payload], [8])
            tx.kick()
            sent += 1
    ctl(dev, p.PCM_HDR.pack(p.Code.PCM_STOP, 0))
    ctl(dev, p.PCM_HDR.pack(p.Code.PCM_RELEASE, 0))
    return started, done


def errors_ms(started: float, done: list[float], period_s: float) -> list[float]:
    return [(t - (started + k * period_s)) * 1e3 for k, t in enumerate(done)]


def summary(errs: list[float]) -> str:
    ordered = sorted(abs(e) for e in errs)
    p99 = ordered[int(len(ordered) * 0.99) - 1]
    return (f"median {statistics.median(errs):+8.3f} ms  p99 |err| {p99:8.3f} ms  "
            f"max |err| {ordered[-1]:8.3f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--period-ms", type=float, default=5.0)
    args = ap.parse_args()
    period_frames = int(RATE * args.period_ms / 1000)
    period_s = period_frames / RATE
    tmp = Path(tempfile.mkdtemp(prefix="pyemb-bench-snd-"))
    log = tmp / "sink.log"
    cfg = tmp / "snd.toml"
    cfg.write_text(f"""
[[snd.streams]]
direction = "output"
formats = ["S16"]
rates = [{RATE}]
backend = {{ name = "bench.snd_pacing:ProbeSink", log = "{log}" }}
""")
    env = {"PYTHONPATH": str(REPO)}
    results = {}
    for name, device in (
        ("virtio-snd-py-pci (pyemb)", ["-device", f"virtio-snd-py-pci,config={cfg}"]),
        ("virtio-sound-pci (QEMU)", ["-audiodev", f"wav,id=a,path={tmp}/qemu.wav",
                                     "-device", "virtio-sound-pci,audiodev=a"]),
    ):
        with Machine.x86(device, env=env, count_interrupts=False) as m:
            dev = m.find_virtio(p.DEVICE_ID)
            dev.initialize()
            results[name] = play(m, dev, args.seconds, period_frames)
    print(f"playback pacing, {args.seconds:.0f} s of S16 stereo {RATE} Hz, "
          f"{args.period_ms:g} ms periods, 4 queued")
    print("completion time - stream clock (START + k periods), seen by the host driver:")
    spans = {}
    for name, (started, done) in results.items():
        print(f"  {name:27s} {summary(errors_ms(started, done, period_s))}")
        spans[name] = done[-1] - started
    ideal = (len(done) - 1) * period_s
    for name, span in spans.items():
        print(f"  {name:27s} last completion after {span:7.3f} s "
              f"(stream clock {ideal:.3f} s, ratio {span / ideal:.4f})")
    sink = [line.split() for line in log.read_text().splitlines()]
    started = results["virtio-snd-py-pci (pyemb)"][0]
    first = float(sink[0][0])
    print(f"PCM_START -> first frame at the pyemb sink: {(first - started) * 1e3:.3f} ms "
          "(START sent by the host driver, frame seen by the backend inside QEMU)")
    zero_copy = all(v == "True" for _, _, v in sink)
    print(f"host copies per PCM byte before the backend: {0 if zero_copy else 1} "
          f"({'a view over guest RAM' if zero_copy else 'gathered'}); "
          "the WAV and PortAudio backends then copy once (file / PortAudio ring)")


if __name__ == "__main__":
    main()
