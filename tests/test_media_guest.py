"""Real-guest tier for virtio-media-py (device 48): the upstream virtio-media
driver (../shared/guest-drivers/virtio-media, built as published) in
Debian's 6.12 guest, one boot with two nodes.

- The camera (``role=camera``): v4l2-ctl, GStreamer's v4l2src and
  v4l2-compliance; each captured picture's MD5 comes back on the console and
  is compared with what the test-pattern source renders for that sequence
  number.
- The decoder (``role=decoder``): the project's V4L2 decoder client
  (guest/v4l2_decode.c, the same as for virtio-video) decodes the crosvm
  vector and the codec matrix, a resolution change and a seek;
  v4l2-compliance streams the crosvm vector through it.  Each picture's CRC is compared with PyAV
  decoding the same records on the host (tests/test_video_guest.py's
  references: one engine, two protocols, the same pictures).  GStreamer
  1.22's v4l2 decoders (v4l2h264dec ... v4l2mpeg4dec) decode the same
  codecs to the end of the stream, each picture's MD5 compared with PyAV's
  (tests/test_video_guest.py's GST_SCRIPT, run as there)."""

from __future__ import annotations

import hashlib
import re
from functools import cache

import numpy as np
import pytest

from pyemb.camera_source import TestPattern as PatternSource
from pyemb.media.formats import NV12, YU12, YUYV, ImageFormat
from pyemb.video import protocol as vp
from tests.guest import GuestResult, boot_guest
from tests.streams import encode, frames_file, reference
from tests.test_video_guest import (
    CODEC_MATRIX,
    DECODE,
    GST_CROSVM_RECORDS,
    GST_SCRIPT,
    GST_SIZE,
    GSTREAMER,
    RECORD_US,
    SEEK_FROM,
    SEEK_TO,
    crosvm_crcs,
    crosvm_records,
    decoded,
    generated,
    gstreamer_files,
    gstreamer_pictures_bit_exact,
    streams,
)

FIND = """
node() { for d in /sys/class/video4linux/video*; do n=/dev/${d##*/}
    v4l2-ctl -d $n -D 2>/dev/null | grep -q "$1" && echo $n; done; }
frames() { i=0; while [ $i -lt $2 ]; do
    dd if=$1 bs=$3 skip=$i count=1 2>/dev/null | md5sum | cut -d' ' -f1; i=$((i+1)); done; }
cam=$(node "pyemb camera")
echo "camera node: $cam"
"""
CODECS = " ".join(CODEC_MATRIX)

SCRIPT = FIND + f"""
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
dec=$(node "pyemb decoder")
echo "decoder node: $dec"
decode() {{ name=$1; shift; echo "== dec-$name"
    {DECODE} --device $dec "$@"; echo "client rc=$?"; }}
decode crosvm-nv12 /crosvm.pyf
decode crosvm-yu12 --format YU12 /crosvm.pyf
for c in {CODECS}; do decode codec-$c /$c.pyf; done
decode reschange /reschange.pyf
decode seek --seek {SEEK_FROM}:{SEEK_TO} /seek.pyf
{GST_SCRIPT}
echo "== gst-crosvm-no-capssetter"
timeout 60 gst-launch-1.0 filesrc location=/gst-crosvm ! h264parse ! v4l2h264dec \\
    ! video/x-raw,format=NV12 ! fakesink 2>&1 | grep -o "not-negotiated" | sort -u
echo "== dec-compliance"
v4l2-compliance -d $dec -s --stream-from-hdr /crosvm.hdr 2>&1 | grep -E "fail:|warn:|^Total"
echo "== dmesg"
dmesg | grep -i -E "virtio.media|warn|bug|oops" | grep -v -E "^\\[ *[01]\\.[0-9]"; true
"""


@pytest.fixture(scope="module")
def guest() -> GuestResult:
    files = {f"{name}.pyf": frames_file(codec, w, h, records)
             for name, (codec, w, h, records) in streams().items()}
    # v4l2-compliance's streaming test feeds a decoder from a file of
    # records: the fourcc 'Vhdr' and the length, both read through ntohl()
    # (so the magic's bytes are "rdhV"), then the bytes.
    files["crosvm.hdr"] = b"".join(b"rdhV" + len(r).to_bytes(4, "big") + r
                                   for r in crosvm_records())
    files.update(gstreamer_files())
    return boot_guest(["-device", "virtio-media-py-pci",
                       "-device", "virtio-media-py-pci,role=decoder"],
                      SCRIPT, files, timeout=900, memory="1G")


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



# -- the decoder node ------------------------------------------------------------------
@pytest.mark.parametrize("section,fmt", [("dec-crosvm-nv12", vp.Format.NV12),
                                         ("dec-crosvm-yu12", vp.Format.YUV420)])
def test_decoder_crosvm_vector_bit_exact(guest, section, fmt):
    crcs = [crc for _, crc in decoded(guest, section)]
    expected = crosvm_crcs() if fmt == vp.Format.NV12 else reference(
        "h264", list(crosvm_records()), fmt)
    assert len(crcs) == 250
    assert crcs == expected


