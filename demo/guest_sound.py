"""The sound part of the demo: a real Linux guest plays and records through
virtio-snd-py-pci.

The guest (ci/build_guest.py) plays a short tune with aplay.  It goes to the
host's default PortAudio output, or into a WAV file where the host has no
audio device.  Then it records three seconds with arecord from the capture
stream (the host's default PortAudio input, or a generated 440 Hz tone) and
plays the recording back into a WAV file, which the host analyses.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pyemb.snd_backend import BackendError, StreamParams, import_sounddevice, read_wav, wav_header
from tests.guest import boot_guest

RATE = 48000
NOTES = [(392.0, 0.25), (523.25, 0.25), (659.25, 0.25), (783.99, 0.5), (659.25, 0.25),
         (783.99, 0.75)]                                    # G4 C5 E5 G5 E5 G5


def tune() -> bytes:
    """The tune as a S16 stereo WAV file."""
    parts = []
    for freq, seconds in NOTES:
        t = np.arange(int(RATE * seconds)) / RATE
        envelope = np.minimum(1.0, np.minimum(t, t[::-1]) * 40)       # no clicks
        parts.append(0.4 * envelope * np.sin(2 * np.pi * freq * t))
    mono = (np.concatenate(parts) * 32767).astype("<i2")
    data = np.repeat(mono, 2).tobytes()
    return wav_header(StreamParams(0, "output", 2, "S16", RATE, 0, 0), len(data)) + data


def host_devices() -> tuple[bool, bool]:
    """Whether PortAudio sees a default output and a default input device."""
    try:
        sd = import_sounddevice()
    except BackendError:
        return False, False
    has = []
    for kind in ("output", "input"):
        try:
            sd.query_devices(kind=kind)
            has.append(True)
        except Exception:  # noqa: BLE001 - sounddevice raises ValueError or PortAudioError
            has.append(False)
    return has[0], has[1]


def run(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    has_output, has_input = host_devices()
    played = out_dir / "guest-tune-{n}.wav"
    echo = out_dir / "guest-recording-{n}.wav"
    for old in (*out_dir.glob("guest-tune-*.wav"), *out_dir.glob("guest-recording-*.wav")):
        old.unlink()
    playback = '"portaudio"' if has_output else f'{{ name = "wav", path = "{played}" }}'
    capture = '"portaudio"' if has_input else '{ name = "wav", tone = 440, amplitude = 0.5 }'
    config = out_dir / "demo-snd.toml"
    config.write_text(f"""
[[snd.streams]]
direction = "output"
formats = ["S16"]
rates = [{RATE}]
backend = {playback}

[[snd.streams]]
direction = "output"
formats = ["S16"]
rates = [{RATE}]
backend = {{ name = "wav", path = "{echo}" }}

[[snd.streams]]
direction = "input"
formats = ["S16"]
rates = [{RATE}]
backend = {capture}

[[snd.jacks]]
device = "headphone"
""")
    script = """
aplay -q -D hw:0,0,0 /tune.wav && echo "guest: aplay done"
arecord -q -D hw:0,0 -f S16_LE -c 2 -r 48000 -d 3 /tmp/rec.wav && echo "guest: arecord done"
aplay -q -D hw:0,0,1 /tmp/rec.wav && echo "guest: played the recording back"
amixer -c 0 controls | sed 's/^/guest: /'
"""
    print("== real guest (Debian 6.12 kernel, TCG): -device virtio-snd-py-pci")
    t0 = time.monotonic()
    result = boot_guest(["-device", f"virtio-snd-py-pci,config={config}"], script,
                        {"tune.wav": tune()})
    for line in result.console.splitlines():
        if line.startswith("guest:"):
            print(f"  {line}")
    print(f"  boot, play, record and power off took {time.monotonic() - t0:.1f} s")
    if result.rc != 0 or "arecord done" not in result.console:
        raise SystemExit(f"demo: the guest failed:\n{result.console}")
    if has_output:
        print("  the tune played on the host's default PortAudio output device")
    else:
        path = Path(str(played).format(n=1))
        seconds = len(read_wav(path).data) / (RATE * 4)
        print(f"  no host audio output: the tune ({seconds:.2f} s) is in {path}")
    recording = read_wav(Path(str(echo).format(n=1)))
    samples = np.frombuffer(recording.data, "<i2").reshape(-1, 2)[:, 0].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(samples))
    peak = np.argmax(spectrum[1:]) + 1
    level = 20 * np.log10(max(np.sqrt(np.mean(samples ** 2)) / 32768, 1e-9))
    source = "the host's default input" if has_input else "a 440 Hz test tone (no host input)"
    print(f"  recorded {len(samples) / RATE:.2f} s from {source}; heard mostly "
          f"{peak * RATE / len(samples):.0f} Hz at {level:.1f} dBFS")
