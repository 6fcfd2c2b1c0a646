"""The encoder part of the demo: guest 1's 720p clip (demo/guest_video.py)
encoded to H.264 by virtio-video-py's encoder (device 30) through the
host-side driver, in the ChromeOS driver's flow, and left as an MP4 a
person can play, with how close it came to the pictures that went in."""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path

import av

from demo import guest_video
from pyemb.video import protocol as p
from tests.encoder_client import EncodedPacket, EncodeRun
from tests.hostdriver import Machine, VirtioDevice
from tests.streams import visible
from tests.video_client import VideoClient

BITRATE = 3_000_000
HIGH_PROFILE = 0x103


def write_mp4(path: Path, packets: list[EncodedPacket], width: int, height: int,
              fps: int) -> None:
    """The device's H.264 packets (Annex B, headers in front of the first)
    in an MP4, one picture per packet at ``fps``."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("h264", rate=fps)
        stream.width, stream.height = width, height
        stream.time_base = Fraction(1, fps)
        for i, pk in enumerate(packets):
            packet = av.Packet(pk.data)
            packet.pts = packet.dts = i
            packet.time_base = Fraction(1, fps)
            packet.stream = stream
            packet.is_keyframe = bool(pk.flags & p.BufferFlag.IFRAME)
            out.mux(packet)


def encode_clip(m: Machine, dev: VirtioDevice, out_dir: Path) -> Path:
    width, height, fps = guest_video.WIDTH, guest_video.HEIGHT, guest_video.FPS
    pictures = [visible(guest_video.scene(1, i), p.Format.NV12)
                for i in range(guest_video.FRAMES)]
    client = VideoClient(m, dev)
    run = EncodeRun(client, 1, p.Format.H264, pictures, width, height, frame_rate=fps,
                    timestamps=[i * 1_000_000 // fps for i in range(len(pictures))],
                    controls={p.Control.BITRATE: BITRATE, p.Control.PROFILE: HIGH_PROFILE})
    t0 = time.perf_counter()
    client.run([run], timeout=300)
    elapsed = time.perf_counter() - t0
    packets = run.result.packets
    size = sum(len(pk.data) for pk in packets)
    quality = run.psnr()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "encoded.mp4"
    write_mp4(path, packets, width, height, fps)
    print(f"  encoded {len(pictures)} pictures of {width}x{height} to H.264 (High, "
          f"{BITRATE // 1000} kbit/s asked) in {elapsed:.2f} s through the device: "
          f"{size * 8 * fps / len(pictures) / 1000:.0f} kbit/s, PSNR {min(quality):.1f} dB "
          f"at worst, {sum(quality) / len(quality):.1f} dB on average")
    return path
