"""virtio-video-py decoding through the patched QEMU and the host driver,
in the ChromeOS driver's flow (tests/video_client.py)."""

from __future__ import annotations

import itertools
import struct
import time

import av
import numpy as np
import pytest

from pyemb.video import protocol as p
from tests.conftest import start, with_and_without_ring_features
from tests.hostdriver import Machine
from tests.streams import CODECS, encode, reference, shared_dir, split_frames
from tests.video_client import StreamRun, VideoClient

CROSVM = shared_dir() / "vectors" / "crosvm-test-25fps"


@pytest.fixture
def video(transport, ring):
    m = start(transport, "virtio-video-py", mem_mb=256)
    try:
        dev = m.find_virtio(p.DECODER_DEVICE_ID)
        dev.initialize(want_features=0b11, **ring)
        yield VideoClient(m, dev)
    finally:
        m.stop()


@with_and_without_ring_features
def test_crosvm_vector_all_250_pictures_match(video):
    data = (CROSVM / "test-25fps.h264").read_bytes()
    expected = [int(c, 16) for c in (CROSVM / "test-25fps.crc").read_text().split()]
    chunks = [(chunk, 1000 * (i + 1)) for i, chunk in enumerate(split_frames(data))]
    result = video.decode(1, p.Format.H264, chunks)
    assert result.drain_status == p.Resp.OK_NODATA
    assert [pic.crc for pic in result.pictures] == expected
    assert all(flags == 0 for flags in result.input_flags)
    assert result.events[0] == (p.EventType.DECODER_RESOLUTION_CHANGED, 1)


def ns(index: int) -> int:
    return 1_000_000_000 + index * 40_000_000        # 25 fps in nanoseconds


@pytest.mark.parametrize("codec", ["h264", "hevc", "vp8", "vp9", "mpeg2", "mpeg4"])
def test_generated_streams_match_pyav_and_keep_timestamps(video, codec):
    packets = encode(codec, 160, 96, 24)
    chunks = [(data, ns(pts)) for data, pts in packets]
    result = video.decode(1, CODECS[codec][0], chunks)
    assert [pic.crc for pic in result.pictures] == reference(codec, [d for d, _ in packets])
    # Pictures come out in display order, each with its own frame's timestamp,
    # B-frames included.
    assert [pic.timestamp for pic in result.pictures] == [ns(i) for i in range(24)]
    kinds = {pic.flags for pic in result.pictures}
    assert p.BufferFlag.IFRAME in kinds and p.BufferFlag.PFRAME in kinds
    if codec in ("h264", "hevc", "mpeg2", "mpeg4"):
        assert p.BufferFlag.BFRAME in kinds


def test_coded_format_named_after_stream_create_as_the_chromeos_driver_does(video):
    packets = encode("vp8", 160, 96, 12)
    result = video.decode(1, p.Format.VP8, [(d, ns(pts)) for d, pts in packets],
                          open_as=p.Format.H264)
    assert [pic.crc for pic in result.pictures] == reference("vp8", [d for d, _ in packets])


def test_coded_format_is_fixed_once_an_input_is_queued(video):
    video.create_stream(1, p.Format.H264)
    video.create_resource(1, p.QueueType.INPUT, 0, video.alloc_entries(4096, 1))
    video.wait(video.queue(1, p.QueueType.INPUT, 0, 0, 16))
    params = video.get_params(1, p.QueueType.INPUT)
    params.format = p.Format.VP8
    reply = video.call(p.HDR.pack(p.Cmd.SET_PARAMS_EXT, 1) + params.pack_ext())
    assert status_of(reply) == p.Resp.ERR_INVALID_OPERATION


def test_size_before_the_headers_follows_the_client_then_the_stream(video):
    video.create_stream(1, p.Format.H264)
    out = video.get_params(1, p.QueueType.OUTPUT)
    assert (out.frame_width, out.frame_height) == (640, 480)      # never 0x0
    params = video.get_params(1, p.QueueType.INPUT)
    params.frame_width, params.frame_height = 322, 242
    video.set_params(1, params)
    out = video.get_params(1, p.QueueType.OUTPUT)
    assert (out.frame_width, out.frame_height, out.crop) == (336, 256, (0, 0, 322, 242))
    assert out.plane_formats == [(336 * 256, 336), (336 * 128, 336)]
    params.format = p.Format.VP8            # refused with the size: nothing changes
    for size in ((0, 0), (8, 8), (5000, 100)):
        params.frame_width, params.frame_height = size
        reply = video.call(p.HDR.pack(p.Cmd.SET_PARAMS_EXT, 1) + params.pack_ext())
        assert status_of(reply) == p.Resp.ERR_INVALID_PARAMETER, size
    coded = video.get_params(1, p.QueueType.INPUT)
    assert (coded.format, coded.frame_width, coded.frame_height) == (p.Format.H264, 322, 242)


