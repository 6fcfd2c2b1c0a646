"""qtest tier for virtio-snd-py: the host driver plays and records through the
patched QEMU, the WAV backend checks the bytes, on PCI and virtio-mmio."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np

from pyemb.snd import protocol as p
from pyemb.snd_backend import StreamParams, read_wav, wav_header
from tests.conftest import start, with_and_without_ring_features
from tests.hostdriver import VirtioDevice

RATE = 48000
PERIOD = 240 * 4                    # 5 ms of S16 stereo


def stream_toml(direction: str, formats: str, rates: str, wav: str = "") -> str:
    """One [[snd.streams]] table; ``wav``: the WAV backend's path."""
    backend = f'backend = {{ name = "wav", path = "{wav}" }}\n' if wav else ""
    return (f'[[snd.streams]]\ndirection = "{direction}"\nformats = {formats}\n'
            f"rates = {rates}\n{backend}\n")


def write_config(tmp_path: Path, source: Path) -> Path:
    cfg = tmp_path / "snd.toml"
    cfg.write_text(stream_toml("output", '["S16", "S32"]', "[44100, 48000]",
                               f"{tmp_path}/play-{{n}}.wav")
                   + stream_toml("input", '["S16"]', "[48000]", str(source))
                   + '[[snd.jacks]]\ndevice = "headphone"\n')
    return cfg


def signal(nbytes: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


def ctl(dev: VirtioDevice, command: bytes, reply: int = 4) -> bytes:
    return dev.queues[p.CONTROL_QUEUE].call([command], [reply]).data


def ok(reply: bytes) -> bool:
    return p.HDR.unpack_from(reply)[0] == p.Status.OK


def set_params(dev: VirtioDevice, sid: int) -> bytes:
    return ctl(dev, p.SetParams(sid, PERIOD * 4, PERIOD, 0, 2, p.FORMAT_INDEX["S16"],
                                p.RATE_INDEX[RATE]).pack())


def start_card(transport: str, tmp_path: Path, source_bytes: bytes = b"",
               ring: dict[str, bool] | None = None):
    """``ring``: the virtqueue features (the ``ring`` fixture)."""
    source = tmp_path / "source.wav"
    params = StreamParams(1, "input", 2, "S16", RATE, 0, 0)
    source.write_bytes(wav_header(params, len(source_bytes)) + source_bytes)
    m = start(transport, "virtio-snd-py", f"config={write_config(tmp_path, source)}")
    dev = m.find_virtio(p.DEVICE_ID)
    dev.initialize(want_features=1 << p.F_CTLS, **(ring or {}))
    return m, dev


@with_and_without_ring_features
def test_playback_through_qemu_is_bit_exact_and_paced(transport, tmp_path, ring):
    m, dev = start_card(transport, tmp_path, ring=ring)
    try:
        data = signal(PERIOD * 12, seed=transport == "pci")
        assert ok(set_params(dev, 0))
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_PREPARE, 0)))
        tx = dev.queues[p.TX_QUEUE]
        # the driver keeps a buffer of four periods queued, like ALSA does
        sent = 0
        for _ in range(4):
            tx.add([struct.pack("<I", 0), data[sent:sent + PERIOD]], [8])
            sent += PERIOD
        tx.kick()
        t0 = time.monotonic()
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_START, 0)))
        statuses = []
        while len(statuses) < 12:
            used = tx.wait()
            statuses.append(p.PCM_STATUS.unpack(used.data))
            if sent < len(data):
                tx.add([struct.pack("<I", 0), data[sent:sent + PERIOD]], [8])
                sent += PERIOD
                tx.kick()
        elapsed = time.monotonic() - t0
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_STOP, 0)))
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_RELEASE, 0)))
        assert all(s == p.Status.OK for s, _ in statuses)
        # 12 periods of 5 ms: the last is handed over 55 ms after START
        assert elapsed >= 0.055 - 0.002
        assert 0 < statuses[0][1] <= 4 * PERIOD          # latency: what is queued
    finally:
        m.stop()
    assert read_wav(tmp_path / "play-1.wav").data == data


