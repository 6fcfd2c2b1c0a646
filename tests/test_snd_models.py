"""Pure-Python tier for virtio-snd: protocol, state machine, pacing, controls,
events, backends.  The WAV and null backends are real; no QEMU."""

from __future__ import annotations

import struct
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from pyemb.config import ConfigError
from pyemb.snd import protocol as p
from pyemb.snd.controls import VOLUME_MAX, volume_gain
from pyemb.snd.device import SoundDevice
from pyemb.snd.pcm import SAMPLE_FORMATS, scale
from pyemb.snd.stream import HOOK_TIMEOUT_S
from pyemb.snd_backend import BackendError, SndBackend, read_wav
from tests.fakes import FakeHandle, FakeRequest

RATE = 48000
PERIOD_FRAMES = 240                      # 5 ms
S16 = p.FORMAT_INDEX["S16"]


def status(reply: bytes) -> int:
    return struct.unpack_from("<I", reply)[0]


class Card:
    """A SoundDevice driven like the Linux driver drives it."""

    def __init__(self, tmp_path: Path, streams: list[dict] | None = None,
                 jacks: list[dict] | None = None, ctls: bool = True) -> None:
        self.tmp = tmp_path
        streams = streams or [
            {"direction": "output", "formats": ["S16", "S24_3", "U8", "FLOAT"],
             "rates": [44100, 48000],
             "backend": {"name": "wav", "path": str(tmp_path / "out-{stream}-{n}.wav")}},
            {"direction": "input", "formats": ["S16"], "rates": [48000],
             "backend": {"name": "wav", "tone": 1000}},
        ]
        self.model = SoundDevice(FakeHandle(), {"snd": {"streams": streams,
                                                         "jacks": jacks or []}})
        self.model.set_features(1 << p.F_CTLS if ctls else 0)

    def control(self, command: bytes, reply: int = 4) -> bytes:
        req = FakeRequest([command], [reply])
        self.model.handle_request(p.CONTROL_QUEUE, req)
        assert req.done
        return req.reply

    def op(self, code: p.Code, sid: int = 0) -> int:
        return status(self.control(p.PCM_HDR.pack(code, sid)))

    def set_params(self, sid: int = 0, channels: int = 2, fmt: int = S16, rate: int = RATE,
                   period: int | None = None, periods: int = 4, features: int = 0) -> int:
        name = p.FORMATS[fmt] if fmt < len(p.FORMATS) else "S16"
        frame = SAMPLE_FORMATS[name].width * channels if name in SAMPLE_FORMATS else 1
        period = period or PERIOD_FRAMES * frame
        cmd = p.SetParams(sid, period * periods, period, features, channels, fmt,
                          p.RATE_INDEX[rate]).pack()
        return status(self.control(cmd))

    def tx(self, data: bytes, sid: int = 0) -> FakeRequest:
        req = FakeRequest([struct.pack("<I", sid), data], [8], queue=p.TX_QUEUE)
        self.model.handle_request(p.TX_QUEUE, req)
        return req

    def rx(self, nbytes: int, sid: int = 1) -> FakeRequest:
        req = FakeRequest([struct.pack("<I", sid)], [nbytes, 8], queue=p.RX_QUEUE)
        self.model.handle_request(p.RX_QUEUE, req)
        return req

    def event(self) -> FakeRequest:
        req = FakeRequest([], [8], queue=p.EVENT_QUEUE)
        self.model.handle_request(p.EVENT_QUEUE, req)
        return req


