"""virtio-video-py encoding (device 30) through the patched QEMU and the host
driver, in the ChromeOS driver's flow (tests/encoder_client.py).  Every
bitstream is decoded with PyAV and compared with the pictures that went in."""

from __future__ import annotations

import pytest

from pyemb.video import protocol as p
from tests.conftest import start, with_and_without_ring_features
from tests.encoder_client import EncodeRun, raw_pictures
from tests.video_client import VideoClient

CODECS = {"h264": p.Format.H264, "hevc": p.Format.HEVC, "vp8": p.Format.VP8,
          "vp9": p.Format.VP9}


def encoder_machine(transport: str = "pci", ring: dict[str, bool] | None = None):
    """``ring``: the virtqueue features (the ``ring`` fixture)."""
    m = start(transport, "virtio-video-py", "role=encoder", mem_mb=256)
    dev = m.find_virtio(p.ENCODER_DEVICE_ID)
    dev.initialize(want_features=0b11, **(ring or {}))
    return m, VideoClient(m, dev)


@pytest.fixture
def enc(ring):
    m, client = encoder_machine(ring=ring)
    try:
        yield client
    finally:
        m.stop()


def encode(client: VideoClient, coded: int, pictures: list[bytes], width: int, height: int,
           sid: int = 1, **kw) -> EncodeRun:
    run = EncodeRun(client, sid, coded, pictures, width, height, **kw)
    client.run([run])
    return run


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_each_codec_encodes_what_pyav_decodes_at_35_db(enc, codec):
    pictures = raw_pictures(320, 240, 30)
    run = encode(enc, CODECS[codec], pictures, 320, 240,
                 controls={p.Control.BITRATE: 2_000_000})
    r = run.result
    assert r.drain_status == p.Resp.OK_NODATA and r.eos_seen
    assert all(flags == 0 for flags in r.input_flags)
    assert len(r.packets) == 30
    assert [pk.timestamp for pk in r.packets] == run.timestamps
    assert r.packets[0].flags == p.BufferFlag.IFRAME
    assert all(pk.flags == p.BufferFlag.PFRAME for pk in r.packets[1:])
    assert min(run.psnr()) >= 35


@with_and_without_ring_features
def test_i420_at_an_odd_size_from_scattered_pages(enc):
    pictures = raw_pictures(322, 242, 12, p.Format.YUV420)
    run = encode(enc, p.Format.H264, pictures, 322, 242, raw_format=p.Format.YUV420,
                 sg_chunks=5, controls={p.Control.BITRATE: 2_000_000})
    assert len(run.result.packets) == 12
    assert min(run.psnr()) >= 35


def bits_per_second(run: EncodeRun, first: int, last: int) -> float:
    data = sum(len(pk.data) for pk in run.result.packets[first:last])
    return data * 8 * run.frame_rate / (last - first)


@pytest.mark.parametrize("codec", ["h264", "vp8"])
def test_cbr_holds_the_bitrate_over_three_seconds(enc, codec):
    pictures = raw_pictures(320, 240, 90, noise=12)
    run = encode(enc, CODECS[codec], pictures, 320, 240,
                 controls={p.Control.BITRATE: 400_000, p.Control.BITRATE_MODE: 1})
    assert len(run.result.packets) == 90
    assert bits_per_second(run, 0, 90) == pytest.approx(400_000, rel=0.10)


def test_a_bitrate_change_midway_takes_effect(enc):
    pictures = raw_pictures(320, 240, 60, noise=12)

    def faster(r: EncodeRun) -> None:
        r.set_control(p.Control.BITRATE, 1_600_000)
        r.set_control(p.Control.BITRATE_PEAK, 1_600_000)

    run = encode(enc, p.Format.H264, pictures, 320, 240, before={30: faster},
                 controls={p.Control.BITRATE: 200_000, p.Control.BITRATE_PEAK: 200_000,
                           p.Control.BITRATE_MODE: 1})
    assert len(run.result.packets) == 60
    before, after = bits_per_second(run, 1, 30), bits_per_second(run, 31, 60)
    assert before == pytest.approx(200_000, rel=0.25)
    assert after == pytest.approx(1_600_000, rel=0.25)
    # The new rate starts at the picture queued after the change, with a keyframe.
    assert run.result.packets[30].flags == p.BufferFlag.IFRAME


