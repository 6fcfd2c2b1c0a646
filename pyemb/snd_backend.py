"""Audio engines for virtio-snd-py: one backend object per PCM stream.

A stream's backend is chosen in the TOML config, per stream::

    [[snd.streams]]
    direction = "output"
    backend = "portaudio"                 # or "wav", "null", "module:Class"
    # or with options:
    backend = { name = "wav", path = "/tmp/out-{stream}-{n}.wav" }

or for every stream without its own with ``-device ...,backend=module:Class``.
The device model (:mod:`pyemb.snd.stream`) owns the protocol, the state
machine and the pacing; a backend only moves whole PCM frames:

- ``open(params)`` at PCM_PREPARE, ``start()`` / ``stop()`` at PCM_START /
  PCM_STOP, ``close()`` at PCM_RELEASE and device reset;
- ``write(frames)`` (playback) hands over frames the moment the host needs
  them; ``read(frames)`` (capture) fills a buffer with captured audio.

A backend whose ``write``/``read`` block at the stream's real rate (a sound
card does) sets ``clocked = True``; otherwise the stream paces the calls
with its own clock.  ``stop()`` returns once every frame written has been
played.  Errors: raise :class:`BackendError` (the guest gets IO_ERR and a
PCM_XRUN event) or ``ValueError`` from ``open`` for parameters the host
cannot take (NOT_SUPP).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pyemb.config import ConfigError
from pyemb.snd.pcm import SAMPLE_FORMATS, SampleFormat, from_float, silence, to_float


class BackendError(Exception):
    """The host audio path failed; the stream reports IO_ERR / XRUN."""


@dataclass(frozen=True)
class StreamParams:
    """What PCM_SET_PARAMS fixed for a stream."""

    stream_id: int
    direction: str            # "output" (playback) or "input" (capture)
    channels: int
    format: str               # a name from pyemb.snd.protocol.FORMATS
    rate: int                 # frames per second
    buffer_bytes: int
    period_bytes: int

    @property
    def sample(self) -> SampleFormat:
        return SAMPLE_FORMATS[self.format]

    @property
    def frame_bytes(self) -> int:
        return self.sample.width * self.channels


class SndBackend:
    """Interface of an audio engine for one stream; defaults do nothing."""

    clocked = False
    # True if write() may get a period in pieces that are not whole frames
    # (the guest's pages), which spares gathering them first.
    takes_fragments = False

    def __init__(self, options: Mapping[str, Any], stream_id: int, direction: str) -> None:
        self.options = dict(options)
        self.stream_id = stream_id
        self.direction = direction
        self.params: StreamParams | None = None

    def open(self, params: StreamParams) -> None:
        """Get host resources for these parameters (PCM_PREPARE)."""
        self.params = params

    def start(self) -> None:
        """Frames start to flow (PCM_START)."""

    def stop(self) -> None:
        """Return once everything written so far is audible (PCM_STOP)."""

    def close(self) -> None:
        """Give the host resources back (PCM_RELEASE, reset, unplug)."""
        self.params = None

    def write(self, frames: memoryview | bytes) -> None:
        """Play whole frames (a view over guest memory, valid during the call)."""
        raise BackendError(f"{type(self).__name__} cannot play")

    def read(self, frames: memoryview) -> None:
        """Fill ``frames`` (whole frames) with captured audio."""
        raise BackendError(f"{type(self).__name__} cannot capture")

    def queued_frames(self) -> int:
        """Frames handed to the host that are not audible yet."""
        return 0


def _option(options: Mapping[str, Any], key: str, kinds: tuple[type, ...],
            where: str, default: Any = None) -> Any:
    value = options.get(key, default)
    if value is None:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ConfigError(f"config: {where}.{key} has the wrong type")
    return value


def _check_options(options: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(options) - known - {"name"})
    if unknown:
        raise ConfigError(f"config: {where}: unknown option {unknown[0]!r} "
                          f"(known: {', '.join(sorted(known)) or 'none'})")


class NullBackend(SndBackend):
    """Discards playback and captures silence, both paced by the stream."""

    takes_fragments = True

    def __init__(self, options: Mapping[str, Any], stream_id: int, direction: str) -> None:
        super().__init__(options, stream_id, direction)
        _check_options(options, set(), f"snd.streams[{stream_id}].backend")

    def write(self, frames: memoryview | bytes) -> None:
        pass

    def read(self, frames: memoryview) -> None:
        assert self.params is not None
        frames[:] = silence(self.params.sample, len(frames))


# -- WAV files ------------------------------------------------------------------
WAVE_PCM, WAVE_FLOAT, WAVE_EXTENSIBLE = 1, 3, 0xFFFE


def wav_header(params: StreamParams, data_bytes: int) -> bytes:
    """RIFF/WAVE header for ``data_bytes`` of the stream's exact samples.

    WAV has no tag for signed 8-bit or unsigned 16/32-bit samples; those are
    written as they came with the nearest header (the data is what matters).
    """
    fmt = params.sample
    tag = WAVE_FLOAT if fmt.name.startswith("FLOAT") else WAVE_PCM
    block = params.frame_bytes
    fmt_chunk = struct.pack("<HHIIHH", tag, params.channels, params.rate,
                            params.rate * block, block, fmt.width * 8)
    return (b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt_chunk) + 8 + data_bytes) + b"WAVE"
            + b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk
            + b"data" + struct.pack("<I", data_bytes))


@dataclass
class WavData:
    """A WAV file's samples and format."""

    channels: int
    rate: int
    format: str
    data: bytes


