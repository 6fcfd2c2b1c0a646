"""Real-guest tier for the virtio-video-py encoder (device 30): the ChromeOS
driver's encoder node (virtio_video_enc.c) in Debian's 6.12 guest, with the
project's V4L2 encoder client (guest/v4l2_encode.c), GStreamer's
v4l2h264enc and v4l2-compliance.  One boot; each bitstream the guest wrote
comes back base64 on the console and is decoded with PyAV on the host."""

from __future__ import annotations

import base64
import re
import struct

import pytest

from pyemb.video import protocol as p
from tests.encoder_client import decode_packets, nv12_to_i420, psnr, raw_pictures
from tests.guest import GuestResult, boot_guest
from tests.test_video_guest import assert_only_driver_failures

ENCODE = "pyemb-v4l2-encode"
FRAME_US = 33333                    # the client stamps picture i with i * 33333 us
SIZE = (320, 240)
ODD = (322, 242)
GRAIN = (192, 128)                  # grainy pictures for the rate-control runs
CODECS = {"h264": ("H264", p.Format.H264), "hevc": ("HEVC", p.Format.HEVC),
          "vp8": ("VP80", p.Format.VP8), "vp9": ("VP90", p.Format.VP9)}
FORCED = (7, 19)


def pictures() -> dict[str, list[bytes]]:
    return {"raw.nv12": raw_pictures(*SIZE, 30),
            "odd.yu12": raw_pictures(*ODD, 12, p.Format.YUV420),
            "grain.nv12": raw_pictures(*GRAIN, 90, noise=12)}


def run(name: str, args: str, raw: str) -> str:
    return (f"enc {name} {args} /{raw}\n")


# Boot messages that name a bug without being one (by content, not by time:
# a loaded machine boots slower).
BENIGN_BOOT_LINES = "pci=nocrs|MP-BIOS bug: 8254 timer"

SCRIPT = f"""
enc() {{ name=$1; shift; echo "== $name"; {ENCODE} "$@" /out.pyf; echo "client rc=$?"
    echo "BEGIN-OUT"; base64 /out.pyf; echo "END-OUT"; rm -f /out.pyf; }}
""" + "".join(
    run(codec, f"--codec {fourcc} --format NV12 --size {SIZE[0]}x{SIZE[1]} --bitrate 1500000",
        "raw.nv12") for codec, (fourcc, _) in CODECS.items()) + (
    run("odd", f"--codec H264 --format YU12 --size {ODD[0]}x{ODD[1]} --bitrate 1500000",
        "odd.yu12")
    + run("keys", f"--codec H264 --format NV12 --size {SIZE[0]}x{SIZE[1]} --prepend-sps "
          f"--force-key {','.join(map(str, FORCED))}", "raw.nv12")
    + run("cbr", f"--codec H264 --format NV12 --size {GRAIN[0]}x{GRAIN[1]} --mode cbr "
          "--bitrate 400000", "grain.nv12")
    + run("bitrate-change", f"--codec H264 --format NV12 --size {GRAIN[0]}x{GRAIN[1]} "
          "--mode cbr --bitrate 200000 --bitrate-change 30:1600000", "grain.nv12")
) + f"""
echo "== gst-h264"
timeout 120 gst-launch-1.0 -q filesrc location=/raw.nv12 \\
    ! rawvideoparse format=nv12 width={SIZE[0]} height={SIZE[1]} framerate=30/1 \\
      colorimetry=bt709 \\
    ! v4l2h264enc extra-controls=encode,video_bitrate=1500000 ! h264parse \\
    ! filesink location=/out.h264 2>&1; echo "gst rc=$?"
echo "BEGIN-OUT"; base64 /out.h264; echo "END-OUT"
echo "== controls"
for c in video_bitrate=1 video_peak_bitrate=1 prepend_sps_and_pps_to_idr=0 \\
         video_bitrate=1000000000 video_bitrate_mode=1 h264_profile=0 h264_level=0; do
    v4l2-ctl -d /dev/video0 --set-ctrl $c 2>&1 && echo "ctrl $c ok"; done
echo "== compliance"
v4l2-compliance -d /dev/video0 2>&1 | grep -E "fail:|^Total"
echo "== compliance-streaming"
v4l2-compliance -d /dev/video0 -s 2>&1 | grep -E "fail:|^Total"
echo "== dmesg"
dmesg | grep -i -E "warn|bug|oops" | grep -v -E "{BENIGN_BOOT_LINES}"; true
"""


