"""What the encoder device makes of each codec: through the patched QEMU and
the host driver (tests/encoder_client.py), 3 s of 640x480 at 30 fps (the
moving pattern of tests/streams.py with camera-like grain) per codec and
rate control, decoded back with PyAV.  Prints the bitrate reached against
the one asked (the reference), the PSNR against the pictures that went in
(worst and mean), and the device's frame rate.

    .venv/bin/python -m bench.encode_quality [--frames 90] [--bitrate 1000000]
"""

from __future__ import annotations

import argparse
import statistics
import time

from pyemb.video import protocol as p
from tests.conftest import start
from tests.encoder_client import EncodeRun, raw_pictures
from tests.video_client import VideoClient

CODECS = {"H.264": p.Format.H264, "HEVC": p.Format.HEVC, "VP8": p.Format.VP8,
          "VP9": p.Format.VP9}
WIDTH, HEIGHT, FPS = 640, 480, 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=90)
    parser.add_argument("--bitrate", type=int, default=1_000_000)
    args = parser.parse_args()
    pictures = raw_pictures(WIDTH, HEIGHT, args.frames, noise=8)
    m = start("pci", "virtio-video-py", "role=encoder", mem_mb=512)
    try:
        dev = m.find_virtio(p.ENCODER_DEVICE_ID)
        dev.initialize(want_features=0b11)
        client = VideoClient(m, dev)
        print(f"{WIDTH}x{HEIGHT}, {args.frames} pictures at {FPS} fps, "
              f"{args.bitrate / 1e6:g} Mbit/s asked (peak 1.5x for VBR)")
        print(f"{'codec':6} {'mode':4} {'kbit/s':>7} {'x asked':>7} {'PSNR min':>8} "
              f"{'mean':>6} {'fps':>6}")
        sid = 0
        for name, coded in CODECS.items():
            for mode in ("VBR", "CBR"):
                sid += 1
                run = EncodeRun(client, sid, coded, pictures, WIDTH, HEIGHT, frame_rate=FPS,
                                controls={p.Control.BITRATE: args.bitrate,
                                          p.Control.BITRATE_PEAK: args.bitrate * 3 // 2,
                                          p.Control.BITRATE_MODE: int(mode == "CBR")})
                t0 = time.perf_counter()
                client.run([run], timeout=600)
                elapsed = time.perf_counter() - t0
                bits = sum(len(pk.data) for pk in run.result.packets) * 8
                rate = bits * FPS / len(pictures)
                quality = run.psnr()
                print(f"{name:6} {mode:4} {rate / 1000:7.0f} {rate / args.bitrate:7.2f} "
                      f"{min(quality):8.1f} {statistics.mean(quality):6.1f} "
                      f"{len(pictures) / elapsed:6.0f}")
    finally:
        m.stop()


if __name__ == "__main__":
    main()
