"""Control-request round trip: virtio-snd-py-pci vs QEMU's virtio-sound-pci.

Reference: QEMU's own C device, in the same QEMU process, driven by the same
host-side driver, with the same PCM_INFO request; batches alternate between
the two devices so that machine noise hits both alike.  Prints medians, the
ratio, and the difference (the cost of going through the shim and Python).

    .venv/bin/python -m bench.control_roundtrip [--rounds 20] [--batch 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from pyemb.snd import protocol as snd
from tests.hostdriver import Machine, VirtioDevice

QUERY = snd.QUERY_INFO.pack(snd.Code.PCM_INFO, 0, 1, snd.PCM_INFO.size)


def batch(dev: VirtioDevice, n: int) -> list[float]:
    q = dev.queues[snd.CONTROL_QUEUE]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        used = q.call([QUERY], [4 + snd.PCM_INFO.size])
        times.append(time.perf_counter() - t0)
        assert snd.HDR.unpack_from(used.data)[0] == snd.Status.OK
    return times


def device_times(trace_path: str) -> dict[str, list[float]]:
    """Per virtqueue, seconds from virtqueue_pop to the virtqueue_flush that
    returns the element: the time spent inside the device, C or Python."""
    popped: dict[str, float] = {}
    spans: dict[str, list[float]] = {}
    with open(trace_path) as f:
        for line in f:
            head, _, rest = line.partition(":")
            if "@" not in head or not rest:
                continue
            stamp = float(head.split("@")[1])
            event, *fields = rest.split()
            vq = fields[1] if len(fields) > 1 else ""
            if event == "virtqueue_pop":
                popped[vq] = stamp
            elif event == "virtqueue_flush" and vq in popped:
                spans.setdefault(vq, []).append(stamp - popped.pop(vq))
    return spans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=200)
    args = ap.parse_args()
    trace = tempfile.mktemp(prefix="pyemb-bench-trace-")
    with Machine.x86(["-device", "virtio-snd-py-pci",
                      "-audiodev", "none,id=a", "-device", "virtio-sound-pci,audiodev=a",
                      "-trace", "virtqueue_pop", "-trace", "virtqueue_flush",
                      "-msg", "timestamp=on", "-D", trace], count_interrupts=False) as m:
        ours, theirs = m.virtio_devices()
        # Tell them apart by config space: our default card has channel maps.
        if snd.CONFIG.unpack(ours.config(snd.CONFIG.size))[2] == 0:
            ours, theirs = theirs, ours
        for dev in (ours, theirs):
            dev.initialize()
            batch(dev, 1)                           # first pop: ours, then theirs
        t_ours: list[float] = []
        t_theirs: list[float] = []
        for _ in range(args.rounds):
            t_ours += batch(ours, args.batch)
            t_theirs += batch(theirs, args.batch)
    spans = device_times(trace)
    os.unlink(trace)
    (vq_ours, in_ours), (vq_theirs, in_theirs) = list(spans.items())[:2]
    med_ours, med_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    dev_ours, dev_theirs = statistics.median(in_ours), statistics.median(in_theirs)
    print(f"PCM_INFO, {len(t_ours)} requests per device, same QEMU, same host driver")
    print("round trip seen by the host driver (qtest socket included):")
    print(f"  virtio-sound-pci (QEMU, C):  median {med_theirs * 1e6:7.1f} us")
    print(f"  virtio-snd-py-pci (pyemb):   median {med_ours * 1e6:7.1f} us")
    print(f"  ratio pyemb / QEMU:          {med_ours / med_theirs:.3f}")
    print("inside QEMU, virtqueue_pop -> virtqueue_flush (trace timestamps, 1 us steps):")
    print(f"  virtio-sound-pci (QEMU, C):  median {dev_theirs * 1e6:7.1f} us")
    print(f"  virtio-snd-py-pci (pyemb):   median {dev_ours * 1e6:7.1f} us")
    print(f"  shim + Python cost per command: {(dev_ours - dev_theirs) * 1e6:+.1f} us")


if __name__ == "__main__":
    main()
