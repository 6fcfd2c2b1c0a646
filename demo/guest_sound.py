"""The sound part of the demo, host side: what a guest plays and records
through virtio-snd-py-pci, and what the host makes of it.

Each guest plays a short tune with aplay (guest 2 a fourth lower).  It goes
to the host's default PortAudio output, or into a WAV file where the host
has no audio device.  Meanwhile it records three seconds with arecord from
the capture stream (the host's default PortAudio input, or a generated
tone: 440 Hz for guest 1, 660 Hz for guest 2) and then plays the recording
back into a WAV file, which the host analyses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pyemb.snd_backend import BackendError, StreamParams, import_sounddevice, read_wav, wav_header

RATE = 48000
NOTES = [(392.0, 0.25), (523.25, 0.25), (659.25, 0.25), (783.99, 0.5), (659.25, 0.25),
         (783.99, 0.75)]                                    # G4 C5 E5 G5 E5 G5
TRANSPOSE = {1: 1.0, 2: 0.75}                               # guest 2: a fourth lower
TONE = {1: 440, 2: 660}                                     # what each guest hears
RECORD_SECONDS = 3

# Sourced by the guest's script: START before the video decode, FINISH after.
# Playback is paced in real time by the host while the guest decodes.
START = f"""
aplay -q -D hw:0,0,0 /tune.wav 2>/tmp/aplay.err & player=$!
arecord -q -D hw:0,0 -f S16_LE -c 2 -r {RATE} -d {RECORD_SECONDS} /tmp/rec.wav 2>/tmp/arecord.err &
recorder=$!
"""
FINISH = r"""
if wait $player; then echo "guest: aplay done"
else echo "guest: aplay failed:" $(cat /tmp/aplay.err); fi
if wait $recorder; then echo "guest: arecord done"
else echo "guest: arecord failed:" $(cat /tmp/arecord.err); fi
aplay -q -D hw:0,0,1 /tmp/rec.wav && echo "guest: played the recording back"
echo "guest: $(amixer -c 0 controls | wc -l) mixer controls:" \
    "$(amixer -c 0 controls | sed -n "s/.*name='\([^']*\)'.*/\1/p" | sort -u | paste -sd,)"
"""


def tune(transpose: float = 1.0) -> bytes:
    """The tune as a S16 stereo WAV file."""
    parts = []
    for freq, seconds in NOTES:
        t = np.arange(int(RATE * seconds)) / RATE
        envelope = np.minimum(1.0, np.minimum(t, t[::-1]) * 40)       # no clicks
        parts.append(0.4 * envelope * np.sin(2 * np.pi * freq * transpose * t))
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


class GuestSound:
    """One guest's sound card: its config, files and the host's report."""

    def __init__(self, out_dir: Path, guest: int, has_output: bool, has_input: bool) -> None:
        self.guest, self.has_output, self.has_input = guest, has_output, has_input
        self.restarts: dict[Path, int] = {}          # WAV file: underruns aplay got over
        self.played = out_dir / f"guest{guest}-tune.wav"
        self.echo = out_dir / f"guest{guest}-recording.wav"
        self.config = out_dir / f"guest{guest}-snd.toml"
        self.tune = tune(TRANSPOSE[guest])
        for path in (self.played, self.echo):
            for old in (path, *path.parent.glob(f"{path.stem}-*.wav")):
                old.unlink(missing_ok=True)
        # The WAV backend starts a file at each PREPARE: see collect().
        playback = ('"portaudio"' if has_output else
                    f'{{ name = "wav", path = "{str(self.played)[:-4]}-{{n}}.wav" }}')
        capture = ('"portaudio"' if has_input else
                   f'{{ name = "wav", tone = {TONE[guest]}, amplitude = 0.5 }}')
        self.config.write_text(f"""
[[snd.streams]]
direction = "output"
formats = ["S16"]
rates = [{RATE}]
backend = {playback}

[[snd.streams]]
direction = "output"
formats = ["S16"]
rates = [{RATE}]
backend = {{ name = "wav", path = "{str(self.echo)[:-4]}-{{n}}.wav" }}

[[snd.streams]]
direction = "input"
formats = ["S16"]
rates = [{RATE}]
backend = {capture}

[[snd.jacks]]
device = "headphone"
""")

    def device_args(self) -> list[str]:
        return ["-device", f"virtio-snd-py-pci,config={self.config}"]

    def collect(self) -> None:
        """Give the files the WAV backend wrote their final names.

        The backend starts a file at each PREPARE.  aplay prepares again
        after an underrun (when the guest, busy decoding on a loaded host,
        did not refill the ~170 ms buffer in time) and goes on from where
        it was, so the pieces joined hold every sample the guest sent."""
        self.restarts = {}
        for path in (self.played, self.echo):
            pieces = []
            while (piece := path.with_name(f"{path.stem}-{len(pieces) + 1}.wav")).exists():
                pieces.append(piece)
            if not pieces:
                continue
            if len(pieces) == 1:
                pieces[0].replace(path)
            else:
                data = b"".join(read_wav(piece).data for piece in pieces)
                params = StreamParams(0, "output", 2, "S16", RATE, 0, 0)
                path.write_bytes(wav_header(params, len(data)) + data)
                for piece in pieces:
                    piece.unlink()
            self.restarts[path] = len(pieces) - 1

    def _underruns(self, path: Path) -> str:
        n = self.restarts.get(path, 0)
        return (f"; aplay underran {n} time{'s' * (n > 1)} and carried on (the WAV "
                "has every sample, a speaker would have had a gap)") if n else ""

    def report(self) -> list[str]:
        """What the host heard, one line each; raises SystemExit if nothing came."""
        lines = []
        if self.has_output:
            lines.append("the tune played on the host's default PortAudio output device")
        else:
            got = read_wav(self.played).data
            sent = read_wav_bytes(self.tune)
            # aplay fills its last period with silence.
            padding = got[len(sent):]
            if got[:len(sent)] == sent and not padding.strip(b"\0"):
                same = (f"bit-exact with the tune sent in (+{len(padding) // 4} frames of "
                        "silence aplay pads its last period with)")
            else:     # seen once in 30 runs: aplay failed while the guest decoded
                same = (f"NOT the tune sent in ({len(got)} vs {len(sent)} bytes: "
                        "aplay stopped early, see above)")
            lines.append(f"the tune it played ({len(got) / (RATE * 4):.2f} s), {same}"
                         f"{self._underruns(self.played)}: {self.played}")
        recording = read_wav(self.echo)
        samples = np.frombuffer(recording.data, "<i2").reshape(-1, 2)[:, 0].astype(np.float64)
        if not len(samples):
            raise SystemExit(f"demo: guest {self.guest} played back an empty recording")
        spectrum = np.abs(np.fft.rfft(samples))
        peak = np.argmax(spectrum[1:]) + 1
        level = 20 * np.log10(max(np.sqrt(np.mean(samples ** 2)) / 32768, 1e-9))
        source = ("the host's default input" if self.has_input
                  else f"a {TONE[self.guest]} Hz test tone (no host input)")
        lines.append(f"recorded {len(samples) / RATE:.2f} s from {source}, played it back: "
                     f"mostly {peak * RATE / len(samples):.0f} Hz at {level:.1f} dBFS"
                     f"{self._underruns(self.echo)}: {self.echo}")
        return lines


def read_wav_bytes(blob: bytes) -> bytes:
    """The samples of an in-memory WAV file made by :func:`tune`."""
    return blob[len(wav_header(StreamParams(0, "output", 2, "S16", RATE, 0, 0), 0)):]