@with_and_without_ring_features
def test_capture_through_qemu_is_bit_exact(transport, tmp_path, ring):
    source = signal(PERIOD * 6, seed=4)
    m, dev = start_card(transport, tmp_path, source, ring=ring)
    try:
        assert ok(set_params(dev, 1))
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_PREPARE, 1)))
        rx = dev.queues[p.RX_QUEUE]
        for _ in range(6):
            rx.add([struct.pack("<I", 1)], [PERIOD, 8])
        rx.kick()
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_START, 1)))
        got = []
        for _ in range(6):
            used = rx.wait()
            assert used.written == PERIOD + 8
            assert p.PCM_STATUS.unpack(used.data[PERIOD:])[0] == p.Status.OK
            got.append(used.data[:PERIOD])
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_STOP, 1)))
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_RELEASE, 1)))
        assert b"".join(got) == source
    finally:
        m.stop()


def test_malformed_requests_get_errors_and_qemu_keeps_serving(transport, tmp_path):
    m, dev = start_card(transport, tmp_path)
    try:
        bad = [
            b"\x01",                                              # short
            struct.pack("<I", 0xDEAD),                            # unknown code
            p.PCM_HDR.pack(p.Code.PCM_START, 0),                  # wrong state
            p.PCM_HDR.pack(p.Code.PCM_PREPARE, 42),               # unknown stream
            p.QUERY_INFO.pack(p.Code.PCM_INFO, 0, 1000, 32),      # out of range
            p.CTL_HDR.pack(p.Code.CTL_WRITE, 0),                  # short write
        ]
        for command in bad:
            assert p.HDR.unpack_from(ctl(dev, command))[0] == p.Status.BAD_MSG
        tx = dev.queues[p.TX_QUEUE]
        for chain in ([struct.pack("<I", 0), bytes(PERIOD)],      # not prepared
                      [struct.pack("<I", 1), bytes(PERIOD)],      # a capture stream
                      [b"\0"]):                                   # no header
            used = tx.call(chain, [8])
            assert p.PCM_STATUS.unpack(used.data)[0] == p.Status.BAD_MSG
        used = tx.call([struct.pack("<I", 0), bytes(PERIOD)], [4])    # no room for status
        assert used.written == 0
        # a writable buffer on the control queue too small for the reply: as
        # much of the BAD_MSG status as fits (the shim would cap any length)
        short = dev.queues[p.CONTROL_QUEUE].call([b"\x01\x00\x00\x00"], [2])
        assert (short.written, short.data[:2]) == (2, struct.pack("<I", p.Status.BAD_MSG)[:2])
        assert ok(ctl(dev, p.QUERY_INFO.pack(p.Code.PCM_INFO, 0, 2, 32), 68))
        assert m.qmp.execute("query-status")["status"] == "running"
    finally:
        m.stop()


@with_and_without_ring_features
def test_control_write_notifies_through_the_event_queue(transport, tmp_path, ring):
    m, dev = start_card(transport, tmp_path, ring=ring)
    try:
        events = dev.queues[p.EVENT_QUEUE]
        for _ in range(4):
            events.add([], [8])
        events.kick()
        n = p.CONFIG.unpack(dev.config(p.CONFIG.size))[3]
        infos = ctl(dev, p.QUERY_INFO.pack(p.Code.CTL_INFO, 0, n, p.CTL_INFO.size),
                    4 + n * p.CTL_INFO.size)
        names = [p.CTL_INFO.unpack_from(infos, 4 + i * p.CTL_INFO.size)[6].rstrip(b"\0")
                 for i in range(n)]
        assert names == [b"PCM Playback Volume", b"PCM Playback Switch",
                         b"Capture Volume", b"Capture Switch"]
        value = struct.pack("<2I", 40, 60).ljust(p.CTL_VALUE_SIZE, b"\0")
        assert ok(ctl(dev, p.CTL_HDR.pack(p.Code.CTL_WRITE, 0) + value))
        used = events.wait()
        assert p.CTL_EVENT.unpack(used.data) == (p.Event.CTL_NOTIFY, 0, 1)
        reply = ctl(dev, p.CTL_HDR.pack(p.Code.CTL_READ, 0), 4 + p.CTL_VALUE_SIZE)
        assert struct.unpack_from("<2I", reply, 4) == (40, 60)
        jack = ctl(dev, p.QUERY_INFO.pack(p.Code.JACK_INFO, 0, 1, 24), 28)
        assert ok(jack) and p.JACK_INFO.unpack_from(jack, 4)[4] == 1
    finally:
        m.stop()


