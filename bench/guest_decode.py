"""Decoding in a real guest: the ChromeOS virtio-video driver and the
project's V4L2 client (guest/v4l2_decode.c) through virtio-video-py, vs PyAV
decoding the same records directly on the host, in one run.

The guest runs under TCG (KVM does not work on these machines: nested, QEMU
aborts on MSR 0x10a and ``-cpu qemu64`` gives a KVM internal error), so the
guest's side of each picture (the driver, V4L2, the client) runs emulated:
the figure is what a TCG guest gets, not what a KVM guest would.  The client
runs twice: reading every picture (a CRC of its visible pixels, as a player
that looks at the pixels would) and not reading them (buffers handed back
untouched, as a player that passes them on would).

    .venv/bin/python -m bench.guest_decode [--width 1280 --height 720 --frames 250]
"""

from __future__ import annotations

import argparse
import re

from bench.decode_throughput import pyav_direct
from tests.guest import boot_guest
from tests.streams import encode, frames_file

SCRIPT = """
for run in 1 2; do
    echo "== read $run"; pyemb-v4l2-decode --summary /clip.pyf
    echo "== unread $run"; pyemb-v4l2-decode --summary --unread /clip.pyf
done
"""


def pyav_fps(records: list[bytes], repeat: int = 3) -> float:
    """Best of ``repeat`` runs of PyAV decoding the records to NV12 directly,
    with the device's decoder threads (bench.decode_throughput's reference)."""
    return max(pyav_direct(records, to_nv12=True).fps for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--frames", type=int, default=250)
    args = parser.parse_args()
    records = [d for d, _ in encode("h264", args.width, args.height, args.frames)]
    guest = boot_guest(["-device", "virtio-video-py-pci"], SCRIPT,
                       {"clip.pyf": frames_file("h264", args.width, args.height, records)},
                       timeout=900, memory="1G")
    assert guest.rc == 0, guest.console[-3000:]
    host = pyav_fps(records)
    print(f"{args.width}x{args.height} H.264, {args.frames} pictures; PyAV on the host "
          f"(NV12): {host:.0f} fps")
    for mode in ("read", "unread"):
        for run in (1, 2):
            done = re.search(r"DONE pictures=(\d+) rc=0 seconds=([\d.]+)",
                             guest.section(f"{mode} {run}"))
            assert done, guest.section(f"{mode} {run}")
            pictures, seconds = int(done.group(1)), float(done.group(2))
            fps = pictures / seconds
            print(f"guest (TCG), pictures {mode:6}, run {run}: {pictures} in {seconds:.2f} s"
                  f" = {fps:.0f} fps, {fps / host:.3f}x PyAV on the host")


if __name__ == "__main__":
    main()