def nal_types(data: bytes, codec: str) -> list[int]:
    """The NAL unit types of an Annex B access unit, in order."""
    types, i = [], 0
    while (i := data.find(b"\x00\x00\x01", i)) >= 0:
        header = data[i + 3]
        types.append(header & 0x1F if codec == "h264" else (header >> 1) & 0x3F)
        i += 3
    return types


@pytest.mark.parametrize("codec,prepend", [("h264", 1), ("h264", 0), ("hevc", 1)])
def test_forced_keyframes_land_exactly_and_carry_headers_when_asked(enc, codec, prepend):
    pictures = raw_pictures(320, 240, 30)

    def force(r: EncodeRun) -> None:
        # As the ChromeOS driver sends it: the head, no value.
        r.c.call_ok(p.SET_CONTROL_HEAD.pack(p.Cmd.SET_CONTROL, r.sid, p.Control.FORCE_KEYFRAME))

    run = encode(enc, CODECS[codec], pictures, 320, 240, before={11: force, 23: force},
                 controls={p.Control.PREPEND_SPSPPS_TO_IDR: prepend})
    packets = run.result.packets
    keyframes = [i for i, pk in enumerate(packets) if pk.flags == p.BufferFlag.IFRAME]
    assert keyframes == [0, 11, 23]
    sps = 7 if codec == "h264" else 33
    with_headers = [i for i, pk in enumerate(packets) if sps in nal_types(pk.data, codec)]
    assert with_headers == (keyframes if prepend else [0])
    assert min(run.psnr()) >= 35


@with_and_without_ring_features
def test_drain_returns_every_pending_packet_then_eos(enc):
    """Pictures queued and drained with no output buffer yet: the packets
    wait, then fill the buffers as they come, then the empty EOS buffer."""
    run = EncodeRun(enc, 1, p.Format.VP9, raw_pictures(160, 96, 8), 160, 96,
                    input_buffers=8, output_buffers=0)
    run.start()
    run.step([])
    enc.kick()
    for token in list(run.in_flight):
        enc.wait(token)                  # every picture is read before any packet goes out
        run.free_inputs.append(run.in_flight.pop(token))
    run.outputs = {100 + i: enc.alloc_entries(64 << 10, 1) for i in range(3)}
    for rid, entries in run.outputs.items():
        enc.create_resource(1, p.QueueType.OUTPUT, rid, entries)
        run.out_flight[enc.queue(1, p.QueueType.OUTPUT, rid, kick=False)] = rid
    enc.run([run])
    assert run.result.drain_status == p.Resp.OK_NODATA
    assert [pk.timestamp for pk in run.result.packets] == run.timestamps
    assert min(run.psnr()) >= 35


@with_and_without_ring_features
def test_four_streams_at_once(enc):
    runs = [EncodeRun(enc, sid, coded, raw_pictures(192, 128, 20), 192, 128,
                      controls={p.Control.BITRATE: 1_500_000})
            for sid, coded in enumerate(CODECS.values(), start=1)]
    enc.run(runs)
    for run in runs:
        assert run.result.drain_status == p.Resp.OK_NODATA
        assert len(run.result.packets) == 20
        assert min(run.psnr()) >= 35


def status_of(reply: bytes) -> int:
    return p.HDR.unpack_from(reply)[0]


