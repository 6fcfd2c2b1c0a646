"""What the sanitizer build (make sanitize: ASan + UBSan, ci/sanitizers.py)
found, pinned down where it can be without that build.

The qtest tier under ASan is the test that fails without each fix; these
check the contract in the ordinary test run.
"""

from __future__ import annotations

import zlib

from pyemb.video_backend import PARSER_PADDING, PyAVSession, padded
from tests.streams import encode, reference, visible


def test_padded_is_the_data_in_memory_followed_by_zeros():
    view = padded(b"\x01\x02\x03")
    assert bytes(view) == b"\x01\x02\x03"
    assert len(view.obj) == 3 + PARSER_PADDING
    assert bytes(view.obj[3:]) == bytes(PARSER_PADDING)


class ParseSpy:
    """The session's PyAV codec context, keeping what parse() was given."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.seen: list = []

    def parse(self, data=None):
        self.seen.append(data)
        return self.ctx.parse(data)

    def __getattr__(self, name):
        return getattr(self.ctx, name)


def test_the_decoder_gives_ffmpeg_parsers_their_input_padding():
    # ASan: av_parser_parse2 read 64 bytes past the end of the bytes object
    # the decoder handed to PyAV's parse() (heap-buffer-overflow in every
    # decoder test of the qtest tier); FFmpeg wants AV_INPUT_BUFFER_PADDING_SIZE
    # readable bytes after the input.  Chunks cut mid-frame, as a guest may.
    stream = b"".join(data for data, _ in encode("h264", 64, 48, 8))
    chunks = [stream[i:i + 777] for i in range(0, len(stream), 777)]
    session = PyAVSession("h264", threads=1)
    session.ctx = spy = ParseSpy(session.ctx)
    crcs = [zlib.crc32(visible(pic.frame))
            for i, chunk in enumerate(chunks) for pic in session.decode_each(chunk, i)]
    crcs += [zlib.crc32(visible(pic.frame)) for pic in session.flush()]
    assert crcs == reference("h264", chunks)
    fed = [view for view in spy.seen if view is not None]
    assert len(fed) == len(chunks)
    for view, chunk in zip(fed, chunks, strict=True):
        assert bytes(view) == chunk
        assert bytes(view.obj[len(chunk):]) == bytes(PARSER_PADDING)


class CountingSws:
    """libswscale's three calls, counting the contexts made and freed."""

    def __init__(self, sws) -> None:
        self.sws, self.live = sws, set()

    def sws_getCachedContext(self, ctx, *args):
        new = self.sws.sws_getCachedContext(ctx, *args)
        if new != ctx:
            self.live.discard(ctx)
            self.live.add(new)
        return new

    def sws_scale(self, *args):
        return self.sws.sws_scale(*args)

    def sws_freeContext(self, ctx):
        self.live.discard(ctx)
        self.sws.sws_freeContext(ctx)


def test_a_converter_used_after_close_frees_its_scaler_context_when_it_goes(monkeypatch):
    # LeakSanitizer: 52 KiB scaler contexts (av_malloc) unreachable at exit
    # in decoder and encoder runs.  A picture keeps its session's converter
    # and may be written after the session closed it (a retired session, a
    # stream torn down while a picture waits for a buffer): the write made a
    # new context that nothing freed.
    import gc

    import numpy as np

    from pyemb import pyav_swscale
    from pyemb.video.protocol import Format

    sws, formats = pyav_swscale._load()
    counting = CountingSws(sws)
    monkeypatch.setattr(pyav_swscale, "_lib", (counting, formats))
    stream = b"".join(data for data, _ in encode("h264", 64, 48, 2))
    session = PyAVSession("h264", threads=1)
    pictures = [*session.decode_each(stream, 0), *session.flush()]
    target = np.zeros(64 * 48 * 3 // 2, np.uint8)
    layout = [(0, 64), (64 * 48, 64)]
    pictures[0].write_into(Format.NV12, target, layout)
    assert len(counting.live) == 1
    session.close()
    assert counting.live == set()
    pictures[1].write_into(Format.NV12, target, layout)     # after close
    del session, pictures
    gc.collect()
    assert counting.live == set()