def wait_done(reqs: list[FakeRequest], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(r.done for r in reqs):
        assert time.monotonic() < deadline, f"{sum(not r.done for r in reqs)} not completed"
        time.sleep(0.001)


def signal(nbytes: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


@pytest.fixture
def card(tmp_path):
    c = Card(tmp_path)
    yield c
    c.model.close()


# -- config space and queries ----------------------------------------------------
def test_config_space_counts_jacks_streams_chmaps_controls(tmp_path):
    c = Card(tmp_path, jacks=[{"device": "headphone"}, {"device": "mic"}])
    # default chmaps for [1, 2] channels: mono and stereo, per stream
    assert p.CONFIG.unpack(c.model.read_config()) == (2, 2, 4, 4)
    assert c.model.features == 1 << p.F_CTLS


def test_pcm_info_encodes_each_stream():
    cfg = {"snd": {"streams": [
        {"direction": "output", "channels": [2, 8], "formats": ["S16", "FLOAT"],
         "rates": [8000, 192000], "backend": "null"},
        {"direction": "input", "channels": [1, 1], "formats": ["U8"], "rates": [44100],
         "backend": "null", "nid": 3},
    ]}}
    c = SoundDevice(FakeHandle(), cfg)
    req = FakeRequest([p.QUERY_INFO.pack(p.Code.PCM_INFO, 0, 2, p.PCM_INFO.size)], [4 + 64])
    c.handle_request(0, req)
    reply = req.reply
    assert status(reply) == p.Status.OK
    out, inp = p.PcmInfo.unpack(reply[4:36]), p.PcmInfo.unpack(reply[36:68])
    assert (out.channels_min, out.channels_max) == (2, 8)
    assert out.formats == (1 << p.FORMAT_INDEX["S16"]) | (1 << p.FORMAT_INDEX["FLOAT"])
    assert out.rates == (1 << p.RATE_INDEX[8000]) | (1 << p.RATE_INDEX[192000])
    assert out.features >> p.PcmFeature.EVT_XRUNS & 1
    assert inp.direction == p.Direction.INPUT and inp.formats == 1 << p.FORMAT_INDEX["U8"]
    assert inp.hda_fn_nid == 3


def test_chmaps_follow_channel_ranges():
    cfg = {"snd": {"streams": [
        {"direction": "output", "channels": [1, 8], "backend": "null"},
        {"direction": "input", "channels": [2, 2], "backend": "null", "chmaps": [["FC", "LFE"]]},
    ]}}
    c = SoundDevice(FakeHandle(), cfg)
    req = FakeRequest([p.QUERY_INFO.pack(p.Code.CHMAP_INFO, 0, 5, 24)], [4 + 5 * 24])
    c.handle_request(0, req)
    maps = [p.CHMAP_INFO.unpack_from(req.reply, 4 + 24 * i) for i in range(5)]
    names = [[p.CHMAP_POSITIONS[x] for x in pos[:ch]] for _, _, ch, pos in maps]
    assert names == [["MONO"], ["FL", "FR"], ["FL", "FR", "RL", "RR", "FC", "LFE"],
                     ["FL", "FR", "RL", "RR", "FC", "LFE", "SL", "SR"], ["FC", "LFE"]]
    assert [m[1] for m in maps] == [0, 0, 0, 0, 1]


def test_jack_info_and_remap(tmp_path):
    c = Card(tmp_path, jacks=[{"device": "headphone"},
                              {"device": "mic", "connected": False, "remap": True}])
    reply = c.control(p.QUERY_INFO.pack(p.Code.JACK_INFO, 0, 2, 24), 4 + 48)
    hp = p.JACK_INFO.unpack_from(reply, 4)
    mic = p.JACK_INFO.unpack_from(reply, 28)
    assert hp[2] >> 20 & 0xF == 0x2 and hp[4] == 1 and hp[1] == 0
    assert mic[2] >> 20 & 0xF == 0xA and mic[4] == 0 and mic[1] == 1 << p.JACK_F_REMAP
    assert status(c.control(p.JACK_REMAP.pack(p.Code.JACK_REMAP, 1, 2, 3))) == p.Status.OK
    assert c.model.jack_remaps == {1: (2, 3)}
    assert status(c.control(p.JACK_REMAP.pack(p.Code.JACK_REMAP, 0, 2, 3))) == p.Status.NOT_SUPP
    assert status(c.control(p.JACK_REMAP.pack(p.Code.JACK_REMAP, 5, 2, 3))) == p.Status.BAD_MSG


def test_jack_events_reach_posted_buffers_or_wait_for_one(tmp_path):
    c = Card(tmp_path, jacks=[{"device": "headphone"}])
    c.model.set_jack(0, False)                    # no buffer yet: kept
    ev = c.event()
    assert ev.done and p.EVENT.unpack(ev.reply) == (p.Event.JACK_DISCONNECTED, 0)
    ev = c.event()
    assert not ev.done
    c.model.set_jack(0, True)
    assert ev.done and p.EVENT.unpack(ev.reply) == (p.Event.JACK_CONNECTED, 0)
    reply = c.control(p.QUERY_INFO.pack(p.Code.JACK_INFO, 0, 1, 24), 28)
    assert p.JACK_INFO.unpack_from(reply, 4)[4] == 1


@pytest.mark.parametrize("command,reply_size", [
    (p.QUERY_INFO.pack(p.Code.PCM_INFO, 1, 2, 32), 68),      # past the last stream
    (p.QUERY_INFO.pack(p.Code.PCM_INFO, 0, 1, 16), 68),      # wrong item size
    (p.QUERY_INFO.pack(p.Code.PCM_INFO, 0, 2, 32), 36),      # reply buffer too small
    (p.QUERY_INFO.pack(p.Code.PCM_INFO, 0, 2, 32) + b"\0", 68),   # oversized
    (p.QUERY_INFO.pack(p.Code.JACK_INFO, 0, 1, 24), 68),     # no jacks
    (b"\x00\x01", 68),                                       # short
    (struct.pack("<I", 0x7777), 68),                         # unknown code
    (p.PCM_HDR.pack(p.Code.PCM_PREPARE, 9), 4),              # unknown stream
    (p.PCM_HDR.pack(p.Code.PCM_START, 0) + b"\0", 4),        # oversized
    (p.CTL_HDR.pack(p.Code.CTL_READ, 99), 516),              # unknown control
    (p.JACK_REMAP.pack(p.Code.JACK_REMAP, 0, 0, 0)[:12], 4),  # short remap
])
def test_malformed_control_gets_bad_msg(card, command, reply_size):
    assert status(card.control(command, reply_size)) == p.Status.BAD_MSG
    # and the device keeps serving
    assert status(card.control(p.QUERY_INFO.pack(p.Code.PCM_INFO, 0, 2, 32), 68)) == p.Status.OK


@pytest.mark.parametrize("queue", [p.CONTROL_QUEUE, p.TX_QUEUE])
def test_a_request_naming_a_huge_buffer_is_read_only_as_far_as_a_command_goes(card, queue):
    """QEMU's generic-fuzz held QEMU's main loop for over a minute with a control
    request whose descriptors named hundreds of MB: the whole readable part was
    copied to parse a command of at most 521 bytes.  Now only that much is
    read (a tx message's 4-byte header likewise)."""
    import mmap
    import tracemalloc
    huge = mmap.mmap(-1, 256 << 20)         # untouched: no memory until read
    head = p.QUERY_INFO.pack(p.Code.PCM_INFO, 0, 2, 32) if queue == p.CONTROL_QUEUE \
        else b"\0\0"                       # half a tx header, the rest in the huge part
    req = FakeRequest([head], [4, 8], queue=queue)
    req.readable = (memoryview(head), memoryview(huge).toreadonly())
    req.readable_size = len(head) + len(huge)
    tracemalloc.start()
    try:
        card.model.handle_request(queue, req)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    req.readable = ()
    huge.close()
    assert peak < 1 << 20, f"{peak >> 20} MiB copied"
    assert req.done         # PCM_INFO of the wrong size, a tx message on an idle stream
    if queue == p.CONTROL_QUEUE:
        assert status(req.reply) == p.Status.BAD_MSG


def test_control_elements_need_the_feature(tmp_path):
    c = Card(tmp_path, ctls=False)
    assert status(c.control(p.CTL_HDR.pack(p.Code.CTL_READ, 0), 516)) == p.Status.NOT_SUPP


# -- the state machine -----------------------------------------------------------------
@pytest.mark.parametrize("sequence,failing", [
    (["prepare"], "prepare"),                           # no parameters yet
    (["set_params", "start"], "start"),                 # not prepared
    (["set_params", "stop"], "stop"),
    (["set_params", "release"], "release"),
    (["set_params", "prepare", "stop"], "stop"),        # not running
    (["set_params", "prepare", "start", "start"], "start"),
    (["set_params", "prepare", "start", "release"], "release"),   # must stop first
    (["set_params", "prepare", "start", "set_params"], "set_params"),
    (["set_params", "prepare", "start", "prepare"], "prepare"),
])
def test_state_machine_refuses_out_of_order_requests(card, sequence, failing):
    codes = {"prepare": p.Code.PCM_PREPARE, "start": p.Code.PCM_START,
             "stop": p.Code.PCM_STOP, "release": p.Code.PCM_RELEASE}
    for i, step in enumerate(sequence):
        result = card.set_params() if step == "set_params" else card.op(codes[step])
        last = i == len(sequence) - 1
        assert result == (p.Status.BAD_MSG if last else p.Status.OK), step
    before = card.model.streams[0].state
    assert failing == sequence[-1] and card.model.streams[0].state == before


def test_full_cycle_and_restart(card):
    for _ in range(2):
        assert card.set_params() == p.Status.OK
        assert card.op(p.Code.PCM_PREPARE) == p.Status.OK
        assert card.op(p.Code.PCM_PREPARE) == p.Status.OK        # again is fine
        assert card.op(p.Code.PCM_START) == p.Status.OK
        assert card.op(p.Code.PCM_STOP) == p.Status.OK
        assert card.op(p.Code.PCM_START) == p.Status.OK          # resume
        assert card.op(p.Code.PCM_STOP) == p.Status.OK
        assert card.op(p.Code.PCM_RELEASE) == p.Status.OK


@pytest.mark.parametrize("kwargs,expected", [
    ({"channels": 3}, p.Status.NOT_SUPP),
    ({"fmt": p.FORMAT_INDEX["S32"]}, p.Status.NOT_SUPP),
    ({"fmt": 99}, p.Status.NOT_SUPP),
    ({"rate": 8000}, p.Status.NOT_SUPP),
    ({"features": 1 << p.PcmFeature.SHMEM_HOST}, p.Status.NOT_SUPP),
    ({"period": 3}, p.Status.BAD_MSG),                 # not whole frames
    ({"period": 960, "periods": 0}, p.Status.BAD_MSG),  # buffer smaller than a period
])
def test_set_params_checks_every_field(card, kwargs, expected):
    assert card.set_params(**kwargs) == expected
    assert card.model.streams[0].params is None


# -- playback --------------------------------------------------------------------------
def play(card: Card, data: bytes, period: int, **kwargs) -> list[FakeRequest]:
    assert card.set_params(period=period, **kwargs) == p.Status.OK
    assert card.op(p.Code.PCM_PREPARE) == p.Status.OK
    reqs = [card.tx(data[i:i + period]) for i in range(0, len(data), period)]
    assert card.op(p.Code.PCM_START) == p.Status.OK
    return reqs


def test_playback_reaches_the_wav_file_bit_exact(card, tmp_path):
    period = PERIOD_FRAMES * 4
    data = signal(period * 6)
    reqs = play(card, data, period)
    wait_done(reqs)
    assert all(p.PCM_STATUS.unpack(r.reply)[0] == p.Status.OK for r in reqs)
    assert card.op(p.Code.PCM_STOP) == p.Status.OK
    assert card.op(p.Code.PCM_RELEASE) == p.Status.OK
    card.model.streams[0]._thread.join(2)
    wav = read_wav(tmp_path / "out-0-1.wav")
    assert (wav.channels, wav.rate, wav.format) == (2, RATE, "S16")
    assert wav.data == data


def test_playback_is_paced_at_the_stream_rate(card):
    period = PERIOD_FRAMES * 4                         # 5 ms
    reqs = play(card, signal(period * 20), period)
    stream = card.model.streams[0]
    t0 = stream.started_at
    wait_done(reqs)
    done = [r for r in reqs]
    # message k is handed over at START + k periods: the last one 95 ms later
    assert time.monotonic() - t0 >= 0.095 - 0.002
    assert len(done) == 20


def test_latency_reports_what_is_queued(card):
    period = PERIOD_FRAMES * 4
    reqs = play(card, signal(period * 4), period)
    wait_done(reqs)
    latencies = [p.PCM_STATUS.unpack(r.reply)[1] for r in reqs]
    # the first completes with the other three queued plus itself being played
    assert latencies[0] == 4 * period
    assert latencies[-1] == period


def test_nothing_is_lost_at_stop(card, tmp_path):
    period = PERIOD_FRAMES * 4
    data = signal(period * 8, seed=7)
    reqs = play(card, data, period)
    assert card.op(p.Code.PCM_STOP) == p.Status.OK      # at once: most still queued
    wait_done(reqs)
    assert card.op(p.Code.PCM_RELEASE) == p.Status.OK
    card.model.streams[0]._thread.join(2)
    assert read_wav(tmp_path / "out-0-1.wav").data == data


@pytest.mark.parametrize("fmt,channels,rate", [("S24_3", 2, 44100), ("U8", 1, 48000),
                                               ("FLOAT", 2, 48000)])
def test_other_formats_and_rates_are_written_as_sent(card, tmp_path, fmt, channels, rate):
    frame = SAMPLE_FORMATS[fmt].width * channels
    period = 441 * frame if rate == 44100 else PERIOD_FRAMES * frame
    data = signal(period * 3, seed=3)
    reqs = play(card, data, period, fmt=p.FORMAT_INDEX[fmt], channels=channels, rate=rate)
    wait_done(reqs)
    card.op(p.Code.PCM_STOP)
    card.op(p.Code.PCM_RELEASE)
    card.model.streams[0]._thread.join(2)
    wav = read_wav(tmp_path / "out-0-1.wav")
    assert (wav.rate, wav.channels, wav.data) == (rate, channels, data)


@pytest.mark.parametrize("build", [
    lambda sid: [struct.pack("<I", sid)],                         # no frames
    lambda sid: [struct.pack("<I", sid), bytes(3)],               # not whole frames
    lambda sid: [struct.pack("<I", sid), bytes(1 << 20)],         # bigger than the buffer
    lambda sid: [struct.pack("<I", 1), bytes(960)],               # a capture stream
    lambda sid: [struct.pack("<I", 7), bytes(960)],               # no such stream
    lambda sid: [b"\0\0"],                                        # short header
])
def test_malformed_tx_gets_bad_msg_and_changes_nothing(card, build):
    card.set_params()
    card.op(p.Code.PCM_PREPARE)
    req = FakeRequest(build(0), [8], queue=p.TX_QUEUE)
    card.model.handle_request(p.TX_QUEUE, req)
    assert req.done and p.PCM_STATUS.unpack(req.reply)[0] == p.Status.BAD_MSG
    assert card.model.streams[0].frames_total == 0
    good = card.tx(bytes(960))
    card.op(p.Code.PCM_START)
    wait_done([good])
    assert p.PCM_STATUS.unpack(good.reply)[0] == p.Status.OK


def test_tx_before_prepare_gets_bad_msg(card):
    req = card.tx(bytes(960))
    assert req.done and p.PCM_STATUS.unpack(req.reply)[0] == p.Status.BAD_MSG


def test_status_tail_too_small_gets_bad_msg_without_crash(card):
    card.set_params()
    card.op(p.Code.PCM_PREPARE)
    req = FakeRequest([struct.pack("<I", 0), bytes(960)], [4], queue=p.TX_QUEUE)
    card.model.handle_request(p.TX_QUEUE, req)
    assert req.done


def test_scattered_payload_is_gathered(card, tmp_path):
    card.set_params()
    card.op(p.Code.PCM_PREPARE)
    data = signal(960)
    req = FakeRequest([struct.pack("<I", 0) + data[:100], data[100:500], data[500:]], [8],
                      queue=p.TX_QUEUE)
    card.model.handle_request(p.TX_QUEUE, req)
    card.op(p.Code.PCM_START)
    wait_done([req])
    card.op(p.Code.PCM_STOP)
    card.op(p.Code.PCM_RELEASE)
    card.model.streams[0]._thread.join(2)
    assert read_wav(tmp_path / "out-0-1.wav").data == data


def test_reset_drops_queued_messages_and_stops_threads(card):
    card.set_params()
    card.op(p.Code.PCM_PREPARE)
    reqs = [card.tx(bytes(960)) for _ in range(4)]
    thread = card.model.streams[0]._thread
    card.model.reset()
    assert not any(r.done for r in reqs)              # QEMU drops them
    assert thread is not None and not thread.is_alive()
    assert card.model.streams[0].state.value == "idle"


def test_set_params_hands_back_what_a_prepared_stream_held(card):
    """Messages queued on a PREPARED stream wait for START; a SET_PARAMS
    then (allowed from PREPARED) leaves them to the old parameters, and
    neither STOP nor RELEASE is allowed from SET_PARAMS: they come back at
    once with IO_ERR instead of being held until a reset (the protocol
    fuzzer found capture buffers held so, tests/fuzz-corpus/protocol/)."""
    assert card.set_params(sid=1) == p.Status.OK
    assert card.op(p.Code.PCM_PREPARE, 1) == p.Status.OK
    assert card.set_params(sid=0) == p.Status.OK
    assert card.op(p.Code.PCM_PREPARE, 0) == p.Status.OK
    held = [card.rx(960) for _ in range(3)] + [card.tx(bytes(960)) for _ in range(2)]
    time.sleep(0.05)
    assert not any(r.done for r in held)                # PREPARED: they wait for START
    assert card.set_params(sid=1) == p.Status.OK
    assert card.set_params(sid=0, periods=2) == p.Status.OK
    assert all(r.done for r in held)
    for r in held:
        assert r.written == r.writable_size
        assert struct.unpack_from("<I", r.reply, len(r.reply) - 8)[0] == p.Status.IO_ERR
    # The streams go on with the new parameters.
    assert card.op(p.Code.PCM_PREPARE, 0) == p.Status.OK
    assert card.op(p.Code.PCM_START, 0) == p.Status.OK
    reqs = [card.tx(bytes(960))]
    wait_done(reqs)
    assert struct.unpack_from("<I", reqs[0].reply)[0] == p.Status.OK


class GatedBackend(SndBackend):
    """write() waits at a gate the test opens; it fails (as a dead view of
    guest memory would make it) if the frames' view was released meanwhile."""

    takes_fragments = True
    gate = threading.Event()
    entered = threading.Event()
    failures: list[str] = []

    def write(self, frames):
        GatedBackend.entered.set()
        assert GatedBackend.gate.wait(5)
        try:
            bytes(frames)
        except ValueError as e:
            GatedBackend.failures.append(str(e))
            raise


def test_set_params_leaves_the_message_the_thread_plays_out_to_it(tmp_path, monkeypatch):
    """After RELEASE the thread plays the queued messages out; SET_PARAMS
    waits RELEASE_JOIN_S for it, then hands back what is still queued.  It
    handed back the message the thread was writing too, under its feet (the
    protocol fuzzer's stale-view oracle, once in a while on a loaded host):
    that one is the thread's to complete."""
    from pyemb.snd import stream
    monkeypatch.setattr(stream, "RELEASE_JOIN_S", 0.05)
    GatedBackend.gate.clear()
    GatedBackend.entered.clear()
    GatedBackend.failures.clear()
    card = Card(tmp_path, streams=[{"direction": "output", "formats": ["S16"], "rates": [48000],
                                    "backend": "tests.test_snd_models:GatedBackend"}])
    try:
        assert card.set_params() == p.Status.OK
        assert card.op(p.Code.PCM_PREPARE) == p.Status.OK
        first, second = card.tx(bytes(960)), card.tx(bytes(960))
        assert card.op(p.Code.PCM_RELEASE) == p.Status.OK
        assert GatedBackend.entered.wait(5)              # the thread is in write(first)
        assert card.set_params() == p.Status.OK          # the join times out
        assert second.done and status(second.reply) == p.Status.IO_ERR
        assert not first.done, "completed under the thread's write"
        GatedBackend.gate.set()
        wait_done([first])
        assert status(first.reply) == p.Status.OK
        assert not GatedBackend.failures
    finally:
        GatedBackend.gate.set()
        card.model.close()


def test_a_queued_message_is_the_only_holder_of_its_views(card, monkeypatch):
    """Once a message is queued, the pacing thread may complete it at once,
    and completing kills its views: queue_message kept its own references
    to them (the payload list, the status slice) until it returned, so a
    thread that won the race completed a request whose views were still
    alive (the protocol fuzzer's stale-view oracle, once in 2 million
    inputs).  The thread drops the message's views before completing: then
    nothing else may hold them."""
    assert card.set_params() == p.Status.OK
    assert card.op(p.Code.PCM_PREPARE) == p.Status.OK
    stream = card.model.streams[0]
    notify = stream._cond.notify_all
    kept: list[bool] = []

    def thread_wins_the_race() -> None:
        notify()
        msg = stream._queue[-1]
        msg.payload = []                        # what _transfer does first
        for view in msg.request.readable + msg.request.writable:
            view.release()                      # the request's own views
        alive = False
        for buf in msg.request._out + msg.request._in:
            try:
                buf.append(0)                   # refused while any slice is alive
                buf.pop()
            except BufferError:
                alive = True
        kept.append(alive)

    monkeypatch.setattr(stream._cond, "notify_all", thread_wins_the_race)
    # Header and frames in one buffer, status after frames in one: both sliced.
    request = FakeRequest([struct.pack("<I", 0) + bytes(960)], [8], queue=p.TX_QUEUE)
    card.model.handle_request(p.TX_QUEUE, request)
    monkeypatch.undo()
    stream._queue.clear()
    assert kept == [False], "queue_message still held views of the queued message"


# -- capture -------------------------------------------------------------------------------
def test_capture_of_a_wav_file_is_bit_exact_and_paced(tmp_path):
    source = signal(PERIOD_FRAMES * 4 * 5, seed=9)
    src_path = tmp_path / "in.wav"
    from pyemb.snd_backend import StreamParams, wav_header
    params = StreamParams(0, "input", 2, "S16", RATE, 0, 0)
    src_path.write_bytes(wav_header(params, len(source)) + source)
    c = Card(tmp_path, streams=[{"direction": "input", "formats": ["S16"], "rates": [RATE],
                                 "backend": {"name": "wav", "path": str(src_path)}}])
    period = PERIOD_FRAMES * 4
    assert c.set_params(sid=0, period=period) == p.Status.OK
    assert c.op(p.Code.PCM_PREPARE) == p.Status.OK
    reqs = [c.rx(period, sid=0) for _ in range(6)]
    assert c.op(p.Code.PCM_START) == p.Status.OK
    t0 = c.model.streams[0].started_at
    wait_done(reqs)
    # the last of six 5 ms periods cannot be complete before 30 ms of audio
    assert time.monotonic() - t0 >= 0.030 - 0.002
    got = b"".join(r.reply[:period] for r in reqs)
    assert got[:len(source)] == source
    assert got[len(source):] == bytes(period)          # silence after the file ends
    assert all(p.PCM_STATUS.unpack(r.reply[period:])[0] == p.Status.OK for r in reqs)
    c.model.close()


def test_capture_stop_completes_pending_messages(card):
    card.set_params(sid=1)
    card.op(p.Code.PCM_PREPARE, 1)
    reqs = [card.rx(960) for _ in range(8)]
    card.op(p.Code.PCM_START, 1)
    card.op(p.Code.PCM_STOP, 1)
    wait_done(reqs)
    assert card.op(p.Code.PCM_RELEASE, 1) == p.Status.OK


def test_tone_capture_is_a_sine(card):
    card.set_params(sid=1, channels=1)
    card.op(p.Code.PCM_PREPARE, 1)
    req = card.rx(480 * 2)
    card.op(p.Code.PCM_START, 1)
    wait_done([req])
    samples = np.frombuffer(req.reply[:960], dtype="<i2")
    spectrum = np.abs(np.fft.rfft(samples))
    assert np.argmax(spectrum) * RATE / len(samples) == pytest.approx(1000, abs=100)


# -- control elements ----------------------------------------------------------------------
def ctl_info(card: Card) -> list[tuple]:
    n = len(card.model.controls)
    reply = card.control(p.QUERY_INFO.pack(p.Code.CTL_INFO, 0, n, p.CTL_INFO.size),
                         4 + n * p.CTL_INFO.size)
    return [p.CTL_INFO.unpack_from(reply, 4 + i * p.CTL_INFO.size) for i in range(n)]


def test_controls_follow_alsa_names(card):
    infos = ctl_info(card)
    names = [(i[6].rstrip(b"\0").decode(), i[5]) for i in infos]
    assert names == [("PCM Playback Volume", 0), ("PCM Playback Switch", 0),
                     ("Capture Volume", 0), ("Capture Switch", 0)]
    vol = infos[0]
    assert vol[1] == p.CtlRole.VOLUME and vol[2] == p.CtlType.INTEGER and vol[4] == 2
    assert p.CTL_INTEGER_RANGE.unpack_from(vol[7]) == (0, VOLUME_MAX, 1)
    assert vol[3] >> p.CtlAccess.TLV_READ & 1


def test_volume_write_scales_samples_and_notifies(card, tmp_path):
    ev = card.event()
    value = struct.pack("<2I", 80, 80).ljust(p.CTL_VALUE_SIZE, b"\0")
    assert status(card.control(p.CTL_HDR.pack(p.Code.CTL_WRITE, 0) + value)) == p.Status.OK
    assert ev.done and p.CTL_EVENT.unpack(ev.reply) == (p.Event.CTL_NOTIFY, 0, 1)
    reply = card.control(p.CTL_HDR.pack(p.Code.CTL_READ, 0), 4 + p.CTL_VALUE_SIZE)
    assert struct.unpack_from("<2I", reply, 4) == (80, 80)
    samples = np.full(960, 10000, dtype="<i2")
    reqs = play(card, samples.tobytes(), 960 * 2)
    wait_done(reqs)
    card.op(p.Code.PCM_STOP)
    card.op(p.Code.PCM_RELEASE)
    card.model.streams[0]._thread.join(2)
    out = np.frombuffer(read_wav(tmp_path / "out-0-1.wav").data, dtype="<i2")
    assert np.all(out == round(10000 * volume_gain(80)))


def test_mute_switch_silences(card, tmp_path):
    value = struct.pack("<2I", 0, 1).ljust(p.CTL_VALUE_SIZE, b"\0")   # left off
    assert status(card.control(p.CTL_HDR.pack(p.Code.CTL_WRITE, 1) + value)) == p.Status.OK
    reqs = play(card, np.full(960, 1234, dtype="<i2").tobytes(), 960 * 2)
    wait_done(reqs)
    card.op(p.Code.PCM_STOP)
    card.op(p.Code.PCM_RELEASE)
    card.model.streams[0]._thread.join(2)
    out = np.frombuffer(read_wav(tmp_path / "out-0-1.wav").data, dtype="<i2").reshape(-1, 2)
    assert np.all(out[:, 0] == 0) and np.all(out[:, 1] == 1234)


def test_control_value_out_of_range_is_refused(card):
    value = struct.pack("<2I", VOLUME_MAX + 1, 0).ljust(p.CTL_VALUE_SIZE, b"\0")
    assert status(card.control(p.CTL_HDR.pack(p.Code.CTL_WRITE, 0) + value)) == p.Status.BAD_MSG
    reply = card.control(p.CTL_HDR.pack(p.Code.CTL_READ, 0), 4 + p.CTL_VALUE_SIZE)
    assert struct.unpack_from("<2I", reply, 4) == (VOLUME_MAX, VOLUME_MAX)
    assert status(card.control(p.CTL_HDR.pack(p.Code.CTL_WRITE, 0) + b"\0")) == p.Status.BAD_MSG


def test_volume_tlv_is_a_db_scale(card):
    req = FakeRequest([p.CTL_HDR.pack(p.Code.CTL_TLV_READ, 0)], [4, 64])
    card.model.handle_request(p.CONTROL_QUEUE, req)
    assert status(req.reply) == p.Status.OK
    kind, length, lo, step = struct.unpack_from("<IIiI", req.reply, 4)
    assert (kind, length) == (p.TLV_DB_SCALE, 8)
    assert lo == -5000 and step & 0xFFFF == 50 and step & p.TLV_DB_SCALE_MUTE
    # the switch has no TLV; writing TLV is not supported
    assert status(card.control(p.CTL_HDR.pack(p.Code.CTL_TLV_READ, 1), 68)) == p.Status.NOT_SUPP
    assert status(card.control(p.CTL_HDR.pack(p.Code.CTL_TLV_WRITE, 0), 4)) == p.Status.NOT_SUPP


@pytest.mark.parametrize("fmt", ["S8", "U8", "S16", "U16", "S24_3", "S24", "S32", "FLOAT",
                                 "FLOAT64"])
def test_scale_is_exact_at_unity_and_mutes_to_silence(fmt):
    sample = SAMPLE_FORMATS[fmt]
    data = signal(sample.width * 2 * 64, seed=5)
    if sample.dtype.startswith("<f"):
        data = np.linspace(-1, 1, 128).astype(sample.dtype).tobytes()
    elif fmt == "S24":
        data = (np.arange(-64, 64, dtype="<i4") * 1000).tobytes()
    assert scale(data, sample, 2, [1.0, 1.0]) == data
    muted = scale(data, sample, 2, [0.0, 0.0])
    assert muted == sample.silence * (len(data) // sample.width)


@pytest.mark.parametrize("fmt", ["FLOAT", "FLOAT64"])
def test_scale_takes_a_guests_inf_and_nan_without_a_warning(fmt):
    """A guest's float samples may be anything: muting inf (inf * 0) made
    numpy print a RuntimeWarning into QEMU's log (the protocol fuzzer's
    model-warning oracle found it)."""
    sample = SAMPLE_FORMATS[fmt]
    data = np.array([np.inf, -np.inf, np.nan, 0.5], sample.dtype).tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        muted = np.frombuffer(scale(data, sample, 2, [0.0, 1.0]), sample.dtype)
        halved = np.frombuffer(scale(data, sample, 2, [0.5, 0.5]), sample.dtype)
    assert np.isnan(muted[0]) and muted[1] == -np.inf and muted[3] == 0.5
    assert halved[0] == np.inf and np.isnan(halved[2])


# -- backends and config -------------------------------------------------------------------
class ExplodingBackend(SndBackend):
    """Fails on the third write, like an unplugged USB headset."""

    def __init__(self, options, stream_id, direction):
        super().__init__(options, stream_id, direction)
        self.writes = 0

    def write(self, frames):
        self.writes += 1
        if self.writes >= 3:
            raise BackendError("device unplugged")


def test_backend_failure_becomes_io_err_and_xrun_event(tmp_path):
    c = Card(tmp_path, streams=[{"direction": "output", "formats": ["S16"], "rates": [RATE],
                                 "backend": "tests.test_snd_models:ExplodingBackend"}])
    ev = c.event()
    period = PERIOD_FRAMES * 4
    reqs = play(c, bytes(period * 5), period,
                features=1 << p.PcmFeature.EVT_XRUNS)
    wait_done(reqs)
    statuses = [p.PCM_STATUS.unpack(r.reply)[0] for r in reqs]
    assert statuses == [p.Status.OK] * 2 + [p.Status.IO_ERR] * 3
    assert ev.done and p.EVENT.unpack(ev.reply) == (p.Event.PCM_XRUN, 0)
    c.model.close()


class HangingBackend(SndBackend):
    """open() never returns (a wedged audio server)."""

    def open(self, params):
        threading.Event().wait()


class RaisingBackend(SndBackend):
    """Every hook raises something that is not a BackendError (a backend's bug)."""

    def _boom(self, *args):
        raise RuntimeError("backend bug")

    open = start = stop = close = write = read = _boom


def test_a_backend_hook_that_never_returns_costs_io_err_not_the_main_loop(tmp_path, caplog):
    """Issue 15 item 4: the backend's open ran on QEMU's main loop, so a hook
    that never returned stalled it for good.  Now PREPARE answers IO_ERR
    within HOOK_TIMEOUT_S, the hung backend is not called again (one stuck
    thread at most), it is said once, and the other stream goes on."""
    c = Card(tmp_path, streams=[
        {"direction": "output", "formats": ["S16"], "rates": [RATE],
         "backend": "tests.test_snd_models:HangingBackend"},
        {"direction": "output", "formats": ["S16"], "rates": [RATE],
         "backend": {"name": "wav", "path": str(tmp_path / "ok.wav")}}])
    assert c.set_params() == p.Status.OK
    threads = threading.active_count()
    t0 = time.monotonic()
    assert c.op(p.Code.PCM_PREPARE) == p.Status.IO_ERR
    assert time.monotonic() - t0 < HOOK_TIMEOUT_S + 0.3
    t1 = time.monotonic()
    for _ in range(5):
        assert c.op(p.Code.PCM_PREPARE) == p.Status.IO_ERR
    assert time.monotonic() - t1 < 0.1                      # not waited for again
    assert threading.active_count() <= threads + 1
    assert sum("did not return" in r.message for r in caplog.records) == 1
    assert c.set_params(sid=1) == p.Status.OK
    assert c.op(p.Code.PCM_PREPARE, sid=1) == p.Status.OK
    c.model.close()


def test_a_backend_raising_in_every_hook_gets_io_err_and_one_line(tmp_path, caplog):
    c = Card(tmp_path, streams=[{"direction": "output", "formats": ["S16"], "rates": [RATE],
                                 "backend": "tests.test_snd_models:RaisingBackend"}])
    for _ in range(3):
        assert c.set_params() == p.Status.OK
        assert c.op(p.Code.PCM_PREPARE) == p.Status.IO_ERR
    assert c.op(p.Code.PCM_START) == p.Status.BAD_MSG
    warnings = [r.message for r in caplog.records]
    assert len(warnings) == 1 and "RuntimeError: backend bug" in warnings[0], warnings
    assert not any("Traceback" in w for w in warnings)
    c.model.close()


def test_prepare_failure_is_io_err(tmp_path):
    c = Card(tmp_path, streams=[{"direction": "output", "formats": ["S16"], "rates": [RATE],
                                 "backend": {"name": "wav",
                                             "path": str(tmp_path / "no/dir/x.wav")}}])
    assert c.set_params() == p.Status.OK
    assert c.op(p.Code.PCM_PREPARE) == p.Status.IO_ERR
    assert c.op(p.Code.PCM_START) == p.Status.BAD_MSG


@pytest.mark.parametrize("snd,message", [
    ({"streams": [{"direction": "sideways"}]}, "direction"),
    ({"streams": [{"channels": [3, 2]}]}, "channels"),
    ({"streams": [{"channels": [1, 9]}]}, "channels"),
    ({"streams": [{"formats": ["S17"]}]}, "unsupported format"),
    ({"streams": [{"formats": ["MU_LAW"]}]}, "unsupported format"),
    ({"streams": [{"rates": [1000]}]}, "unsupported rate"),
    ({"streams": []}, "non-empty"),
    ({"streams": [{"backend": "jack"}]}, "unknown backend 'jack'"),
    ({"streams": [{"backend": {"name": "wav", "colour": 1}}]}, "unknown option 'colour'"),
    ({"streams": [{"backend": {"name": "portaudio", "latency": "soon"}}]}, "latency"),
    ({"streams": [{"direction": "input", "backend": {"name": "wav", "path": "/nope.wav"}}]},
     "no such file"),
    ({"streams": [{"chmaps": ["6.1"]}]}, "chmaps"),
    ({"streams": [{"volume": "yes"}]}, "volume"),
    ({"streams": [{"speed": 2}]}, "unknown key 'speed'"),
    ({"jacks": [{"device": "toaster"}]}, "device"),
    ({"streams": [{"backend": "pyemb.video_backend:PyAVBackend"}]}, "not a pyemb SndBackend"),
])
def test_bad_config_is_one_line(snd, message):
    with pytest.raises(ConfigError, match=message) as exc:
        SoundDevice(FakeHandle(), {"snd": snd})
    assert "\n" not in str(exc.value)


def test_default_backend_comes_from_the_device_property():
    from pyemb.snd_backend import NullBackend
    model = SoundDevice(FakeHandle(), {}, backend_class=NullBackend)
    assert all(isinstance(s.backend, NullBackend) for s in model.streams)
    with pytest.raises(ConfigError, match="not a pyemb SndBackend"):
        SoundDevice(FakeHandle(), {}, backend_class=dict)


def rx_split(card: Card, sizes: list[int], sid: int = 1) -> FakeRequest:
    """An rx message whose payload descriptors split where a guest's pages
    do, e.g. 3 + 1021 bytes of S16 stereo: a sample across two views."""
    req = FakeRequest([struct.pack("<I", sid)], [*sizes, 8], queue=p.RX_QUEUE)
    card.model.handle_request(p.RX_QUEUE, req)
    return req


@pytest.mark.parametrize("gain", [False, True])
def test_capture_split_mid_sample_is_bit_exact_and_the_stream_lives(tmp_path, gain):
    """Issue 15: with a capture gain (scale() could not reshape a view that
    is not whole frames) or after STOP (silence of len(view) // 2 samples
    into a view of odd length) the pacing thread died and the stream hung."""
    source = signal(1024 * 6, seed=4)
    src_path = tmp_path / "in.wav"
    from pyemb.snd_backend import StreamParams, wav_header
    src_path.write_bytes(wav_header(StreamParams(0, "input", 2, "S16", RATE, 0, 0),
                                    len(source)) + source)
    c = Card(tmp_path, streams=[{"direction": "input", "formats": ["S16"], "rates": [RATE],
                                 "backend": {"name": "wav", "path": str(src_path)}}])
    try:
        if gain:    # capture volume 80 on both channels
            value = struct.pack("<2I", 80, 80).ljust(p.CTL_VALUE_SIZE, b"\0")
            assert status(c.control(p.CTL_HDR.pack(p.Code.CTL_WRITE, 0) + value)) == p.Status.OK
        assert c.set_params(sid=0, period=1024) == p.Status.OK
        assert c.op(p.Code.PCM_PREPARE) == p.Status.OK
        reqs = [rx_split(c, [3, 1021], sid=0) for _ in range(4)]
        assert c.op(p.Code.PCM_START) == p.Status.OK
        wait_done(reqs)
        got = b"".join(r.reply[:1024] for r in reqs)
        expected = source[:4096]
        if gain:
            expected = scale(expected, SAMPLE_FORMATS["S16"], 2, [volume_gain(80)] * 2)
        assert got == expected
        # Pending at STOP: completed with silence, split mid-sample too.
        late = [rx_split(c, [1, 1023], sid=0) for _ in range(2)]
        assert c.op(p.Code.PCM_STOP) == p.Status.OK
        wait_done(late)
        assert all(r.reply[:1024] == bytes(1024) for r in late)
        assert c.op(p.Code.PCM_RELEASE) == p.Status.OK
    finally:
        c.model.close()


def test_prepare_release_loops_keep_nothing_per_loop(tmp_path):
    """Issue 15's soak (bench/soak.py) found the sound device growing by
    about 0.4 KB a PREPARE: the WAV backend kept every file name it had
    written.  Nothing the model allocates may grow with the loops."""
    import gc
    import tracemalloc

    c = Card(tmp_path)
    period = PERIOD_FRAMES * 4

    def loop() -> None:
        assert c.set_params(sid=0, period=period) == p.Status.OK
        c.op(p.Code.PCM_PREPARE)
        reqs = [c.tx(bytes(period)) for _ in range(2)]
        c.op(p.Code.PCM_START)
        wait_done(reqs)
        c.op(p.Code.PCM_STOP)
        c.op(p.Code.PCM_RELEASE)

    try:
        for _ in range(50):
            loop()
        gc.collect()
        tracemalloc.start(12)
        before = tracemalloc.take_snapshot()
        for _ in range(300):
            loop()
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        grown = [s for s in after.compare_to(before, "traceback") if s.count_diff >= 300
                 and any("/pyemb/" in frame.filename for frame in s.traceback)]
        assert not grown, [str(s) + "\n" + "\n".join(s.traceback.format()) for s in grown]
    finally:
        c.model.close()