@with_and_without_ring_features
@pytest.mark.parametrize("command", ["QUEUE_CLEAR", "RESOURCE_DESTROY_ALL", "STREAM_DESTROY"])
def test_clear_and_destroy_while_encoding_return_every_buffer_first(enc, command):
    run = EncodeRun(enc, 1, p.Format.H264, raw_pictures(640, 480, 16), 640, 480,
                    input_buffers=16, output_buffers=2, drain=False)
    run.start()
    run.step([])
    enc.kick(wait=False)
    enc.used_order = []
    kind = getattr(p.Cmd, command)
    body = (p.QUEUE_CMD.pack(kind, 1, p.QueueType.INPUT) if kind != p.Cmd.STREAM_DESTROY
            else p.HDR.pack(kind, 1))
    token = enc.submit(body)
    reply = enc.wait(token)
    assert status_of(reply) == p.Resp.OK_NODATA
    answered = [u.chain.token for u in enc.used_order].index(token)
    inputs_before = {u.chain.token for u in enc.used_order[:answered]} & set(run.in_flight)
    # Every picture came back before the answer: encoded, or with ERR.
    assert inputs_before == set(run.in_flight)
    flags = [p.RESOURCE_QUEUE_RESP.unpack(u.data)[3] for u in enc.used_order
             if u.chain.token in run.in_flight]
    assert p.BufferFlag.ERR in flags
    enc.used_order = None
    if kind == p.Cmd.STREAM_DESTROY:
        return
    # The stream goes on, from a keyframe, once its buffers are back.
    for token in list(run.in_flight):
        enc.done.pop(token, None)
        run.free_inputs.append(run.in_flight.pop(token))
    if kind == p.Cmd.RESOURCE_DESTROY_ALL:
        for rid, entries in run.inputs.items():
            enc.create_resource(1, p.QueueType.INPUT, rid, entries)
    for token in [t for t in enc.done if t in run.out_flight]:
        run.take_output(token, enc.done.pop(token).data)
    run.result.packets.clear()
    run.pictures = run.pictures + raw_pictures(640, 480, 4)
    run.timestamps = run.timestamps + [9_000_000 + i for i in range(4)]
    run.want_drain = True
    enc.run([run])
    assert run.result.drain_status == p.Resp.OK_NODATA
    assert run.result.packets[0].flags == p.BufferFlag.IFRAME


def test_controls_profiles_and_levels(enc):
    def query(control: int, fmt: int) -> list[int]:
        reply = enc.call_ok(p.QUERY_CONTROL.pack(p.Cmd.QUERY_CONTROL, 0, control, fmt))
        count = p.QUERY_CONTROL_RESP.unpack_from(reply)[2]
        return list(p.struct.unpack_from(f"<{count}I", reply, p.QUERY_CONTROL_RESP.size))

    assert query(p.Control.PROFILE, p.Format.H264) == [0x101, 0x100, 0x103]
    assert query(p.Control.PROFILE, p.Format.HEVC) == [0x200]
    assert query(p.Control.PROFILE, p.Format.VP9) == [0x400]
    assert query(p.Control.LEVEL, p.Format.H264) == list(range(0x100, 0x10F))
    enc.create_stream(1, p.Format.H264)

    def get(control: int) -> int:
        reply = enc.call_ok(p.GET_CONTROL.pack(p.Cmd.GET_CONTROL, 1, control))
        return p.GET_CONTROL_RESP.unpack(reply)[2]

    # What the ChromeOS driver reads at open(): all must answer.
    assert [get(c) for c in (p.Control.PROFILE, p.Control.BITRATE, p.Control.BITRATE_PEAK,
                             p.Control.BITRATE_MODE, p.Control.PREPEND_SPSPPS_TO_IDR)] == [
        0x101, 2_000_000, 3_000_000, 0, 0]
    for control, value in ((p.Control.PROFILE, 0x103), (p.Control.LEVEL, 0x10B),
                           (p.Control.BITRATE, 5_000_000), (p.Control.BITRATE_MODE, 1)):
        enc.call_ok(p.SET_CONTROL.pack(p.Cmd.SET_CONTROL, 1, control, value))
        assert get(control) == value


def test_high_profile_and_level_reach_the_bitstream(enc):
    run = encode(enc, p.Format.H264, raw_pictures(320, 240, 5), 320, 240,
                 controls={p.Control.PROFILE: 0x103, p.Control.LEVEL: 0x10B})
    import av

    ctx = av.CodecContext.create("h264", "r")
    for pk in run.result.packets:
        ctx.decode(av.Packet(pk.data))
    assert (ctx.profile, ctx.level) == ("High", 41)