def read_wav(path: str | Path) -> WavData:
    """Parse a PCM or float WAV file (any chunk order, extensible headers)."""
    blob = Path(path).read_bytes()
    if blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a RIFF/WAVE file")
    pos, fmt_chunk, data = 12, None, None
    while pos + 8 <= len(blob):
        cid, size = blob[pos:pos + 4], struct.unpack_from("<I", blob, pos + 4)[0]
        body = blob[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            fmt_chunk = body
        elif cid == b"data":
            data = body
        pos += 8 + size + (size & 1)
    if fmt_chunk is None or data is None:
        raise ValueError(f"{path}: no fmt or data chunk")
    tag, channels, rate, _, block, bits = struct.unpack_from("<HHIIHH", fmt_chunk)
    if tag == WAVE_EXTENSIBLE and len(fmt_chunk) >= 26:
        tag = struct.unpack_from("<H", fmt_chunk, 24)[0]
    width = block // max(channels, 1)
    names = {(WAVE_PCM, 1): "U8", (WAVE_PCM, 2): "S16", (WAVE_PCM, 3): "S24_3",
             (WAVE_PCM, 4): "S32", (WAVE_FLOAT, 4): "FLOAT", (WAVE_FLOAT, 8): "FLOAT64"}
    if (tag, width) not in names:
        raise ValueError(f"{path}: unsupported WAV format tag {tag}, {bits} bits")
    data = data[:len(data) - len(data) % block]
    return WavData(channels, rate, names[(tag, width)], data)


def convert_pcm(src: WavData, params: StreamParams) -> bytes:
    """Audio from a WAV file in the stream's format, channels and rate.

    The same format is passed through untouched (bit-exact); otherwise the
    samples go through float: channels are dropped or repeated, rates are
    converted by nearest sample (good enough for a test source).
    """
    if (src.format, src.channels, src.rate) == (params.format, params.channels, params.rate):
        return src.data
    x = to_float(src.data, SAMPLE_FORMATS[src.format]).reshape(-1, src.channels)
    x = x[:, [min(c, src.channels - 1) for c in range(params.channels)]]
    if src.rate != params.rate:
        idx = (np.arange(int(len(x) * params.rate / src.rate)) * src.rate // params.rate)
        x = x[idx]
    return from_float(x.reshape(-1), params.sample)


class WavBackend(SndBackend):
    """Playback into WAV files; capture from a WAV file or a generated tone.

    Options: ``path`` — playback: where to write, ``{stream}`` and ``{n}``
    (a counter of PREPAREs) are filled in, default
    ``pyemb-stream{stream}-{n}.wav``; capture: the file to play into the
    guest.  Capture without a path plays ``tone`` Hz (default 440) at
    ``amplitude`` (default 0.5).  ``loop = true`` repeats a capture file.
    """

    takes_fragments = True

    def __init__(self, options: Mapping[str, Any], stream_id: int, direction: str) -> None:
        super().__init__(options, stream_id, direction)
        where = f"snd.streams[{stream_id}].backend"
        _check_options(options, {"path", "tone", "amplitude", "loop"}, where)
        self.path = _option(options, "path", (str,), where)
        self.tone = float(_option(options, "tone", (int, float), where, 440.0))
        self.amplitude = float(_option(options, "amplitude", (int, float), where, 0.5))
        self.loop = bool(_option(options, "loop", (bool,), where, False))
        if direction == "input" and self.path and not Path(self.path).is_file():
            raise ConfigError(f"config: {where}.path: no such file {self.path}")
        self.sessions = 0
        self.last_written: Path | None = None  # the playback file of the last PREPARE
        self._file: BinaryIO | None = None
        self._data_bytes = 0
        self._source = b""
        self._pos = 0
        self._phase = 0

    def open(self, params: StreamParams) -> None:
        self.close()
        super().open(params)
        self.sessions += 1
        if params.direction == "output":
            template = self.path or "pyemb-stream{stream}-{n}.wav"
            path = Path(template.format(stream=self.stream_id, n=self.sessions))
            try:
                self._file = path.open("wb")
            except OSError as e:
                raise BackendError(f"cannot write {path}: {e.strerror}") from None
            self._file.write(wav_header(params, 0))
            self._data_bytes = 0
            self.last_written = path      # (one, not a list: a guest's PREPAREs never end)
        elif self.path:
            try:
                self._source = convert_pcm(read_wav(self.path), params)
            except (OSError, ValueError) as e:
                raise BackendError(f"cannot read {self.path}: {e}") from None
            self._pos = 0

    def write(self, frames: memoryview | bytes) -> None:
        if self._file is None:
            raise BackendError("WAV playback file is not open")
        self._file.write(frames)
        self._data_bytes += len(frames)

    def read(self, frames: memoryview) -> None:
        params = self.params
        assert params is not None
        if not self.path:
            n = len(frames) // params.frame_bytes
            t = (self._phase + np.arange(n)) / params.rate
            wave = self.amplitude * np.sin(2 * math.pi * self.tone * t)
            self._phase += n
            frames[:] = from_float(np.repeat(wave, params.channels), params.sample)
            return
        done = 0
        while done < len(frames):
            if self._pos >= len(self._source):
                if not (self.loop and self._source):
                    frames[done:] = silence(params.sample, len(frames) - done)
                    return
                self._pos = 0
            n = min(len(frames) - done, len(self._source) - self._pos)
            frames[done:done + n] = self._source[self._pos:self._pos + n]
            done += n
            self._pos += n

    def close(self) -> None:
        if self._file is not None:
            # Patch the sizes in: a reader sees exactly the frames written.
            assert self.params is not None
            self._file.seek(0)
            self._file.write(wav_header(self.params, self._data_bytes))
            self._file.close()
            self._file = None
        super().close()


# -- PortAudio through sounddevice ------------------------------------------------
# Guest formats PortAudio takes as they are; the others are converted.
_PORTAUDIO_DTYPES = {"S8": "int8", "U8": "uint8", "S16": "int16", "S24_3": "int24",
                     "S32": "int32", "FLOAT": "float32"}


def import_sounddevice() -> Any:
    """sounddevice, or a BackendError that says what to install."""
    try:
        import sounddevice
    except (ImportError, OSError) as e:
        raise BackendError(
            f"PortAudio is not available ({e}); install libportaudio2 and sounddevice"
        ) from None
    return sounddevice


class PortAudioBackend(SndBackend):
    """The host's sound card through PortAudio (``sounddevice``), blocking I/O.

    Options: ``device`` (a name substring or an index; default: PortAudio's
    default device), ``latency`` ("low", "high" or seconds; default "low").
    Formats the device cannot take are converted to float32 on the host.
    """

    clocked = True

    def __init__(self, options: Mapping[str, Any], stream_id: int, direction: str) -> None:
        super().__init__(options, stream_id, direction)
        where = f"snd.streams[{stream_id}].backend"
        _check_options(options, {"device", "latency"}, where)
        self.device = _option(options, "device", (str, int), where)
        latency = _option(options, "latency", (str, int, float), where, "low")
        if isinstance(latency, str) and latency not in ("low", "high"):
            raise ConfigError(f"config: {where}.latency must be \"low\", \"high\" or seconds")
        self.latency = latency
        self._stream: Any = None
        self._convert = False

    def open(self, params: StreamParams) -> None:
        self.close()
        super().open(params)
        sd = import_sounddevice()
        native = _PORTAUDIO_DTYPES.get(params.format)
        kind = sd.RawOutputStream if params.direction == "output" else sd.RawInputStream
        last_error: Exception | None = None
        for dtype in ([native] if native else []) + ["float32"]:
            try:
                self._stream = kind(samplerate=params.rate, channels=params.channels,
                                    dtype=dtype, device=self.device, latency=self.latency,
                                    blocksize=params.period_bytes // params.frame_bytes)
            except (sd.PortAudioError, ValueError) as e:
                last_error = e
                continue
            self._convert = dtype != native
            return
        raise BackendError(f"PortAudio cannot open {params.channels} ch {params.format} "
                           f"{params.rate} Hz on {self.device or 'the default device'}: "
                           f"{last_error}")

    def start(self) -> None:
        if self._stream is not None and not self._stream.active:
            self._call(self._stream.start)

    def stop(self) -> None:
        if self._stream is not None and self._stream.active:
            self._call(self._stream.stop)       # Pa_StopStream plays out what is queued

    def close(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            try:
                stream.abort(ignore_errors=True)
                stream.close(ignore_errors=True)
            except Exception:  # noqa: BLE001 - a vanished device still gets closed
                pass
        super().close()

    def write(self, frames: memoryview | bytes) -> None:
        if self._stream is None:
            raise BackendError("PortAudio stream is not open")
        assert self.params is not None
        data: Any = frames
        if self._convert:
            data = to_float(frames, self.params.sample).astype(np.float32).tobytes()
        self._call(self._stream.write, data)

    def read(self, frames: memoryview) -> None:
        if self._stream is None:
            raise BackendError("PortAudio stream is not open")
        params = self.params
        assert params is not None
        data, _overflowed = self._call(self._stream.read, len(frames) // params.frame_bytes)
        if self._convert:
            values = np.frombuffer(data, dtype=np.float32).astype(np.float64)
            frames[:] = from_float(values, params.sample)
        else:
            frames[:] = data

    def queued_frames(self) -> int:
        stream = self._stream
        if stream is None or self.params is None:
            return 0
        try:
            return int(stream.latency * self.params.rate)
        except Exception:  # noqa: BLE001
            return 0

    def _call(self, fn: Any, *args: Any) -> Any:
        sd = import_sounddevice()
        try:
            return fn(*args)
        except sd.PortAudioError as e:
            raise BackendError(f"PortAudio: {e}") from None


BACKENDS: dict[str, type[SndBackend]] = {
    "null": NullBackend,
    "wav": WavBackend,
    "portaudio": PortAudioBackend,
}