def test_odd_size_is_cropped_from_an_aligned_coded_size(video):
    packets = encode("h264", 322, 242, 6)
    result = video.decode(1, p.Format.H264, [(d, ns(pts)) for d, pts in packets])
    assert {(pic.width, pic.height) for pic in result.pictures} == {(322, 242)}
    assert [pic.crc for pic in result.pictures] == reference("h264", [d for d, _ in packets])


def test_output_params_after_resolution_event(video):
    packets = encode("h264", 322, 242, 2)
    video.create_stream(1, p.Format.H264)
    entries = video.alloc_entries(1 << 20, 1)
    video.create_resource(1, p.QueueType.INPUT, 0, entries)
    data = b"".join(d for d, _ in packets)
    video.write_entries(entries, data)
    token = video.queue(1, p.QueueType.INPUT, 0, 7, len(data))
    video.wait(token)
    deadline = time.monotonic() + 10
    while not video.events:
        video.poll()
        assert time.monotonic() < deadline
    assert video.events == [(p.EventType.DECODER_RESOLUTION_CHANGED, 1)]
    params = video.get_params(1, p.QueueType.OUTPUT)
    assert params.format == p.Format.NV12
    assert (params.frame_width, params.frame_height) == (336, 256)
    assert params.crop == (0, 0, 322, 242)
    assert params.plane_formats == [(336 * 256, 336), (336 * 128, 336)]
    assert params.min_buffers >= 1


def test_resolution_change_midway(video):
    first = encode("h264", 160, 96, 8)
    second = encode("h264", 256, 144, 8, start=8)
    chunks = [(d, ns(pts)) for d, pts in first] + [(d, ns(8 + pts)) for d, pts in second]
    result = video.decode(1, p.Format.H264, chunks)
    sizes = [(pic.width, pic.height) for pic in result.pictures]
    assert sizes == [(160, 96)] * 8 + [(256, 144)] * 8
    assert result.events.count((p.EventType.DECODER_RESOLUTION_CHANGED, 1)) == 2
    expected = reference("h264", [d for d, _ in first] + [d for d, _ in second])
    assert [pic.crc for pic in result.pictures] == expected