@pytest.mark.parametrize("command,status", [
    (p.SET_CONTROL.pack(p.Cmd.SET_CONTROL, 1, p.Control.BITRATE, 0),
     p.Resp.ERR_INVALID_PARAMETER),
    (p.SET_CONTROL.pack(p.Cmd.SET_CONTROL, 1, p.Control.PROFILE, 0x200),
     p.Resp.ERR_INVALID_PARAMETER),
    (p.SET_CONTROL.pack(p.Cmd.SET_CONTROL, 1, p.Control.BITRATE_MODE, 7),
     p.Resp.ERR_INVALID_PARAMETER),
    (p.SET_CONTROL.pack(p.Cmd.SET_CONTROL, 1, 99, 1), p.Resp.ERR_UNSUPPORTED_CONTROL),
    (p.GET_CONTROL.pack(p.Cmd.GET_CONTROL, 1, 99), p.Resp.ERR_UNSUPPORTED_CONTROL),
    (p.SET_CONTROL.pack(p.Cmd.SET_CONTROL, 7, p.Control.BITRATE, 1),
     p.Resp.ERR_INVALID_STREAM_ID),
    (p.HDR.pack(p.Cmd.SET_PARAMS_EXT, 1) + p.Params(p.QueueType.INPUT, p.Format.NV12, 321,
                                                     240).pack_ext(),
     p.Resp.ERR_INVALID_PARAMETER),
    (p.HDR.pack(p.Cmd.SET_PARAMS_EXT, 1) + p.Params(p.QueueType.INPUT, p.Format.H264, 320,
                                                     240).pack_ext(),
     p.Resp.ERR_INVALID_PARAMETER),
    (p.HDR.pack(p.Cmd.SET_PARAMS_EXT, 1) + p.Params(p.QueueType.OUTPUT, p.Format.MPEG2, 320,
                                                     240).pack_ext(),
     p.Resp.ERR_INVALID_PARAMETER),
    (p.STREAM_CREATE.pack(p.Cmd.STREAM_CREATE, 2, 0, 0, p.Format.MPEG4, 0, b""),
     p.Resp.ERR_INVALID_PARAMETER),
    (p.HDR.pack(p.Cmd.SET_CONTROL, 1), p.Resp.ERR_INVALID_PARAMETER),
    (p.SET_CONTROL_HEAD.pack(p.Cmd.SET_CONTROL, 1, p.Control.BITRATE),
     p.Resp.ERR_INVALID_PARAMETER),
])
def test_malformed_commands_get_protocol_errors(enc, command, status):
    enc.create_stream(1, p.Format.H264)
    assert status_of(enc.call(command)) == status
    # The stream still encodes.
    run = encode(enc, p.Format.H264, raw_pictures(160, 96, 4), 160, 96, sid=3)
    assert len(run.result.packets) == 4


def test_an_input_buffer_smaller_than_the_picture_is_refused(enc):
    enc.create_stream(1, p.Format.H264)
    enc.create_resource(1, p.QueueType.INPUT, 0, enc.alloc_entries(4096, 1))
    reply = enc.wait(enc.queue(1, p.QueueType.INPUT, 0, 0))
    assert status_of(reply) == p.Resp.ERR_INVALID_PARAMETER


def test_a_packet_too_big_for_its_buffer_gets_err_and_the_stream_recovers(enc):
    """A grainy first picture in 12 KiB buffers: its keyframe cannot fit and
    comes back ERR; the packets that refer to it are dropped and the next
    picture encoded is made a keyframe, so what follows decodes."""
    pictures = raw_pictures(320, 240, 1, noise=60) + raw_pictures(320, 240, 9)[1:]
    run = encode(enc, p.Format.H264, pictures, 320, 240, output_size=12 << 10,
                 controls={p.Control.BITRATE: 500_000})
    r = run.result
    assert r.output_errors == 1 and r.drain_status == p.Resp.OK_NODATA
    kept = len(r.packets)
    assert 4 <= kept <= 8
    assert [pk.timestamp for pk in r.packets] == run.timestamps[-kept:]
    assert r.packets[0].flags == p.BufferFlag.IFRAME
    from tests.encoder_client import decode_packets

    assert len(decode_packets(p.Format.H264, [pk.data for pk in r.packets])) == kept


@with_and_without_ring_features
@pytest.mark.parametrize("transport", ["mmio"])
def test_encoding_on_virtio_mmio(transport, ring):
    m, client = encoder_machine(transport, ring)
    try:
        run = encode(client, p.Format.VP8, raw_pictures(160, 96, 10), 160, 96)
        assert len(run.result.packets) == 10
        assert min(run.psnr()) >= 35
    finally:
        m.stop()


def test_a_bad_encoder_config_stops_qemu_with_one_line(tmp_path):
    from tests.hostdriver import Machine, QemuExited

    cfg = tmp_path / "enc.toml"
    cfg.write_text('[backend.encoders.h264]\ncodec = "libnope"\n')
    with pytest.raises(QemuExited) as exc:
        Machine.x86(["-device", f"virtio-video-py-pci,role=encoder,config={cfg}"]).start()
    lines = [line for line in exc.value.stderr.splitlines() if "libnope" in line]
    assert len(lines) == 1 and "this FFmpeg has no encoder libnope" in lines[0]
    assert "Traceback" not in exc.value.stderr