@pytest.fixture(scope="module")
def guest() -> GuestResult:
    files = {name: b"".join(pics) for name, pics in pictures().items()}
    return boot_guest(["-device", "virtio-video-py-pci,role=encoder"], SCRIPT, files,
                      timeout=600, memory="1G")


def written(guest: GuestResult, section: str) -> bytes:
    text = guest.section(section)
    body = re.search(r"^BEGIN-OUT\n(.*?)^END-OUT$", text, re.M | re.S)
    assert body, text[-3000:]
    return base64.b64decode(body.group(1))


def packets(guest: GuestResult, section: str) -> list[bytes]:
    """The records of the client's output file (one per CAPTURE buffer)."""
    text = guest.section(section)
    assert "client rc=0" in text and re.search(r"^DONE packets=\d+ rc=0 ", text, re.M), text
    data = written(guest, section)
    assert data[:4] == b"PYF1"
    out, offset = [], 16
    while offset < len(data):
        (n,) = struct.unpack_from("<I", data, offset)
        out.append(data[offset + 4:offset + 4 + n])
        offset += 4 + n
    return out


def lines(guest: GuestResult, section: str) -> list[tuple[int, int, str]]:
    """(timestamp us, size, K|P|B|-) of each PACKET line."""
    return [(int(ts), int(size), kind) for ts, size, kind in re.findall(
        r"^PACKET \d+ (\d+) (\d+) ([KPB-])$", guest.section(section), re.M)]


def psnrs(coded: int, records: list[bytes], sources: list[bytes], width: int, height: int,
          fmt: int = p.Format.NV12) -> list[float]:
    decoded = decode_packets(coded, records)
    assert len(decoded) == len(sources)
    refs = sources if fmt == p.Format.YUV420 else [nv12_to_i420(s, width, height)
                                                  for s in sources]
    return [psnr(a, b) for a, b in zip(decoded, refs, strict=True)]


def test_guest_ran_to_the_end(guest):
    assert guest.rc == 0, guest.console[-4000:]


@pytest.mark.parametrize("codec", list(CODECS))
def test_each_codec_encodes_in_the_guest_at_35_db(guest, codec):
    records = packets(guest, codec)
    meta = lines(guest, codec)
    assert [ts for ts, _, _ in meta] == [i * FRAME_US for i in range(30)]
    assert [size for _, size, _ in meta] == [len(r) for r in records]
    assert meta[0][2] == "K" and {kind for _, _, kind in meta[1:]} == {"P"}
    assert min(psnrs(CODECS[codec][1], records, pictures()["raw.nv12"], *SIZE)) >= 35


def test_yu12_at_an_odd_size(guest):
    records = packets(guest, "odd")
    assert min(psnrs(p.Format.H264, records, pictures()["odd.yu12"], *ODD,
                     p.Format.YUV420)) >= 35


def test_forced_keyframes_land_where_asked_with_their_headers(guest):
    """FORCE_KEY_FRAME reaches the device as a 16-byte SET_CONTROL with no
    value (virtio_video_vq.c).  The keyframe lands on the next picture the
    device sees; the client sets the control once every picture queued
    before is back (else it may still wait in the driver's m2m queue and
    take the keyframe), so it lands exactly."""
    records = packets(guest, "keys")
    keys = [i for i, (_, _, kind) in enumerate(lines(guest, "keys")) if kind == "K"]
    assert keys == [0, *FORCED]
    sps = [i for i, r in enumerate(records) if b"\x00\x00\x00\x01\x67" in r[:64]]
    assert sps == keys