def test_chunks_that_do_not_match_frame_boundaries(video):
    data = (CROSVM / "test-25fps.h264").read_bytes()
    expected = [int(c, 16) for c in (CROSVM / "test-25fps.crc").read_text().split()]
    chunks = [(data[i:i + 7001], i) for i in range(0, len(data), 7001)]
    result = video.decode(1, p.Format.H264, chunks)
    assert [pic.crc for pic in result.pictures] == expected
    # A picture carries the timestamp of the buffer that holds its first
    # byte: the chunk of its frame's first byte, in display order.
    frames = split_frames(data)
    offsets = list(itertools.accumulate((len(f) for f in frames[:-1]), initial=0))
    assert [pic.timestamp for pic in result.pictures] == \
        [offsets[i] // 7001 * 7001 for i in display_order(frames)]


def display_order(frames: list[bytes]) -> list[int]:
    """The index in ``frames`` (H.264, one frame each) of each picture PyAV
    decodes from them, in the order it outputs them."""
    ctx = av.CodecContext.create("h264", "r")
    order = []
    for i, data in enumerate([*frames, None]):
        packet = None
        if data is not None:
            packet = av.Packet(data)
            packet.pts = packet.dts = i
        order += [frame.pts for frame in ctx.decode(packet)]
    return order


class RunWithBadOutput(StreamRun):
    """Queues, alone, one PER_PLANE buffer whose chroma offset leaves too
    little room for the chroma plane, and holds the good buffers back until
    its reply is in (so the bad one is tried whichever free buffer the
    device would pick first)."""

    def __init__(self, *args, entries_per_plane: tuple[int, int], **kw) -> None:
        super().__init__(*args, **kw)
        self.entries_per_plane = entries_per_plane
        self.bad_token: int | None = None
        self.bad_replies: list[int] = []

    def reallocate_outputs(self) -> None:
        c, sid = self.c, self.sid
        if self.bad_token is not None or self.bad_replies:
            super().reallocate_outputs()
            return
        params = c.get_params(sid, p.QueueType.OUTPUT)
        size = sum(s for s, _ in params.plane_formats)
        luma, stride = params.plane_formats[0]
        chunks = sum(self.entries_per_plane)
        entries = c.alloc_entries(size, chunks)
        num = [*self.entries_per_plane] + [0] * 6
        offsets = [0, size - stride] + [0] * 6     # one chroma row fits, not all
        cmd = p.RESOURCE_CREATE.pack(p.Cmd.RESOURCE_CREATE, sid, p.QueueType.OUTPUT, 99,
                                     p.PlanesLayout.PER_PLANE, 2, *offsets, *num)
        c.call_ok(cmd, extra=b"".join(p.MEM_ENTRY.pack(a, n) for a, n in entries))
        self.bad_token = c.queue(sid, p.QueueType.OUTPUT, 99)

    def step(self, events: list[tuple[int, int]]) -> None:
        if self.bad_token is not None and self.bad_token in self.c.done:
            reply = self.c.done.pop(self.bad_token).data
            self.bad_token = None
            self.bad_replies.append(p.RESOURCE_QUEUE_RESP.unpack(reply)[3])
            super().reallocate_outputs()        # now the good buffers
        super().step(events)


@pytest.mark.parametrize("entries_per_plane", [(1, 0), (1, 1)],
                         ids=["one-chunk", "scattered"])
def test_output_buffer_the_picture_does_not_fit_gets_err_and_loses_nothing(
        video, entries_per_plane):
    packets = encode("h264", 160, 96, 8)
    chunks = [(d, ns(pts)) for d, pts in packets]
    run = RunWithBadOutput(video, 1, p.Format.H264, chunks,
                           entries_per_plane=entries_per_plane)
    result = video.run([run])[0]
    assert run.bad_replies == [p.BufferFlag.ERR]
    # The picture meant for the bad buffer went into the next one.
    assert [pic.crc for pic in result.pictures] == reference("h264", [d for d, _ in packets])


def test_one_input_buffer_with_every_frame(video):
    data = (CROSVM / "test-25fps.h264").read_bytes()
    expected = [int(c, 16) for c in (CROSVM / "test-25fps.crc").read_text().split()]
    result = video.decode(1, p.Format.H264, [(data, 42)])
    assert [pic.crc for pic in result.pictures] == expected
    assert {pic.timestamp for pic in result.pictures} == {42}


@with_and_without_ring_features
def test_scatter_gather_output_buffers_and_i420(video):
    packets = encode("vp9", 200, 120, 6)
    chunks = [(d, ns(pts)) for d, pts in packets]
    result = video.decode(1, p.Format.VP9, chunks, sg_chunks=7, output_format=p.Format.YUV420)
    assert [pic.crc for pic in result.pictures] == reference(
        "vp9", [d for d, _ in packets], p.Format.YUV420)


@with_and_without_ring_features
def test_eight_streams_at_once(video):
    runs = []
    for sid, codec in enumerate(["h264", "vp8", "vp9", "hevc", "mpeg2", "mpeg4", "h264", "vp9"]):
        packets = encode(codec, 128 + 16 * sid, 96, 10)
        runs.append((codec, packets, StreamRun(video, sid + 1, CODECS[codec][0],
                                               [(d, ns(pts)) for d, pts in packets],
                                               input_buffers=2, output_buffers=4)))
    results = video.run([run for _, _, run in runs])
    for (codec, packets, _), result in zip(runs, results, strict=True):
        assert [pic.crc for pic in result.pictures] == reference(codec, [d for d, _ in packets])



@with_and_without_ring_features
def test_commands_of_several_streams_at_once_each_reply_in_its_own_chain(video):
    """An output buffer of a stream that has no input, an input for each
    of four streams, a GET_PARAMS_EXT for each and one for a stream that
    does not exist, made available together with one kick: every reply is
    the one its own command asked for, in whatever order they come (the
    inputs' from the stream workers; the output buffer, first in the
    batch, only when its queue is cleared)."""
    v = video
    v.used_order = []
    streams = {1: ("h264", 160, 96), 2: ("vp8", 192, 112), 3: ("vp9", 224, 128),
               4: ("hevc", 256, 144)}
    data = {}
    for sid, (codec, w, h) in streams.items():
        data[sid] = b"".join(d for d, _ in encode(codec, w, h, 4))
        v.create_stream(sid, CODECS[codec][0])
        params = v.get_params(sid, p.QueueType.INPUT)
        params.frame_width, params.frame_height = w, h
        v.set_params(sid, params)
        entries = v.alloc_entries(len(data[sid]), 1)
        v.create_resource(sid, p.QueueType.INPUT, 0, entries)
        v.write_entries(entries, data[sid])
    v.create_stream(5, p.Format.H264)
    v.create_resource(5, p.QueueType.OUTPUT, 0, v.alloc_entries(1 << 16, 1))
    held = v.queue(5, p.QueueType.OUTPUT, 0, kick=False)
    asked = {}
    for sid in streams:
        asked[v.queue(sid, p.QueueType.INPUT, 0, 1000 * sid + 7, len(data[sid]),
                      kick=False)] = ("input", sid)
    for sid in [*streams, 9]:
        cmd = p.QUEUE_CMD.pack(p.Cmd.GET_PARAMS_EXT, sid, p.QueueType.INPUT)
        asked[v.submit(cmd, kick=False)] = ("params", sid)
    v.kick()
    replies = {token: v.wait(token) for token in asked}
    for token, (kind, sid) in asked.items():
        reply = replies[token]
        if kind == "input":
            status, _, timestamp, flags, _ = p.RESOURCE_QUEUE_RESP.unpack(reply)
            assert (status, timestamp, flags) == (p.Resp.OK_RESOURCE_QUEUE, 1000 * sid + 7, 0)
        elif sid in streams:
            assert status_of(reply) == p.Resp.OK_GET_PARAMS
            params = p.Params.unpack(reply, p.HDR.size, ext=True)
            codec, w, h = streams[sid]
            assert (params.format, params.frame_width, params.frame_height) == \
                (CODECS[codec][0], w, h), sid
        else:
            assert status_of(reply) == p.Resp.ERR_INVALID_STREAM_ID
    v.poll()
    assert held not in v.done                   # first made available, still out
    v.call_ok(p.QUEUE_CMD.pack(p.Cmd.QUEUE_CLEAR, 5, p.QueueType.OUTPUT))
    assert p.RESOURCE_QUEUE_RESP.unpack(v.wait(held))[3] == p.BufferFlag.ERR
    at = positions(v)
    assert at[held] > max(at[token] for token in asked)
    for sid in [*streams, 5]:
        v.call_ok(p.HDR.pack(p.Cmd.STREAM_DESTROY, sid))

def test_two_devices_in_one_qemu():
    args = ["-device", "virtio-video-py-pci,addr=4", "-device", "virtio-video-py-pci,addr=5"]
    with Machine.x86(args, mem_mb=256) as m:
        devs = [d for d in m.virtio_devices() if d.device_id == p.DECODER_DEVICE_ID]
        assert len(devs) == 2
        packets = encode("h264", 160, 96, 10)
        expected = reference("h264", [d for d, _ in packets])
        for dev in devs:
            dev.initialize(want_features=0b11)
        clients = [VideoClient(m, dev) for dev in devs]
        for client in clients:
            result = client.decode(1, p.Format.H264, [(d, ns(pts)) for d, pts in packets])
            assert [pic.crc for pic in result.pictures] == expected


def test_corrupt_stream_fails_alone_and_others_keep_decoding(video):
    good = encode("h264", 160, 96, 10)
    rng = np.random.default_rng(1)
    garbage = [(rng.integers(0, 256, 3000, np.uint8).tobytes(), i) for i in range(10)]
    # Valid headers, then corrupt slices.
    broken = [(good[0][0], 0)] + [(g[:1500] + d[1500:], i + 1) for i, (d, (g, _)) in
                                  enumerate(zip([d for d, _ in good[1:]], garbage, strict=False))]
    runs = [StreamRun(video, 1, p.Format.H264, garbage),
            StreamRun(video, 2, p.Format.H264, broken),
            StreamRun(video, 3, p.Format.H264, [(d, ns(pts)) for d, pts in good])]
    results = video.run(runs)
    # Nothing decodable at all: EVENT_ERROR for that stream, drain refused.
    assert (p.EventType.ERROR, 1) in results[0].events
    assert results[0].drain_status == p.Resp.ERR_INVALID_OPERATION
    # Corrupt slices after good headers: decoded as far as possible, no hang.
    assert results[1].drain_status == p.Resp.OK_NODATA
    assert [pic.crc for pic in results[2].pictures] == reference("h264", [d for d, _ in good])
    assert video.m.alive()


def status_of(reply: bytes) -> int:
    return p.HDR.unpack_from(reply)[0]


def test_malformed_commands_get_protocol_errors(video):
    v = video
    assert status_of(v.call(p.HDR.pack(0x1FF, 0))) == p.Resp.ERR_INVALID_OPERATION
    assert status_of(v.call(b"\x01")) == p.Resp.ERR_INVALID_PARAMETER
    assert status_of(v.call(p.QUEUE_CMD.pack(p.Cmd.GET_PARAMS, 9, p.QueueType.INPUT))) \
        == p.Resp.ERR_INVALID_STREAM_ID
    create = p.STREAM_CREATE.pack(p.Cmd.STREAM_CREATE, 1, 0, 0, 0x7777, 0, b"")
    assert status_of(v.call(create)) == p.Resp.ERR_INVALID_PARAMETER
    v.create_stream(1, p.Format.H264)
    again = p.STREAM_CREATE.pack(p.Cmd.STREAM_CREATE, 1, 0, 0, p.Format.H264, 0, b"")
    assert status_of(v.call(again)) == p.Resp.ERR_INVALID_STREAM_ID
    queue = p.RESOURCE_QUEUE.pack(p.Cmd.RESOURCE_QUEUE, 1, p.QueueType.INPUT, 5, 0, 1, 10,
                                  *([0] * 7))
    assert status_of(v.call(queue)) == p.Resp.ERR_INVALID_RESOURCE_ID
    bad_queue = p.QUEUE_CMD.pack(p.Cmd.QUEUE_CLEAR, 1, 0x555)
    assert status_of(v.call(bad_queue)) == p.Resp.ERR_INVALID_PARAMETER
    assert status_of(v.call(p.SET_CONTROL.pack(p.Cmd.SET_CONTROL, 1, p.Control.BITRATE, 1))) \
        == p.Resp.ERR_UNSUPPORTED_CONTROL
    assert v.m.alive()


@pytest.mark.parametrize("entries,why", [
    ([(0x2000000, 0)], "zero length"),
    ([(0x7FFF0000_0000, 4096)], "outside guest RAM"),
    ([(0x2000000, 8192), (0x2001000, 4096)], "overlapping"),
    ([(0x2000000 + 4096 * i, 16) for i in range(5000)], "too many"),
])
def test_bad_resource_entries_are_refused(video, entries, why):
    video.create_stream(1, p.Format.H264)
    base = video.m.ram_base
    entries = [(base + a if a < 0x10000000 else a, n) for a, n in entries]
    num = [len(entries)] + [0] * 7
    cmd = p.RESOURCE_CREATE.pack(p.Cmd.RESOURCE_CREATE, 1, p.QueueType.INPUT, 0,
                                 p.PlanesLayout.SINGLE_BUFFER, 1, *([0] * 8), *num)
    body = b"".join(p.MEM_ENTRY.pack(a, n) for a, n in entries)
    assert status_of(video.call(cmd, extra=body)) == p.Resp.ERR_INVALID_PARAMETER, why
    assert status_of(video.call(p.QUEUE_CMD.pack(p.Cmd.GET_PARAMS, 1, p.QueueType.INPUT))) \
        == p.Resp.OK_GET_PARAMS


@pytest.mark.parametrize("command", ["QUEUE_CLEAR", "RESOURCE_DESTROY_ALL", "STREAM_DESTROY"])
def test_clear_destroy_return_pending_buffers_with_err_first(video, command):
    v = video
    v.create_stream(1, p.Format.H264)
    params = v.get_params(1, p.QueueType.OUTPUT)
    params.resource_type = p.MemType.GUEST_PAGES
    tokens = []
    for rid in range(3):
        v.create_resource(1, p.QueueType.OUTPUT, rid, v.alloc_entries(65536, 2))
        tokens.append(v.queue(1, p.QueueType.OUTPUT, rid))
    kind = getattr(p.Cmd, command)
    cmd = (p.HDR.pack(kind, 1) if command == "STREAM_DESTROY"
           else p.QUEUE_CMD.pack(kind, 1, p.QueueType.OUTPUT))
    answer = v.submit(cmd)
    deadline = time.monotonic() + 10
    order = []
    while len(order) < 4:
        used = v.cmdq.poll()
        if used is None:
            assert time.monotonic() < deadline
            continue
        order.append(used.chain.token)
        if used.chain.token != answer:
            assert p.RESOURCE_QUEUE_RESP.unpack(used.data)[3] & p.BufferFlag.ERR
    assert order[-1] == answer and sorted(order[:3]) == sorted(tokens)


def test_profiles_and_levels(video):
    q = p.QUERY_CONTROL.pack(p.Cmd.QUERY_CONTROL, 0, p.Control.PROFILE, p.Format.H264)
    reply = video.call(q)
    status, _, num = p.QUERY_CONTROL_RESP.unpack_from(reply)
    values = struct.unpack_from(f"<{num}I", reply, p.QUERY_CONTROL_RESP.size)
    assert status == p.Resp.OK_QUERY_CONTROL
    assert 0x100 in values and 0x103 in values and 0x102 not in values   # no EXTENDED
    q = p.QUERY_CONTROL.pack(p.Cmd.QUERY_CONTROL, 0, p.Control.LEVEL, p.Format.H264)
    status, _, num = p.QUERY_CONTROL_RESP.unpack_from(video.call(q))
    assert num == 15
    q = p.QUERY_CONTROL.pack(p.Cmd.QUERY_CONTROL, 0, p.Control.LEVEL, p.Format.VP8)
    assert status_of(video.call(q)) == p.Resp.ERR_UNSUPPORTED_CONTROL


def test_get_control_reports_the_stream_profile_and_level(video):
    packets = encode("h264", 160, 96, 4)          # x264: High profile, level 1.1
    video.create_stream(1, p.Format.H264)
    entries = video.alloc_entries(1 << 20, 1)
    video.create_resource(1, p.QueueType.INPUT, 0, entries)
    data = b"".join(d for d, _ in packets)
    video.write_entries(entries, data)
    video.wait(video.queue(1, p.QueueType.INPUT, 0, 0, len(data)))
    get = p.GET_CONTROL.pack(p.Cmd.GET_CONTROL, 1, p.Control.PROFILE)
    assert p.GET_CONTROL_RESP.unpack(video.call(get))[2] == 0x103
    get = p.GET_CONTROL.pack(p.Cmd.GET_CONTROL, 1, p.Control.LEVEL)
    assert p.GET_CONTROL_RESP.unpack(video.call(get))[2] == 0x101


# -- commands racing a busy worker ------------------------------------------------------
def positions(video: VideoClient) -> dict[int, int]:
    """Token -> place on the used ring, for every reply seen so far."""
    assert video.used_order is not None
    return {used.chain.token: i for i, used in enumerate(video.used_order)}


def wait_done(video: VideoClient, token: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while token not in video.done:
        assert time.monotonic() < deadline, "no answer from the video device"
        video.poll()
        time.sleep(0.0002)


def flags_of(used) -> int:
    return p.RESOURCE_QUEUE_RESP.unpack(used.data)[3]


@pytest.mark.parametrize("command", ["QUEUE_CLEAR", "RESOURCE_DESTROY_ALL", "STREAM_DESTROY"])
def test_the_input_being_decoded_comes_back_with_err_before_the_answer(video, command):
    """A clear or destroy while FFmpeg decodes an input: that input is
    taken back with ERR before the answer, and nothing of it follows."""
    v = video
    v.used_order = []
    # About a quarter of a second of FFmpeg work in one buffer.
    data = b"".join(d for d, _ in encode("h264", 1280, 720, 24, noise=12)) * 4
    v.create_stream(1, p.Format.H264)
    for rid, size in ((0, len(data)), (1, 1 << 20)):
        entries = v.alloc_entries(size, 1)
        v.create_resource(1, p.QueueType.INPUT, rid, entries)
        v.write_entries(entries, data[:size])
    busy = v.queue(1, p.QueueType.INPUT, 0, 10, len(data))
    time.sleep(0.03)                    # the worker is inside FFmpeg with it
    waiting = v.queue(1, p.QueueType.INPUT, 1, 20, 1 << 20)
    kind = getattr(p.Cmd, command)
    answer = v.submit(p.HDR.pack(kind, 1) if command == "STREAM_DESTROY"
                      else p.QUEUE_CMD.pack(kind, 1, p.QueueType.INPUT))
    wait_done(v, answer)
    at = positions(v)
    assert busy in at and waiting in at, "the inputs were not taken back before the answer"
    assert flags_of(v.done[busy]) == flags_of(v.done[waiting]) == p.BufferFlag.ERR
    assert at[busy] < at[answer] and at[waiting] < at[answer]
    seen = len(v.used_order)
    time.sleep(1.0)                     # the decode ends meanwhile
    v.poll()
    assert len(v.used_order) == seen, "a completion came after the answer"
    assert not v.events, "an event for what was decoded from a cleared input"
    if command != "STREAM_DESTROY":     # and the stream is still there
        status = p.HDR.unpack_from(v.call(p.QUEUE_CMD.pack(p.Cmd.GET_PARAMS_EXT, 1,
                                                           p.QueueType.INPUT)))[0]
        assert status == p.Resp.OK_GET_PARAMS


class Feeder:
    """One stream kept busy through the host driver: frame-sized inputs
    queued as they come back, output buffers requeued as they come back
    (unless ``requeue`` is off)."""

    def __init__(self, video: VideoClient, sid: int, chunks: list[bytes], inputs: int = 4,
                 outputs: int = 6) -> None:
        self.v, self.sid, self.todo = video, sid, list(chunks)
        self.outputs = outputs
        video.create_stream(sid, p.Format.H264)
        self.inputs = {rid: video.alloc_entries(1 << 20, 1) for rid in range(inputs)}
        for rid, entries in self.inputs.items():
            video.create_resource(sid, p.QueueType.INPUT, rid, entries)
        self.free_inputs = list(self.inputs)
        self.in_tokens: dict[int, int] = {}
        self.out_tokens: dict[int, int] = {}
        self.out_rids: list[int] = []
        self.pictures = 0
        self.requeue = True

    def pump(self) -> None:
        v, sid = self.v, self.sid
        v.poll()
        if any(ev == (p.EventType.DECODER_RESOLUTION_CHANGED, sid) for ev in v.events):
            assert not self.out_rids, "one size only"
            params = v.get_params(sid, p.QueueType.OUTPUT)
            size = sum(s for s, _ in params.plane_formats)
            for rid in range(100, 100 + self.outputs):
                v.create_resource(sid, p.QueueType.OUTPUT, rid, v.alloc_entries(size, 1))
                self.out_rids.append(rid)
            self.queue_outputs()
        v.events.clear()
        for token in [t for t in v.done if t in self.in_tokens]:
            v.done.pop(token)
            self.free_inputs.append(self.in_tokens.pop(token))
        for token in [t for t in v.done if t in self.out_tokens]:
            rid = self.out_tokens.pop(token)
            if flags_of(v.done.pop(token)) & p.BufferFlag.ERR == 0:
                self.pictures += 1
            if self.requeue:
                self.out_tokens[v.queue(sid, p.QueueType.OUTPUT, rid, kick=False)] = rid
        while self.todo and self.free_inputs:
            rid = self.free_inputs.pop(0)
            data = self.todo.pop(0)
            v.write_entries(self.inputs[rid], data)
            self.in_tokens[v.queue(sid, p.QueueType.INPUT, rid, 0, len(data), kick=False)] = rid
        v.kick(wait=False)

    def queue_outputs(self) -> None:
        queued = set(self.out_tokens.values())
        for rid in self.out_rids:
            if rid not in queued:
                self.out_tokens[self.v.queue(self.sid, p.QueueType.OUTPUT, rid,
                                             kick=False)] = rid
        self.v.kick()

    def run_until(self, pictures: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pictures < pictures:
            assert time.monotonic() < deadline, f"{self.pictures} pictures"
            assert self.todo or self.in_tokens or self.out_tokens, "ran out of stream"
            self.pump()
            time.sleep(0.0002)


def test_clear_output_while_pictures_are_written_answers_after_every_buffer(video):
    """QUEUE_CLEAR(OUTPUT) sent again and again while 1080p pictures are
    written: every output buffer queued before it is on the used ring
    before its answer, none after."""
    v = video
    v.used_order = []
    chunks = split_frames(b"".join(d for d, _ in encode("h264", 1920, 1080, 24))) * 4
    feeder = Feeder(v, 1, chunks)
    for clear in range(8):
        feeder.run_until(4 * (clear + 1))
        outstanding = set(feeder.out_tokens)
        feeder.requeue = False
        answer = v.submit(p.QUEUE_CMD.pack(p.Cmd.QUEUE_CLEAR, 1, p.QueueType.OUTPUT))
        wait_done(v, answer)
        at = positions(v)
        late = [t for t in outstanding if t not in at or at[t] > at[answer]]
        assert not late, f"clear {clear}: {len(late)} buffers not back before the answer"
        assert p.HDR.unpack_from(v.done.pop(answer).data)[0] == p.Resp.OK_NODATA
        feeder.pump()                    # takes the buffers back
        assert not feeder.out_tokens
        feeder.requeue = True
        feeder.queue_outputs()
    v.call_ok(p.HDR.pack(p.Cmd.STREAM_DESTROY, 1))
    for token in list(feeder.in_tokens) + list(feeder.out_tokens):
        v.wait(token)


@with_and_without_ring_features
def test_reset_while_a_stream_decodes_leaves_nothing_for_the_next_driver(video):
    v = video
    chunks = split_frames(b"".join(d for d, _ in encode("h264", 1920, 1080, 24))) * 2
    feeder = Feeder(v, 1, chunks)
    feeder.run_until(6)
    feeder.pump()
    v.dev.initialize(want_features=0b11)     # a driver reset while pictures are written
    fresh = VideoClient(v.m, v.dev)
    time.sleep(0.5)                         # the old worker has long ended its write
    fresh.poll()
    assert not fresh.done and not fresh.events, "a stream of before the reset completed"
    packets = encode("h264", 160, 96, 10)
    result = fresh.decode(1, p.Format.H264, [(d, ns(pts)) for d, pts in packets])
    assert [pic.crc for pic in result.pictures] == reference("h264", [d for d, _ in packets])
    assert v.m.alive()


def test_corrupt_inputs_are_logged_once_per_stream(video):
    """A guest that sends corrupt input after corrupt input cannot fill the
    host's log: one line per stream (issue 15 measured ~130 KB/s before)."""
    good = encode("vp8", 160, 96, 10)
    rng = np.random.default_rng(2)
    broken = [(good[0][0], 0)] + [(rng.integers(0, 256, 2000, np.uint8).tobytes(), i)
                                  for i in range(1, 60)]
    result = video.run([StreamRun(video, 1, p.Format.VP8, broken)])[0]
    assert result.input_flags.count(p.BufferFlag.ERR) > 40     # FFmpeg refused most
    lines = [line for line in video.m.stderr().splitlines() if "corrupt input" in line]
    assert len(lines) == 1, lines
    assert "logged once per stream" in lines[0]


def test_resources_per_queue_are_bounded(video):
    """Issue 15: 300 resources of 4,096 entries took QEMU from 36 MB to
    601 MB.  A queue has at most 64 (V4L2's VIDEO_MAX_FRAME); replacing one
    is always allowed."""
    video.create_stream(1, p.Format.H264)
    page = video.alloc_entries(4096, 1)
    for rid in range(64):
        video.create_resource(1, p.QueueType.INPUT, rid, page)
    num_entries = [1] + [0] * 7
    cmd = p.RESOURCE_CREATE.pack(p.Cmd.RESOURCE_CREATE, 1, p.QueueType.INPUT, 64,
                                 p.PlanesLayout.SINGLE_BUFFER, 1, *([0] * 8), *num_entries)
    reply = video.call(cmd, extra=p.MEM_ENTRY.pack(*page[0]))
    assert status_of(reply) == p.Resp.ERR_OUT_OF_MEMORY
    video.create_resource(1, p.QueueType.INPUT, 5, page)           # a replacement
    video.create_resource(1, p.QueueType.OUTPUT, 64, page)         # the other queue


def test_mapped_entries_share_a_device_budget(tmp_path):
    cfg = tmp_path / "video.toml"
    cfg.write_text("[video]\nmax_mapped_entries = 100\n")
    m = start("pci", "virtio-video-py", f"config={cfg}", mem_mb=256)
    try:
        dev = m.find_virtio(p.DECODER_DEVICE_ID)
        dev.initialize(want_features=0b11)
        video = VideoClient(m, dev)
        video.create_stream(1, p.Format.H264)
        video.create_stream(2, p.Format.H264)
        sixty = video.alloc_entries(60 * 4096, 60)
        video.create_resource(1, p.QueueType.INPUT, 0, sixty)
        num_entries = [60] + [0] * 7
        cmd = p.RESOURCE_CREATE.pack(p.Cmd.RESOURCE_CREATE, 2, p.QueueType.INPUT, 0,
                                     p.PlanesLayout.SINGLE_BUFFER, 1, *([0] * 8), *num_entries)
        body = b"".join(p.MEM_ENTRY.pack(a, n) for a, n in sixty)
        assert status_of(video.call(cmd, extra=body)) == p.Resp.ERR_OUT_OF_MEMORY
        # Destroying the first stream's resources gives their entries back.
        video.call_ok(p.QUEUE_CMD.pack(p.Cmd.RESOURCE_DESTROY_ALL, 1, p.QueueType.INPUT))
        video.create_resource(2, p.QueueType.INPUT, 0, sixty)
        video.call_ok(p.HDR.pack(p.Cmd.STREAM_DESTROY, 2))
        video.create_resource(1, p.QueueType.INPUT, 1, sixty)
    finally:
        m.stop()
