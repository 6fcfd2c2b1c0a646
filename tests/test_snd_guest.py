"""Real-guest tier: a Debian 6.12 kernel's virtio-snd driver, aplay, arecord
and amixer against virtio-snd-py-pci.  One boot runs every step; the tests
check its console and what reached the host (WAV backend, and PortAudio
routed by an ALSA config into a file)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from pyemb.snd.controls import volume_gain
from pyemb.snd.pcm import SAMPLE_FORMATS, scale
from pyemb.snd_backend import StreamParams, read_wav, wav_header
from tests.guest import GuestResult, boot_guest

RECORD_FRAMES = 12000


def wav(fmt: str, channels: int, rate: int, frames: int, seed: int) -> tuple[bytes, bytes]:
    """A WAV file of noise and its PCM data."""
    width = SAMPLE_FORMATS[fmt].width
    data = np.random.default_rng(seed).integers(0, 256, frames * channels * width,
                                                dtype=np.uint8).tobytes()
    if fmt == "S16":          # a moderate level, so that volume changes are visible
        data = (np.frombuffer(data, "<i2") // 4).astype("<i2").tobytes()
    params = StreamParams(0, "output", channels, fmt, rate, 0, 0)
    return wav_header(params, len(data)) + data, data


PLAYS = {   # name: (format, channels, rate, aplay format)
    "s16-48k": ("S16", 2, 48000, "S16_LE"),
    "s16-44k": ("S16", 2, 44100, "S16_LE"),
    "s32-48k": ("S32", 2, 48000, "S32_LE"),
    "u8-mono": ("U8", 1, 48000, "U8"),
}

SCRIPT = f"""
for name in s16-48k s16-44k s32-48k u8-mono; do
    echo "== play $name"; aplay -q -D hw:0,0,0 /$name.wav; echo "aplay rc=$?"
done
echo "== volume"
amixer -c 0 sset PCM 50; aplay -q -D hw:0,0,0 /s16-48k.wav; echo "aplay rc=$?"
amixer -c 0 sset PCM 100 >/dev/null
echo "== portaudio"
aplay -q -D hw:0,0,1 /s16-48k.wav; echo "aplay rc=$?"
echo "== record"
arecord -q -D hw:0,0 -f S16_LE -c 2 -r 48000 -s {RECORD_FRAMES} -t raw /tmp/rec.raw
echo "arecord rc=$?"; md5sum /tmp/rec.raw
echo "== controls"
amixer -c 0 controls; amixer -c 0 sget PCM; amixer -c 0 sget Capture
echo "== cards"
cat /proc/asound/cards; aplay -l
echo "== dmesg"
dmesg | grep -i -E "virtio|snd" | grep -v -E "^\\[ *0\\.0"
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[GuestResult, Path, dict[str, bytes], bytes]:
    tmp = tmp_path_factory.mktemp("guest")
    files, signals = {}, {}
    for i, (name, (fmt, ch, rate, _)) in enumerate(PLAYS.items()):
        files[f"{name}.wav"], signals[name] = wav(fmt, ch, rate, rate // 4, seed=i)
    source_file, source = wav("S16", 2, 48000, RECORD_FRAMES + 4800, seed=99)
    (tmp / "source.wav").write_bytes(source_file)
    asound = tmp / "asound.conf"
    asound.write_text(f"""<confdir:alsa.conf>
pcm.!default {{
    type file
    slave.pcm "null"
    file "{tmp}/portaudio.raw"
    format "raw"
}}
""")
    config = tmp / "snd.toml"
    config.write_text(f"""
[[snd.streams]]
direction = "output"
formats = ["U8", "S16", "S32"]
rates = [44100, 48000]
backend = {{ name = "wav", path = "{tmp}/play-{{n}}.wav" }}

[[snd.streams]]
direction = "output"
formats = ["S16"]
rates = [48000]
backend = "portaudio"

[[snd.streams]]
direction = "input"
formats = ["S16"]
rates = [48000]
backend = {{ name = "wav", path = "{tmp}/source.wav" }}

[[snd.jacks]]
device = "headphone"
""")
    result = boot_guest(["-device", f"virtio-snd-py-pci,config={config}"], SCRIPT, files,
                        env={"ALSA_CONFIG_PATH": str(asound)})
    return result, tmp, signals, source


def played(tmp: Path, n: int) -> bytes:
    return read_wav(tmp / f"play-{n}.wav").data


def assert_prefix_then_silence(got: bytes, want: bytes, silence: bytes) -> None:
    """aplay pads its last period with silence; everything else is exact."""
    assert got[:len(want)] == want
    pad = got[len(want):]
    assert pad == silence * (len(pad) // len(silence))


def test_guest_finds_the_card_and_its_controls(run):
    result, _, _, _ = run
    controls = result.section("controls")
    for name in ("Headphone Jack", "PCM Playback Volume", "PCM Playback Switch",
                 "Capture Volume", "Capture Switch", "Playback Channel Map"):
        assert f"name='{name}'" in controls
    assert "VirtIO SoundCard" in result.section("cards")
    assert "error" not in result.section("dmesg").lower(), result.section("dmesg")


def assert_played_bit_exact(result: GuestResult, tmp: Path, signals: dict[str, bytes],
                            n: int, name: str) -> None:
    """The guest's ``play <name>`` section reached the WAV backend's n-th file."""
    assert "aplay rc=0" in result.section(f"play {name}")
    fmt, channels, rate, _ = PLAYS[name]
    wav_file = read_wav(tmp / f"play-{n}.wav")
    assert (wav_file.channels, wav_file.rate) == (channels, rate)
    assert_prefix_then_silence(wav_file.data, signals[name], SAMPLE_FORMATS[fmt].silence)


@pytest.mark.parametrize("n,name", list(enumerate(PLAYS, start=1)))
def test_aplay_reaches_the_host_bit_exact(run, n, name):
    result, tmp, signals, _ = run
    assert_played_bit_exact(result, tmp, signals, n, name)


def test_amixer_volume_scales_the_samples(run):
    result, tmp, signals, _ = run
    section = result.section("volume")
    assert "aplay rc=0" in section and "Playback 50 [50%]" in section
    want = scale(signals["s16-48k"], SAMPLE_FORMATS["S16"], 2, [volume_gain(50)] * 2)
    got = played(tmp, len(PLAYS) + 1)
    assert_prefix_then_silence(got, want, b"\0\0")
    level = np.abs(np.frombuffer(got[:len(want)], "<i2")).mean()
    assert level < 0.1 * np.abs(np.frombuffer(signals["s16-48k"], "<i2")).mean()


def test_portaudio_backend_plays_bit_exact(run):
    result, tmp, signals, _ = run
    assert "aplay rc=0" in result.section("portaudio")
    got = (tmp / "portaudio.raw").read_bytes()
    assert_prefix_then_silence(got, signals["s16-48k"], b"\0\0")


def test_arecord_gets_the_source_bit_exact(run):
    result, _, _, source = run
    section = result.section("record")
    assert "arecord rc=0" in section
    want = hashlib.md5(source[:RECORD_FRAMES * 4]).hexdigest()
    assert f"{want}  /tmp/rec.raw" in section, section