def capabilities(client: VideoClient, queue_type: int) -> list[tuple[int, int, list[tuple]]]:
    """(format, mask, [(width range, height range, rates)]) of each descriptor."""
    reply = client.call_ok(p.QUERY_CAPABILITY.pack(p.Cmd.QUERY_CAPABILITY, 0, queue_type),
                           resp_size=4096)
    count, offset, out = p.CAPABILITY_RESP.unpack_from(reply)[2], p.CAPABILITY_RESP.size, []
    for _ in range(count):
        mask, fmt, _, _, frames = p.FORMAT_DESC.unpack_from(reply, offset)
        offset += p.FORMAT_DESC.size
        ranges = []
        for _ in range(frames):
            wmin, wmax, wstep, hmin, hmax, hstep, rates = p.FORMAT_FRAME.unpack_from(reply,
                                                                                   offset)
            offset += p.FORMAT_FRAME.size
            rate = p.FORMAT_RANGE.unpack_from(reply, offset)
            offset += rates * p.FORMAT_RANGE.size
            ranges.append(((wmin, wmax, wstep), (hmin, hmax, hstep), rate))
        out.append((fmt, mask, ranges))
    return out


def test_capabilities_raw_in_coded_out(enc):
    raw = capabilities(enc, p.QueueType.INPUT)
    coded = capabilities(enc, p.QueueType.OUTPUT)
    assert [(fmt, mask) for fmt, mask, _ in raw] == [(p.Format.NV12, 0b1111),
                                                    (p.Format.YUV420, 0b1111)]
    assert [(fmt, mask) for fmt, mask, _ in coded] == [
        (p.Format.H264, 0b11), (p.Format.HEVC, 0b11), (p.Format.VP8, 0b11),
        (p.Format.VP9, 0b11)]
    for _, _, ranges in raw + coded:
        assert ranges == [((16, 4096, 2), (16, 4096, 2), (1, 120, 1))]


def test_the_driver_s_wider_strides_are_kept_and_read(enc):
    """SET_PARAMS(INPUT) with padded rows: GET_PARAMS gives them back and the
    pictures are read at that stride, from scattered pages."""
    planes = [(384 * 256, 384), (384 * 128, 384)]
    run = encode(enc, p.Format.H264, raw_pictures(320, 240, 6), 320, 240, sg_chunks=3,
                 input_planes=planes)
    assert run.in_params.plane_formats == planes
    assert (run.out_params.frame_width, run.out_params.frame_height) == (320, 240)
    assert min(run.psnr()) >= 35


def test_an_engine_error_is_an_error_event_and_other_streams_go_on():
    m = start("pci", "virtio-video-py",
              "role=encoder,backend=tests.models:EncoderFailingAtPicture3", mem_mb=256)
    try:
        dev = m.find_virtio(p.ENCODER_DEVICE_ID)
        dev.initialize(want_features=0b11)
        client = VideoClient(m, dev)
        failing = EncodeRun(client, 1, p.Format.VP8, raw_pictures(160, 96, 12), 160, 96)
        healthy = EncodeRun(client, 2, p.Format.H264, raw_pictures(160, 96, 12), 160, 96)
        client.run([failing, healthy])
        assert (p.EventType.ERROR, 1) in failing.result.events
        assert failing.result.drain_status == p.Resp.ERR_INVALID_OPERATION
        assert p.BufferFlag.ERR in failing.result.input_flags
        assert len(failing.result.packets) == 3
        assert healthy.result.drain_status == p.Resp.OK_NODATA
        assert min(healthy.psnr()) >= 35
        assert "encoder fell over" in m.stderr()
    finally:
        m.stop()


