"""Hot-unplug loop: plug the three pyemb devices, start a stream on each,
unplug them mid-stream, again and again (issue 15: 1,000 cycles, no leak,
no crash).

One QEMU (x86_64 pc, PIIX4 ACPI hotplug) driven by the host driver.  A
cycle: ``device_add`` virtio-snd-py-pci (null backend), virtio-video-py-pci
(decoder) and virtio-media-py-pci (camera); the driver initializes each and
starts a stream on each (playback with four periods queued; a decoder
stream fed a clip's first pictures; the camera streaming into MMAP buffers);
then ``device_del`` of all three and the eject.  QEMU's RSS is sampled every
``--every`` cycles; the figure is the median of the last quarter of the samples against that
of the second quarter (the first is allocators and caches warming; RSS
saws as unplugged devices' memory goes at finalize).  QEMU's
stderr must stay empty.

    .venv/bin/python -m bench.unplug_loop [--cycles 1000] [--every 100]
"""

from __future__ import annotations

import argparse
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.soak import rss_mb
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
           report: Callable[[int, float], None] | None = None,
           kinds: tuple[str, ...] = KINDS) -> list[tuple[int, float]]:
    """Run ``count`` cycles; RSS (MB) every ``every`` cycles."""
    config = snd_config(tmp)
    clip = [(data, i) for i, (data, _) in enumerate(encode("h264", 160, 96, 6))]
    curve = []
    # The devices' rings and buffers go with them: the driver starts each
    # cycle from the same guest memory (a slot's MSI-X vectors are its own).
    heap = m.alloc.next
    for n in range(1, count + 1):
        m.alloc = Allocator(heap, m.alloc.end)
        plug(m, config, kinds)
        start_streams(m, clip, kinds)
        unplug(m, kinds)
        if every and n % every == 0:
            # Unplugged devices' memory goes after an RCU grace period and
            # the Python side's at its next collection: let both happen.
            time.sleep(SETTLE_S)
            curve.append((n, rss_mb(m.proc.pid)))
            if report:
                report(*curve[-1])
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--devices", default=",".join(KINDS), help="of snd, video, media")
    args = ap.parse_args()
    kinds = tuple(args.devices.split(","))
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, \
            Machine.x86([], mem_mb=256, count_interrupts=False) as m:
        curve = cycles(m, args.cycles, Path(tmp), args.every,
                       lambda n, mb: print(f"{n:6d} cycles  RSS {mb:7.1f} MB  "
                                           f"{time.monotonic() - t0:6.0f} s", flush=True),
                       kinds)
        alive = m.alive()
        stderr = m.stderr()
    print(f"{args.cycles} cycles in {time.monotonic() - t0:.0f} s; QEMU alive: {alive}; "
          f"stderr: {len(stderr)} bytes")
    # RSS saws up and down as unplugged devices' memory is freed (their
    # region's huge pages go at finalize, after RCU): the figure is the
    # median of the last quarter against that of the second.
    quarter = len(curve) // 4
    if quarter >= 1:
        second = statistics.median(mb for _, mb in curve[quarter:2 * quarter])
        last = statistics.median(mb for _, mb in curve[-quarter:])
        print(f"RSS median, second quarter {second:.1f} MB, last quarter {last:.1f} MB: "
              f"growth {last - second:+.1f} MB (target under 1 MB)")


if __name__ == "__main__":
    main()
