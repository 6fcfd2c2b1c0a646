"""Audio engines for virtio-snd-py, one class per host system.

A backend is chosen per device with ``backend=module:Class`` (or
``backend = "module:Class"`` in the TOML config).  The interface is the one
below; every method but ``write`` and ``read`` has a do-nothing default, so
the smallest backend is a few lines.  The sound device model
(:mod:`pyemb.snd.device`) owns the protocol, the state machine and pacing;
a backend only moves PCM frames.

Status: the foundation provides the interface and the null backend; the
PortAudio (sounddevice) and WAV backends come with the virtio-snd issue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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


class SndBackend:
    """Interface of an audio engine.  Construct with the device's config."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = config or {}

    def set_parameters(self, params: StreamParams) -> None:
        """Remember the stream's parameters; raise ValueError if unsupported."""

    def prepare(self, stream_id: int) -> None:
        """Open host resources for the stream."""

    def start(self, stream_id: int) -> None:
        """Begin consuming (playback) or producing (capture) frames."""

    def stop(self, stream_id: int) -> None:
        """Stop after every frame written so far has reached the sink."""

    def release(self, stream_id: int) -> None:
        """Close host resources for the stream."""

    def write(self, stream_id: int, frames: memoryview) -> None:
        """Play ``frames`` (guest memory, valid only during the call)."""
        raise NotImplementedError

    def read(self, stream_id: int, frames: memoryview) -> None:
        """Fill ``frames`` with captured audio."""
        raise NotImplementedError

    def close(self) -> None:
        """Release everything; the device is going away."""


class NullBackend(SndBackend):
    """Discards playback and captures silence."""

    def write(self, stream_id: int, frames: memoryview) -> None:
        pass

    def read(self, stream_id: int, frames: memoryview) -> None:
        frames[:] = bytes(len(frames))