def test_the_encoders_share_a_documented_pixel_budget(tmp_path):
    """[video] max_encode_pixels bounds what the encoders' own pictures take:
    a stream beyond it gets ERR_OUT_OF_MEMORY for its picture, and the area
    comes back when a stream is destroyed."""
    cfg = tmp_path / "enc.toml"
    cfg.write_text(f"[video]\nmax_encode_pixels = {2 * 320 * 240}\n")
    m = start("pci", "virtio-video-py", f"role=encoder,config={cfg}", mem_mb=256)
    try:
        dev = m.find_virtio(p.ENCODER_DEVICE_ID)
        dev.initialize(want_features=0b11)
        client = VideoClient(m, dev)
        runs = [EncodeRun(client, sid, p.Format.VP8, raw_pictures(320, 240, 2), 320, 240,
                          drain=False) for sid in (1, 2, 3)]
        for run in runs:
            run.start()
        tokens = [client.queue(run.sid, p.QueueType.INPUT, 0, 7) for run in runs]
        replies = [p.RESOURCE_QUEUE_RESP.unpack(client.wait(t)) for t in tokens]
        assert [r[0] for r in replies] == [p.Resp.OK_RESOURCE_QUEUE] * 2 + [
            p.Resp.ERR_OUT_OF_MEMORY]
        # The whole response, flag ERR: the ChromeOS driver reads only the flags.
        assert replies[2][2:] == (7, p.BufferFlag.ERR, 0)
        client.call_ok(p.HDR.pack(p.Cmd.STREAM_DESTROY, 1))
        token = client.queue(3, p.QueueType.INPUT, 0, 0)
        assert status_of(client.wait(token)) == p.Resp.OK_RESOURCE_QUEUE
    finally:
        m.stop()


def test_a_frame_rate_change_midway_takes_effect(enc):
    """CBR spends bitrate / frame rate per picture: at half the rate, each
    picture gets twice the bits, from the picture queued after the change,
    a keyframe."""
    pictures = raw_pictures(320, 240, 60, noise=12)

    def slower(r: EncodeRun) -> None:
        params = r.c.get_params(r.sid, p.QueueType.INPUT)
        params.frame_rate = 15
        r.c.set_params(r.sid, params)
        rates.append(r.c.get_params(r.sid, p.QueueType.OUTPUT).frame_rate)

    rates: list[int] = []
    run = encode(enc, p.Format.H264, pictures, 320, 240, before={30: slower},
                 controls={p.Control.BITRATE: 300_000, p.Control.BITRATE_MODE: 1})
    packets = run.result.packets
    assert packets[30].flags == p.BufferFlag.IFRAME
    assert rates == [15]                    # both queues follow
    before = sum(len(pk.data) for pk in packets[1:30]) / 29
    after = sum(len(pk.data) for pk in packets[31:60]) / 29
    assert after / before == pytest.approx(2.0, rel=0.25)


def test_resets_while_streams_run_crash_nothing_and_leak_nothing():
    """Issue 15: reset loops with streams running.  300 cycles of a decoder
    and an encoder each mid-stream, then a device reset (the driver
    re-initializing): QEMU lives, logs nothing, and its memory is flat
    (guest RAM preallocated, so RSS is QEMU's own)."""
    from tests.hostdriver import Machine
    from tests.streams import encode as encode_clip
    from tests.video_client import StreamRun

    clip = [(data, i) for i, (data, _) in enumerate(encode_clip("h264", 160, 96, 12))]
    pictures = raw_pictures(160, 96, 8)
    m = Machine.x86(["-device", "virtio-video-py-pci",
                     "-device", "virtio-video-py-pci,role=encoder"],
                    mem_mb=256, prealloc=True, count_interrupts=False).start()

    def rss_mb() -> float:
        with open(f"/proc/{m.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    try:
        devices = {d.device_id: d for d in m.virtio_devices()}
        sizes = []
        for cycle in range(300):
            runs = []
            for device_id in (p.DECODER_DEVICE_ID, p.ENCODER_DEVICE_ID):
                dev = devices[device_id]
                dev.initialize(want_features=0b11)      # resets what ran before
                client = VideoClient(m, dev)
                run = (StreamRun(client, 1, p.Format.H264, clip)
                       if device_id == p.DECODER_DEVICE_ID
                       else EncodeRun(client, 1, p.Format.H264, pictures, 160, 96))
                run.start()
                run.step([])
                client.kick(wait=False)
                runs.append(run)
            for run in runs:                            # the buffers go back
                for entries in [*run.inputs.values(), *run.outputs.values()]:
                    for addr, _ in entries:
                        m.alloc.free(addr)
            if cycle in (100, 299):
                sizes.append(rss_mb())
        assert m.alive()
        assert m.stderr().strip() == ""
        assert sizes[1] - sizes[0] < 2, sizes
    finally:
        m.stop()