@with_and_without_ring_features
def test_reset_while_playing_drops_everything_and_serves_again(transport, tmp_path, ring):
    m, dev = start_card(transport, tmp_path, ring=ring)
    try:
        assert ok(set_params(dev, 0))
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_PREPARE, 0)))
        tx = dev.queues[p.TX_QUEUE]
        for _ in range(8):
            tx.add([struct.pack("<I", 0), bytes(PERIOD)], [8])
        tx.kick()
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_START, 0)))
        dev.reset()                       # the guest driver goes away mid-stream
        dev.initialize(want_features=1 << p.F_CTLS)     # the same ring features
        assert ok(set_params(dev, 0))     # a fresh state machine
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_PREPARE, 0)))
        tx = dev.queues[p.TX_QUEUE]
        tx.add([struct.pack("<I", 0), bytes(PERIOD)], [8])
        tx.kick()
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_START, 0)))
        assert p.PCM_STATUS.unpack(tx.wait().data)[0] == p.Status.OK
    finally:
        m.stop()


def two_playback_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "snd2.toml"
    cfg.write_text(stream_toml("output", '["S16"]', "[48000]", f"{tmp_path}/a-{{n}}.wav")
                   + stream_toml("output", '["S16", "S32"]', "[44100, 48000]",
                                 f"{tmp_path}/b-{{n}}.wav")
                   + stream_toml("input", '["S16"]', "[48000]"))
    return cfg


@with_and_without_ring_features
def test_commands_of_several_streams_at_once_each_reply_in_its_own_chain(
        transport, tmp_path, ring):
    """Commands for three streams made available together, one kick per
    queue: every reply lands in the chain that asked, whatever order the
    device completes them in (a bad one first, then one stream's buffers
    while the other's wait for their START)."""
    m = start(transport, "virtio-snd-py", f"config={two_playback_config(tmp_path)}")
    try:
        dev = m.find_virtio(p.DEVICE_ID)
        dev.initialize(want_features=1 << p.F_CTLS, **ring)
        control, tx = dev.queues[p.CONTROL_QUEUE], dev.queues[p.TX_QUEUE]
        half = PERIOD // 2
        commands = {
            "info 2": (p.QUERY_INFO.pack(p.Code.PCM_INFO, 2, 1, p.PCM_INFO.size),
                       4 + p.PCM_INFO.size),
            "params 0": (p.SetParams(0, 4 * PERIOD, PERIOD, 0, 2, p.FORMAT_INDEX["S16"],
                                     p.RATE_INDEX[RATE]).pack(), 4),
            "params 1": (p.SetParams(1, 4 * half, half, 0, 2, p.FORMAT_INDEX["S16"],
                                     p.RATE_INDEX[RATE]).pack(), 4),
            "bad rate": (p.SetParams(0, 4 * PERIOD, PERIOD, 0, 2, p.FORMAT_INDEX["S16"],
                                     p.RATE_INDEX[44100]).pack(), 4),
            "prepare 0": (p.PCM_HDR.pack(p.Code.PCM_PREPARE, 0), 4),
            "prepare 1": (p.PCM_HDR.pack(p.Code.PCM_PREPARE, 1), 4),
            "prepare 7": (p.PCM_HDR.pack(p.Code.PCM_PREPARE, 7), 4),
            "info 0": (p.QUERY_INFO.pack(p.Code.PCM_INFO, 0, 1, p.PCM_INFO.size),
                       4 + p.PCM_INFO.size),
        }
        tokens = {control.add([cmd], [size]).token: name for name, (cmd, size) in commands.items()}
        control.kick()
        replies = {}
        for _ in commands:
            used = control.wait()
            replies[tokens[used.chain.token]] = used.data
        assert {name: p.HDR.unpack_from(r)[0] for name, r in replies.items()} == {
            "info 2": p.Status.OK, "params 0": p.Status.OK, "params 1": p.Status.OK,
            "bad rate": p.Status.NOT_SUPP, "prepare 0": p.Status.OK, "prepare 1": p.Status.OK,
            "prepare 7": p.Status.BAD_MSG, "info 0": p.Status.OK}
        assert p.PcmInfo.unpack(replies["info 2"][4:]).direction == p.Direction.INPUT
        assert p.PcmInfo.unpack(replies["info 0"][4:]).direction == p.Direction.OUTPUT

        # Periods of stream 0 (PERIOD bytes) and stream 1 (half as many)
        # interleaved on the tx queue, a message for the capture stream
        # among them; one kick.
        a, b = signal(PERIOD * 4, seed=10), signal(half * 4, seed=11)
        sent: dict[int, tuple[str, int]] = {}
        for i in range(4):
            if i == 2:
                sent[tx.add([struct.pack("<I", 2), bytes(PERIOD)], [8]).token] = ("capture", 0)
            sent[tx.add([struct.pack("<I", 0), a[i * PERIOD:(i + 1) * PERIOD]], [8]).token] = \
                ("a", i)
            sent[tx.add([struct.pack("<I", 1), b[i * half:(i + 1) * half]], [8]).token] = ("b", i)
        tx.kick()
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_START, 0)))

        def take(n: int) -> list[tuple[str, int, int, int]]:
            got = []
            for _ in range(n):
                used = tx.wait()
                status, latency = p.PCM_STATUS.unpack(used.data)
                got.append((*sent.pop(used.chain.token), status, latency))
            return got

        # The refused message first, though queued after four others; then
        # stream 0's periods in order, each reporting what stream 0 still
        # has queued (its own period included); stream 1's wait for START.
        assert take(1) == [("capture", 0, p.Status.BAD_MSG, 0)]
        assert take(4) == [("a", i, p.Status.OK, (4 - i) * PERIOD) for i in range(4)]
        time.sleep(0.05)
        assert tx.poll() is None
        assert sorted(sent.values()) == [("b", i) for i in range(4)]
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_START, 1)))
        assert take(4) == [("b", i, p.Status.OK, (4 - i) * half) for i in range(4)]
        for sid in (0, 1):
            assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_STOP, sid)))
            assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_RELEASE, sid)))
    finally:
        m.stop()
    assert read_wav(tmp_path / "a-1.wav").data == a
    assert read_wav(tmp_path / "b-1.wav").data == b


