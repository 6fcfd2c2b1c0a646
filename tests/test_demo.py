"""The demo's host-side logic (demo/guest_video.py, demo/guest_sound.py),
without booting a guest: `make demo` does that."""

from __future__ import annotations

import av
import numpy as np
import pytest

from demo import guest_sound, guest_video
from pyemb.snd_backend import StreamParams, wav_header
from tests.streams import visible

W, H, N = 160, 96, 12


@pytest.fixture(scope="module")
def stream() -> bytes:
    return guest_video.clip(1, W, H, N)


@pytest.fixture(scope="module")
def decoded(stream) -> list[bytes]:
    return list(guest_video.reference_pictures(stream))


def test_pictures_that_came_back_unchanged_compare_bit_exact(stream, decoded):
    got = guest_video.pictures(b"".join(decoded), W, H)
    assert guest_video.compare(got, stream) == (N, N, [])
    assert guest_video.crcs(got) == guest_video.console_crcs(
        "".join(f"FRAME {i} {i * 40000} {c:08x}\n" for i, c in enumerate(guest_video.crcs(got))))


def test_one_changed_byte_is_named(stream, decoded):
    got = list(decoded)
    got[5] = got[5][:100] + bytes([got[5][100] ^ 1]) + got[5][101:]
    assert guest_video.compare(got, stream) == (N - 1, N, [5])


def test_a_partial_picture_is_refused(decoded):
    with pytest.raises(ValueError, match="whole number"):
        guest_video.pictures(b"".join(decoded)[:-1], W, H)


def test_the_guests_clips_differ():
    first = guest_video.scene(1, 3, W, H).to_ndarray()
    assert not np.array_equal(first, guest_video.scene(2, 3, W, H).to_ndarray())
    assert not np.array_equal(first, guest_video.scene(1, 4, W, H).to_ndarray())


@pytest.mark.parametrize("width,height", [(W, H), (35, 19)])
def test_nv12_frame_keeps_a_packed_picture(width, height):
    packed = np.random.default_rng(1).integers(0, 256, guest_video.nv12_size(width, height),
                                               np.uint8).tobytes()
    assert visible(guest_video.nv12_frame(packed, width, height)) == packed


def test_video_file_has_every_picture_and_the_tune(tmp_path, decoded):
    wav = tmp_path / "tune.wav"
    wav.write_bytes(guest_sound.tune())
    path = tmp_path / "guest.mp4"
    guest_video.write_video(path, decoded, W, H, wav)
    with av.open(str(path)) as container:
        assert {s.type for s in container.streams} == {"video", "audio"}
        frames = [f.to_ndarray(format="yuv420p")[:H].astype(int)
                  for f in container.decode(video=0)]
    assert len(frames) == N
    source = [np.frombuffer(p[:W * H], np.uint8).reshape(H, W) for p in decoded]
    assert max(np.abs(a - b).mean() for a, b in zip(frames, source, strict=True)) < 2


PARAMS = StreamParams(0, "output", 2, "S16", guest_sound.RATE, 0, 0)


def test_sound_report_takes_padding_as_bit_exact(tmp_path):
    sound = guest_sound.GuestSound(tmp_path, 2, has_output=False, has_input=False)
    data = guest_sound.read_wav_bytes(sound.tune) + bytes(4 * 544)
    sound.played.with_name("guest2-tune-1.wav").write_bytes(wav_header(PARAMS, len(data)) + data)
    t = np.arange(guest_sound.RATE) / guest_sound.RATE
    tone = np.repeat((8000 * np.sin(2 * np.pi * 660 * t)).astype("<i2"), 2).tobytes()
    sound.echo.with_name("guest2-recording-1.wav").write_bytes(
        wav_header(PARAMS, len(tone)) + tone)
    sound.collect()
    played, recorded = sound.report()
    assert "bit-exact" in played and "underran" not in played
    assert "mostly 660 Hz" in recorded


def test_pieces_after_an_underrun_are_joined(tmp_path):
    old = tmp_path / "guest1-tune-3.wav"             # from an earlier run
    old.write_bytes(b"")
    sound = guest_sound.GuestSound(tmp_path, 1, has_output=False, has_input=False)
    assert not old.exists()
    data = guest_sound.read_wav_bytes(sound.tune) + bytes(4 * 544)
    for n, piece in enumerate((data[:81920], data[81920:200000], data[200000:]), 1):
        path = tmp_path / f"guest1-tune-{n}.wav"
        path.write_bytes(wav_header(PARAMS, len(piece)) + piece)
    sound.echo.write_bytes(wav_header(PARAMS, 4800) + bytes(4800))
    sound.collect()
    assert sorted(p.name for p in tmp_path.glob("guest1-tune*")) == ["guest1-tune.wav"]
    assert "bit-exact" in sound.report()[0]
    assert "underran 2 times" in sound.report()[0]


def test_encoded_packets_make_an_mp4_with_every_picture(tmp_path):
    from demo import encode
    from pyemb.video import protocol as p
    from pyemb.video_backend import EncoderSettings, PyAVBackend, RawImage
    from tests.encoder_client import EncodedPacket

    session = PyAVBackend({}).open_encoder(
        EncoderSettings(p.Format.H264, W, H, 25, 1_000_000, 1_500_000, False))
    packets = []
    for i in range(N):
        packed = np.frombuffer(visible(guest_video.scene(1, i, W, H, N)), np.uint8)
        picture = session.take(RawImage(p.Format.NV12, W, H, packed.ctypes.data,
                                        packed.nbytes, [(0, W), (W * H, W)]))
        packets += [EncodedPacket(pk.data, pk.timestamp, pk.flags)
                    for pk in session.encode(picture, i, False)]
    packets += [EncodedPacket(pk.data, pk.timestamp, pk.flags) for pk in session.flush()]
    path = tmp_path / "encoded.mp4"
    encode.write_mp4(path, packets, W, H, 25)
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert len(list(container.decode(video=0))) == N
