"""Hot-unplug loop: plug the three pyemb devices, start a stream on each,
unplug them mid-stream, again and again (issue 15: 1,000 cycles, no leak,
no crash).

One QEMU (x86_64 pc, PIIX4 ACPI hotplug) driven by the host driver.  A
cycle: ``device_add`` virtio-snd-py-pci (null backend), virtio-video-py-pci
(decoder) and virtio-media-py-pci (camera); the driver initializes each and
starts a stream on each (playback with four periods queued; a decoder
stream fed a clip's first pictures; the camera streaming into MMAP buffers);
then ``device_del`` of all three and the eject.  QEMU's RSS is sampled every
``--every`` cycles.  RSS saws (freed memory goes back to the kernel in lumps:
arena trims, unplugged devices' memory after RCU and garbage collection), so
the figure is the floor of the last quarter of the samples against the
second quarter's (the first is allocators and caches warming up).  With
``--heap`` the heap probe (bench/heap.py) also reports malloc's bytes in use
and the Python heap's blocks the same way: level ones mean RSS above them is
the allocator keeping pages, not a leak.  QEMU's stderr must stay empty.

    .venv/bin/python -m bench.unplug_loop [--cycles 1000] [--every 100] [--heap]
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import heap
from pyemb.media import protocol as media
from pyemb.snd import protocol as snd
from pyemb.video import protocol as p
from tests.hostdriver import Machine
from tests.hostdriver.memory import Allocator
from tests.media_client import HostDriverMedia
from tests.streams import encode
from tests.test_snd_qtest import PERIOD, ctl, ok, set_params
from tests.video_client import StreamRun, VideoClient

SLOTS = {"snd": 5, "video": 6, "media": 7}
SETTLE_S = 1.0


def snd_config(tmp: Path) -> Path:
    path = tmp / "snd.toml"
    path.write_text('[[snd.streams]]\ndirection = "output"\nformats = ["S16"]\n'
                    'rates = [48000]\nbackend = "null"\n')
    return path


KINDS = tuple(SLOTS)


def plug(m: Machine, config: Path, kinds: tuple[str, ...] = KINDS) -> None:
    extra = {"snd": {"config": str(config)}}
    for kind in kinds:
        m.qmp.execute("device_add", driver=f"virtio-{kind}-py-pci", id=kind,
                      addr=str(SLOTS[kind]), **extra.get(kind, {}))


def unplug(m: Machine, kinds: tuple[str, ...] = KINDS) -> None:
    for dev_id in kinds:
        slot = SLOTS[dev_id]
        m.qmp.execute("device_del", id=dev_id)
        m.qtest.outl(0xAE08, 1 << slot)             # PIIX4 ACPI PCI hotplug: eject
        m.qmp.wait_event("DEVICE_DELETED")


def start_streams(m: Machine, clip: list[tuple[bytes, int]], kinds: tuple[str, ...] = KINDS
                  ) -> None:
    devices = {d.device_id: d for d in m.virtio_devices()}
    if "snd" in kinds:
        start_sound(devices[snd.DEVICE_ID])
    if "video" in kinds:
        decoder = devices[p.DECODER_DEVICE_ID]
        decoder.initialize(want_features=0b11)
        StreamRun(VideoClient(m, decoder), 1, p.Format.H264, clip).start()
    if "media" in kinds:
        camera = HostDriverMedia(m, devices[media.DEVICE_ID])
        c = camera.client
        s = c.open()
        c.reqbufs(s, 2)
        c.qbuf(s, 0)
        c.qbuf(s, 1)
        c.stream(s, True)


def start_sound(card) -> None:  # noqa: ANN001 - a tests.hostdriver VirtioDevice
    card.initialize(want_features=1 << snd.F_CTLS)
    assert ok(set_params(card, 0))
    assert ok(ctl(card, snd.PCM_HDR.pack(snd.Code.PCM_PREPARE, 0)))
    tx = card.queues[snd.TX_QUEUE]
    for _ in range(4):
        tx.add([struct.pack("<I", 0), bytes(PERIOD)], [8])
    tx.kick()
    assert ok(ctl(card, snd.PCM_HDR.pack(snd.Code.PCM_START, 0)))


def cycles(m: Machine, count: int, tmp: Path, every: int = 0,
           report: Callable[[dict[str, float]], None] | None = None,
           kinds: tuple[str, ...] = KINDS, probe: Path | None = None) -> list[dict[str, float]]:
    """Run ``count`` cycles; every ``every`` cycles a sample: the cycle, RSS
    (MB) and, with ``probe`` (the heap probe's file), its latest figures."""
    config = snd_config(tmp)
    clip = [(data, i) for i, (data, _) in enumerate(encode("h264", 160, 96, 6))]
    curve = []
    # The devices' rings and buffers go with them: the driver starts each
    # cycle from the same guest memory (a slot's MSI-X vectors are its own).
    ring_memory = m.alloc.next
    for n in range(1, count + 1):
        m.alloc = Allocator(ring_memory, m.alloc.end)
        plug(m, config, kinds)
        start_streams(m, clip, kinds)
        unplug(m, kinds)
        if every and n % every == 0:
            # Unplugged devices' memory goes after an RCU grace period and
            # the Python side's at its next collection: let both happen.
            time.sleep(SETTLE_S)
            sample = {"cycle": n, "rss_mb": heap.rss_mb(m.proc.pid)}
            if probe is not None:
                sample.update(heap.latest(probe) or {})
            curve.append(sample)
            if report:
                report(sample)
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--devices", default=",".join(KINDS), help="of snd, video, media")
    ap.add_argument("--heap", action="store_true",
                    help="load the heap probe: malloc's and Python's figures too")
    args = ap.parse_args()
    kinds = tuple(args.devices.split(","))
    t0 = time.monotonic()

    def report(s: dict[str, float]) -> None:
        extra = (f"  malloc in use {s['malloc_in_use'] / 2**20:6.1f} MB  Python blocks "
                 f"{s['py_blocks']:8.0f}" if "malloc_in_use" in s else "")
        print(f"{s['cycle']:6.0f} cycles  RSS {s['rss_mb']:7.1f} MB{extra}  "
              f"{time.monotonic() - t0:6.0f} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "heap.jsonl" if args.heap else None
        env = heap.probe_env(probe) if probe else None
        with Machine.x86([], mem_mb=256, count_interrupts=False, env=env) as m:
            curve = cycles(m, args.cycles, Path(tmp), args.every, report, kinds, probe)
            alive = m.alive()
            stderr = m.stderr()
    print(f"{args.cycles} cycles in {time.monotonic() - t0:.0f} s; QEMU alive: {alive}; "
          f"stderr: {len(stderr)} bytes")
    print(heap.growth_line("RSS", [s["rss_mb"] for s in curve]) + " (target under 1 MB)")
    if args.heap:
        print(heap.growth_line("malloc in use",
                               [s.get("malloc_in_use", 0) / 2**20 for s in curve]))
        print(heap.growth_line("Python heap", [s.get("py_blocks", 0) for s in curve],
                               "blocks"))


if __name__ == "__main__":
    main()
