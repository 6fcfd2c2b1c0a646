"""The camera part of the demo: a Linux guest captures from virtio-media-py.

One guest (Debian's 6.12 kernel, the upstream virtio-media driver built out
of tree) with ``-device virtio-media-py-pci``: its camera's test-pattern
source, 640x480 YUYV at 30 fps.  In the guest, ``v4l2-ctl --stream-mmap``
captures three seconds into MMAP buffers (in the device's shared memory
region) and writes the pictures to a virtio-serial port whose host side is
a file.  The host checks every picture against what the source renders for
its sequence number (bit-exact), and writes ``camera.mp4`` and PNG stills
of what the guest's camera saw.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import av
import numpy as np

from demo.guest_video import write_png
from pyemb.camera_source import TestPattern, read_counter
from pyemb.media.formats import YUYV, ImageFormat
from tests.guest import boot_guest

FMT = ImageFormat(YUYV, 640, 480)
FPS = 30
PICTURES = 90

SCRIPT = rf"""
port=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name)" = pictures ] && port=/dev/${{p##*/}}
done
cam=/dev/video0
echo "guest: $(uname -sr), $(v4l2-ctl -d $cam -D | sed -n 's/.*Card type *: //p') at $cam" \
    "($(cat /sys/class/video4linux/video0/name) driver), pictures out through $port"
start=$(cut -d' ' -f1 /proc/uptime)
v4l2-ctl -d $cam --set-fmt-video=width={FMT.width},height={FMT.height},pixelformat=YUYV \
    --set-parm={FPS} --stream-mmap=4 --stream-count={PICTURES} --stream-to=$port; rc=$?
end=$(cut -d' ' -f1 /proc/uptime)
echo "guest: v4l2-ctl --stream-mmap rc=$rc, {PICTURES} pictures in" \
    "$(awk "BEGIN {{ print $end - $start }}") s"
"""


def yuyv_to_rgb(image: bytes) -> np.ndarray:
    frame = av.VideoFrame(FMT.width, FMT.height, "yuyv422")
    frame.planes[0].update(image)
    return frame.to_ndarray(format="rgb24")


def run(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    print("== a real guest's camera: -device virtio-media-py-pci (device 48, the upstream "
          "virtio-media driver)")
    with tempfile.TemporaryDirectory(prefix="pyemb-demo-") as tmp:
        dump = Path(tmp) / "camera.yuyv"
        args = ["-device", "virtio-media-py-pci", "-device", "virtio-serial-pci",
                "-chardev", f"file,id=pictures,path={dump}",
                "-device", "virtserialport,chardev=pictures,name=pictures"]
        t0 = time.monotonic()
        result = boot_guest(args, SCRIPT, timeout=600, memory="512M")
        print(f"  the guest booted, captured and powered off in {time.monotonic() - t0:.1f} s")
        for line in result.console.splitlines():
            if line.startswith("guest:"):
                print(f"  {line}")
        data = dump.read_bytes() if dump.exists() else b""
    size = FMT.sizeimage
    images = [data[i:i + size] for i in range(0, len(data) - size + 1, size)]
    source = TestPattern()
    source.start(FMT, FPS)
    target = np.zeros(size, np.uint8)
    exact, sequences = 0, []
    for image in images:
        sequence = read_counter(FMT, image)
        sequences.append(sequence)
        source.render(sequence, target)
        exact += image == target.tobytes()
    gaps = sum(b - a - 1 for a, b in zip(sequences, sequences[1:], strict=False))
    verdict = "bit-exact" if images and exact == len(images) else "NOT bit-exact"
    print(f"  {len(images)} pictures came back; {exact}/{len(images)} equal to what the "
          f"source rendered for their sequence numbers ({verdict}); sequence "
          f"{sequences[0] if sequences else '-'}..{sequences[-1] if sequences else '-'}, "
          f"{gaps} missed")
    files = []
    if images:
        movie = out_dir / "camera.mp4"
        with av.open(str(movie), "w") as out:
            stream = out.add_stream("libx264", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = FMT.width, FMT.height, "yuv420p"
            for image in images:
                frame = av.VideoFrame.from_ndarray(yuyv_to_rgb(image), format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        files.append(movie)
        for index in (0, len(images) // 2, len(images) - 1):
            still = out_dir / f"camera-{index:03d}.png"
            write_png(still, av.VideoFrame.from_ndarray(yuyv_to_rgb(images[index]),
                                                        format="rgb24"))
            files.append(still)
    if result.rc != 0 or verdict != "bit-exact":
        raise SystemExit(f"demo: the guest's camera capture failed (rc {result.rc}, {verdict})")
    return files
