"""Real-guest tier for virtio-media-py (device 48): the upstream virtio-media
driver (../shared/guest-drivers/virtio-media, built as published) in
Debian's 6.12 guest, with v4l2-ctl, GStreamer's v4l2src and v4l2-compliance
on the camera node.  One boot; each captured picture's MD5 comes back on
the console and is compared with what the test-pattern source renders for
that sequence number."""

from __future__ import annotations

import hashlib
import re
from functools import cache

import numpy as np
import pytest

from pyemb.camera_source import TestPattern as PatternSource
from pyemb.media.formats import NV12, YU12, YUYV, ImageFormat
from tests.guest import GuestResult, boot_guest

FIND = """
node() { for d in /sys/class/video4linux/video*; do n=/dev/${d##*/}
    v4l2-ctl -d $n -D 2>/dev/null | grep -q "$1" && echo $n; done; }
frames() { i=0; while [ $i -lt $2 ]; do
    dd if=$1 bs=$3 skip=$i count=1 2>/dev/null | md5sum | cut -d' ' -f1; i=$((i+1)); done; }
cam=$(node "pyemb camera")
echo "camera node: $cam"
"""
SCRIPT = FIND + """
echo "== info"
v4l2-ctl -d $cam -D --list-formats-ext
echo "== mmap"
v4l2-ctl -d $cam --set-fmt-video=width=640,height=480,pixelformat=YUYV \\
    --stream-mmap=4 --stream-count=8 --stream-to=/tmp/mmap.yuv --verbose 2>&1 \\
    | grep -o "seq: *[0-9]*"
echo "v4l2-ctl rc=$?"
frames /tmp/mmap.yuv 8 614400
echo "== userptr"
v4l2-ctl -d $cam --set-fmt-video=width=320,height=240,pixelformat=NV12 \\
    --stream-user=3 --stream-count=5 --stream-to=/tmp/user.yuv --verbose 2>&1 \\
    | grep -o "seq: *[0-9]*"
frames /tmp/user.yuv 5 115200
echo "== hd"
v4l2-ctl -d $cam --set-fmt-video=width=1920,height=1080,pixelformat=YU12 \\
    --set-parm=30 --stream-mmap=3 --stream-count=3 --stream-to=/tmp/hd.yuv --verbose 2>&1 \\
    | grep -o "seq: *[0-9]*"
frames /tmp/hd.yuv 3 3110400
echo "== gstreamer"
timeout 120 gst-launch-1.0 -q v4l2src device=$cam num-buffers=5 \\
    ! video/x-raw,format=NV12,width=320,height=240 ! filesink location=/tmp/gst.yuv 2>&1
echo "gst rc=$?"
frames /tmp/gst.yuv 5 115200
echo "== controls"
v4l2-ctl -d $cam --set-ctrl=brightness=1000 --set-ctrl=test_pattern=1 \\
    --get-ctrl=brightness,test_pattern
v4l2-ctl -d $cam --set-ctrl=brightness=0,test_pattern=0 --get-ctrl=brightness
echo "== compliance"
v4l2-compliance -d $cam -s 2>&1 | grep -E "fail:|warn:|^Total"
echo "== dmesg"
dmesg | grep -i -E "virtio.media|warn|bug|oops" | grep -v -E "^\\[ *[01]\\.[0-9]"; true
"""


@pytest.fixture(scope="module")
def guest() -> GuestResult:
    return boot_guest(["-device", "virtio-media-py-pci"], SCRIPT, timeout=600, memory="512M")


@cache
def pattern_md5s(fourcc: int, width: int, height: int, count: int = 400) -> dict[str, int]:
    """MD5 of the test pattern's picture -> its sequence number."""
    fmt = ImageFormat(fourcc, width, height)
    source = PatternSource()
    source.start(fmt, 30)
    target = np.zeros(fmt.sizeimage, np.uint8)
    out = {}
    for sequence in range(count):
        source.render(sequence, target)
        out[hashlib.md5(target.tobytes()).hexdigest()] = sequence
    return out


def captured(guest: GuestResult, section: str) -> tuple[list[int], list[str]]:
    text = guest.section(section)
    return ([int(s) for s in re.findall(r"seq: *(\d+)", text)],
            re.findall(r"^([0-9a-f]{32})$", text, re.M))


def test_the_driver_finds_the_camera(guest):
    info = guest.section("info")
    assert "Driver name      : virtio-media" in info and "pyemb camera" in info
    for fourcc in ("YUYV", "NV12", "YU12"):
        assert f"'{fourcc}'" in info
    assert "1920x1080" in info and "0.033s (30.000 fps)" in info


@pytest.mark.parametrize("section,fmt,count", [
    ("mmap", ImageFormat(YUYV, 640, 480), 8),
    ("userptr", ImageFormat(NV12, 320, 240), 5),
    ("hd", ImageFormat(YU12, 1920, 1080), 3),
])
def test_v4l2_ctl_captures_bit_exact_pictures_in_sequence(guest, section, fmt, count):
    sequences, sums = captured(guest, section)
    assert len(sequences) == count and len(sums) == count, guest.section(section)
    assert sequences == sorted(set(sequences))
    known = pattern_md5s(fmt.fourcc, fmt.width, fmt.height)
    assert [known.get(s) for s in sums] == sequences


def test_gstreamer_v4l2src_captures_bit_exact_pictures(guest):
    _, sums = captured(guest, "gstreamer")
    assert "gst rc=0" in guest.section("gstreamer")
    known = pattern_md5s(NV12, 320, 240)
    found = [known.get(s) for s in sums]
    assert len(found) == 5 and None not in found and found == sorted(set(found))


def test_controls_from_the_guest(guest):
    text = guest.section("controls")
    assert "brightness: 127" in text and "test_pattern: 1" in text
    assert "brightness: 0" in text


def test_v4l2_compliance_passes_with_streaming(guest):
    text = guest.section("compliance")
    total = re.search(r"Total for .*: (\d+), Succeeded: (\d+), Failed: (\d+)", text)
    assert total, text
    assert int(total.group(3)) == 0, text