@pytest.mark.parametrize("codec", CODEC_MATRIX)
def test_decoder_codec_matrix_bit_exact_with_input_timestamps(guest, codec):
    got = decoded(guest, f"dec-codec-{codec}")
    packets = encode(codec, 160, 96, 24)
    assert [crc for _, crc in got] == reference(codec, [d for d, _ in packets])
    record_of = {pts: i for i, (_, pts) in enumerate(packets)}
    assert [ts for ts, _ in got] == [record_of[k] * RECORD_US for k in range(len(got))]


def test_decoder_resolution_change(guest):
    _, _, _, records = streams()["reschange"]
    text = guest.section("dec-reschange")
    assert re.findall(r"^RESCHANGE (\S+)$", text, re.M)[-2:] == ["160x96", "320x192"], text
    assert [crc for _, crc in decoded(guest, "dec-reschange")] == reference("h264", records)


def test_decoder_seek_restarts_at_the_keyframe(guest):
    """STREAMOFF/STREAMON(OUTPUT) mid-stream.  It once stalled here (8 OUTPUT
    buffers held, no picture) and once oopsed the guest in DQBUF: DQBUF
    events the driver took in after STREAMOFF's answer (pyemb/media/device.py,
    FENCE_TIMEOUT_S)."""
    _, _, _, records = streams()["seek"]
    text = guest.section("dec-seek")
    assert f"SEEK {SEEK_FROM} {SEEK_TO}" in text and "client rc=0" in text, text
    got = decoded(guest, "dec-seek")
    after = [crc for ts, crc in got if ts >= SEEK_TO * RECORD_US]
    assert after == reference("h264", records[SEEK_TO:])
    before = [crc for ts, crc in got if ts < SEEK_FROM * RECORD_US]
    assert before == reference("h264", records)[:len(before)]


# What v4l2-compliance 1.30 fails on the decoder node that is the guest
# driver's doing: it forwards G/S_PARM for every buffer type, where an m2m
# decoder must answer ENOTTY for all of them; the kernel answers EINVAL for
# the non-video types before the device is asked.
DECODER_DRIVER_FAILURES = {"v4l2-test-formats.cpp(1445): node->is_m2m && !is_stateful_enc"}


def test_decoder_v4l2_compliance_with_streaming(guest):
    text = guest.section("dec-compliance")
    total = re.search(r"Total for .*: (\d+), Succeeded: (\d+), Failed: (\d+)", text)
    assert total and int(total.group(1)) > 50, text
    assert set(re.findall(r"fail: (.*)", text)) <= DECODER_DRIVER_FAILURES, text


# -- GStreamer's v4l2 decoders on the decoder node ---------------------------------------
# GStreamer 1.22's v4l2videodec sets CAPTURE up before the decoder has parsed
# anything (from the parser's caps: the right size here), then takes the
# initial V4L2_EVENT_SOURCE_CHANGE, which dev-decoder.rst has the decoder send
# "regardless of whether they match the values set by the client", for a
# resolution change: STREAMOFF(CAPTURE) and new buffers, without dequeuing
# what is done (GST_DEBUG: "Resolution change detected", the pool stopped,
# the first "Got buffer for frame number" 1 or 2; gst-launch then warns of
# those frames "left undrained").  The decoder keeps decoding into buffers
# that fit, as dev-decoder.rst says (FFmpeg's v4l2_m2m ignores such an event
# and expects no pause), so the pictures it returned before that STREAMOFF
# (a race: none, or the first one or two, more often for VP8/VP9 and MPEG-2,
# whose first picture comes with the size) are GStreamer's to lose.
# GStreamer 1.24 waits for the event before it sets CAPTURE up (its commit
# 66849fbdd1, "v4l2: videodec: Wait for source change event").  At most the
# buffers of its first CAPTURE pool (5) can be lost; the rest must be there
# and bit-exact, up to the last picture (the drain).
GST_LOST_AT_START = 5


@pytest.mark.parametrize("codec", list(GSTREAMER), ids=[e for e, _ in GSTREAMER.values()])
def test_gstreamer_v4l2_decoder_bit_exact_to_the_end(guest, codec):
    """gst-launch ends (rc 0, not timeout's 124 or 143) with every picture
    of the drain: its LAST is an empty CAPTURE buffer (pyemb/media/decoder.py)."""
    gstreamer_pictures_bit_exact(guest, codec, codec, generated(codec, *GST_SIZE, 24), GST_SIZE,
                                 lost_at_start=GST_LOST_AT_START)


def test_gstreamer_v4l2h264dec_crosvm_vector_bit_exact_through_capssetter(guest):
    records = list(crosvm_records()[:GST_CROSVM_RECORDS])
    gstreamer_pictures_bit_exact(guest, "crosvm", "h264", records, (320, 240),
                                 lost_at_start=GST_LOST_AT_START)


def test_gstreamer_cannot_take_the_crosvm_vectors_colorimetry_without_capssetter(guest):
    """GStreamer 1.22's doing, not the device's: h264parse says colorimetry
    2:4:5:4 (the vector's VUI: SMPTE 170M primaries, BT.709 transfer) and
    v4l2h264dec's sink caps list only what gst_v4l2_object_add_colorspace()
    probes, where V4L2_COLORSPACE_SMPTE170M maps to the BT.601 transfer
    whatever xfer_func the device answers: not-negotiated on any V4L2
    decoder (virtio-video's too).  Should a newer GStreamer negotiate it,
    this fails and the capssetter can go."""
    assert "not-negotiated" in guest.section("gst-crosvm-no-capssetter")
