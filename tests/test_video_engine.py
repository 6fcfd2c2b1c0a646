"""The PyAV engine (pyemb/video_backend.py) on its own, with real FFmpeg, in
a child process where a failure may be a crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

AFTER_A_DRAIN = """
from pyemb.video_backend import DecodeError, PyAVSession
from tests.streams import encode
packets = [data for data, _ in encode("vp9", 96, 64, 6)]
session = PyAVSession("vp9")
for i, data in enumerate([packets[0].ljust(4096, b"\\0"), None, packets[2], packets[2]]):
    try:
        session.flush() if data is None else session.decode(data, i)
    except DecodeError:
        pass
session.close()
print("alive")
"""


def test_a_vp9_session_decodes_on_after_a_drain_without_crashing():
    """A keyframe, a drain (EOF, then the context made ready for more), then
    inter frames: FFmpeg 8's frame-threaded VP9 decoder, reused after
    avcodec_flush_buffers, jumped to a null pointer in a frame thread.  In
    QEMU that was a guest's STREAM_DRAIN killing it (SIGSEGV; the protocol
    fuzzer's crash oracle, virtio-video decoder).  A drained session now
    goes on in a new context."""
    for _ in range(3):          # the crash was every time; be sure
        done = subprocess.run([sys.executable, "-c", AFTER_A_DRAIN], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == "alive", \
            (done.returncode, done.stderr[-2000:])