def test_no_view_of_guest_memory_outlives_its_request(tmp_path):
    """The shim reports views of guest memory a model still holds when their
    request ends (completed, or dropped at a reset), as stale.  The protocol
    fuzzer found the sound model keeping them three ways: a malformed rx
    answered inside the handler of its exception (whose frames held the
    slices), a message completed while _transfer held its slices, and a
    queued message dropped at a reset before its views."""
    cfg = tmp_path / "snd.toml"
    cfg.write_text('[[snd.streams]]\ndirection = "output"\nbackend = "null"\n'
                   '[[snd.streams]]\ndirection = "input"\nbackend = "null"\n')
    m = start("pci", "virtio-snd-py", f"config={cfg}")
    try:
        dev = m.find_virtio(p.DEVICE_ID)
        dev.initialize()
        rx = dev.queues[p.RX_QUEUE]
        assert ok(ctl(dev, p.SetParams(1, 1024, 256, 0, 1, p.FORMAT_INDEX["S16"],
                                       p.RATE_INDEX[48000]).pack()))
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_PREPARE, 1)))
        # 99 bytes are not whole S16 frames: refused once the views are cut.
        used = rx.call([struct.pack("<I", 1)], [99, 8])
        assert p.PCM_STATUS.unpack(used.data[-8:])[0] == p.Status.BAD_MSG
        # Queued while PREPARED, flushed (silence) at RELEASE by the thread;
        # frames and status in one buffer, so that the frames are a slice.
        for _ in range(2):
            rx.add([struct.pack("<I", 1)], [256 + 8])
        rx.kick()
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_RELEASE, 1)))
        for _ in range(2):
            assert p.PCM_STATUS.unpack(rx.wait().data[-8:])[0] == p.Status.OK
        # Queued while PREPARED, dropped by a reset.
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_PREPARE, 1)))
        rx.add([struct.pack("<I", 1)], [256 + 8])
        rx.kick()
        time.sleep(0.05)
        dev.initialize()
        assert ok(ctl(dev, p.QUERY_INFO.pack(p.Code.PCM_INFO, 0, 2, p.PCM_INFO.size), 4 + 64))
    finally:
        m.stop()
    assert "keeps views of guest memory" not in m.exit_stderr