def test_cbr_holds_the_bitrate_over_three_seconds(guest):
    records = packets(guest, "cbr")
    assert len(records) == 90
    assert sum(map(len, records)) * 8 / 3 == pytest.approx(400_000, rel=0.10)


def test_a_bitrate_change_takes_effect(guest):
    """Measured a second after the change: a new CBR session starts with a
    full rate buffer (one second's worth), which it may spend at once."""
    records = packets(guest, "bitrate-change")
    assert len(records) == 90
    before = sum(map(len, records[1:30])) * 8 * 30 / 29
    after = sum(map(len, records[60:90])) * 8
    assert before == pytest.approx(200_000, rel=0.25)
    assert after == pytest.approx(1_600_000, rel=0.25)


def test_gstreamer_v4l2h264enc_at_35_db(guest):
    assert "gst rc=0" in guest.section("gst-h264"), guest.section("gst-h264")
    stream = written(guest, "gst-h264")
    import av

    ctx = av.CodecContext.create("h264", "r")
    frames = [f for pk in ctx.parse(stream) for f in ctx.decode(pk)] + ctx.decode(None)
    from tests.streams import visible

    decoded = [visible(f, p.Format.YUV420) for f in frames]
    sources = [nv12_to_i420(s, *SIZE) for s in pictures()["raw.nv12"]]
    # The last picture may be lost: the driver sends STREAM_DRAIN once its
    # m2m queue is empty, while the last OUTPUT buffer its worker took may
    # not be on the virtqueue yet (the decoder's drain race, encoder side).
    assert len(sources) - 1 <= len(decoded) <= len(sources)
    assert min(psnr(a, b) for a, b in zip(decoded, sources, strict=False)) >= 35


# What v4l2-compliance 1.30 fails on the encoder node beyond the failures the
# decoder node shares (tests/test_video_guest.py), each the unmodified
# driver's doing.
ENCODER_DRIVER_FAILURES = {
    "invalid step_width/height for continuous framesize":
        "ENUM_FRAMESIZES says CONTINUOUS whatever the device's step "
        "(virtio_video_device.c), and the encoders take even sizes only",
    "node->codec_mask & STATEFUL_ENCODER": "follows from the ENUM_FRAMESIZES failure",
    "v4l2-test-formats.cpp(1424): !ret":
        "G_PARM answers on CAPTURE, which a stateful encoder without "
        "ENC_CAP_FRAME_INTERVAL must refuse (virtio_video_enc.c)",
    "s_sel_ret != EINVAL && s_sel_ret != ENOTTY": "S_SELECTION checks no target",
    "testBasicCompose(node, V4L2_BUF_TYPE_VIDEO_OUTPUT)": "follows from S_SELECTION",
    "could not set minimum value":
        "virtio_video_cmd_set_control() refuses any value 0 with EINVAL, sending nothing "
        "(virtio_video_vq.c): a client cannot go back to VBR or stop PREPEND_SPSPPS",
}


@pytest.mark.parametrize("section", ["compliance", "compliance-streaming"])
def test_v4l2_compliance_fails_only_where_the_driver_does(guest, section):
    text = guest.section(section)
    for known in ENCODER_DRIVER_FAILURES:
        text = "\n".join(line for line in text.splitlines() if known not in line)
    assert_only_driver_failures(text)


def test_controls_reach_the_device_through_v4l2_ctl(guest):
    """(Each v4l2-ctl opens a new stream: setting a default 0 changes
    nothing, so the driver's refusal of 0 does not show here.)"""
    text = guest.section("controls")
    for control in ("video_bitrate=1", "video_peak_bitrate=1", "prepend_sps_and_pps_to_idr=0",
                    "video_bitrate_mode=1", "h264_profile=0", "h264_level=0"):
        assert f"ctrl {control} ok" in text, text


def test_no_kernel_warning(guest):
    assert guest.section("dmesg").strip() == "", guest.section("dmesg")
