"""qtest tier for virtio-snd-py: the host driver plays and records through the
patched QEMU, the WAV backend checks the bytes, on PCI and virtio-mmio."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np

from pyemb.snd import protocol as p
from pyemb.snd_backend import StreamParams, read_wav, wav_header
from tests.conftest import start
from tests.hostdriver import VirtioDevice

RATE = 48000
PERIOD = 240 * 4                    # 5 ms of S16 stereo


def write_config(tmp_path: Path, source: Path) -> Path:
    cfg = tmp_path / "snd.toml"
    cfg.write_text(f"""
[[snd.streams]]
direction = "output"
formats = ["S16", "S32"]
rates = [44100, 48000]
backend = {{ name = "wav", path = "{tmp_path}/play-{{n}}.wav" }}

[[snd.streams]]
direction = "input"
formats = ["S16"]
rates = [48000]
backend = {{ name = "wav", path = "{source}" }}

[[snd.jacks]]
device = "headphone"
""")
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


def start_card(transport: str, tmp_path: Path, source_bytes: bytes = b""):
    source = tmp_path / "source.wav"
    params = StreamParams(1, "input", 2, "S16", RATE, 0, 0)
    source.write_bytes(wav_header(params, len(source_bytes)) + source_bytes)
    m = start(transport, "virtio-snd-py", f"config={write_config(tmp_path, source)}")
    dev = m.find_virtio(p.DEVICE_ID)
    dev.initialize(want_features=1 << p.F_CTLS)
    return m, dev


def test_playback_through_qemu_is_bit_exact_and_paced(transport, tmp_path):
    m, dev = start_card(transport, tmp_path)
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


def test_capture_through_qemu_is_bit_exact(transport, tmp_path):
    source = signal(PERIOD * 6, seed=4)
    m, dev = start_card(transport, tmp_path, source)
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


def test_control_write_notifies_through_the_event_queue(transport, tmp_path):
    m, dev = start_card(transport, tmp_path)
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


def test_reset_while_playing_drops_everything_and_serves_again(transport, tmp_path):
    m, dev = start_card(transport, tmp_path)
    try:
        assert ok(set_params(dev, 0))
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_PREPARE, 0)))
        tx = dev.queues[p.TX_QUEUE]
        for _ in range(8):
            tx.add([struct.pack("<I", 0), bytes(PERIOD)], [8])
        tx.kick()
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_START, 0)))
        dev.reset()                       # the guest driver goes away mid-stream
        dev.initialize(want_features=1 << p.F_CTLS)
        assert ok(set_params(dev, 0))     # a fresh state machine
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_PREPARE, 0)))
        tx = dev.queues[p.TX_QUEUE]
        tx.add([struct.pack("<I", 0), bytes(PERIOD)], [8])
        tx.kick()
        assert ok(ctl(dev, p.PCM_HDR.pack(p.Code.PCM_START, 0)))
        assert p.PCM_STATUS.unpack(tx.wait().data)[0] == p.Status.OK
    finally:
        m.stop()
