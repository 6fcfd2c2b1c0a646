"""PCM sample formats: sizes, silence, and volume applied on the host side.

Every format pyemb advertises is little-endian linear PCM (or float), so one
numpy view per format is enough to scale samples without leaving C code.
The 3-byte packed formats (S24_3 ...) are widened to int32 for scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SampleFormat:
    name: str
    width: int                 # bytes per sample in memory
    dtype: str                 # numpy dtype of one sample ("" for packed 3-byte)
    signed: bool               # False: unsigned with a mid-scale zero
    bits: int                  # significant bits (S24 = 24 bits in a 32-bit word)

    @property
    def silence(self) -> bytes:
        """One sample of silence."""
        if self.signed or self.dtype.startswith("<f"):
            return bytes(self.width)
        mid = 1 << (self.bits - 1)
        return mid.to_bytes(self.width, "little")


SAMPLE_FORMATS = {f.name: f for f in (
    SampleFormat("S8", 1, "i1", True, 8),
    SampleFormat("U8", 1, "u1", False, 8),
    SampleFormat("S16", 2, "<i2", True, 16),
    SampleFormat("U16", 2, "<u2", False, 16),
    SampleFormat("S18_3", 3, "", True, 18),
    SampleFormat("U18_3", 3, "", False, 18),
    SampleFormat("S20_3", 3, "", True, 20),
    SampleFormat("U20_3", 3, "", False, 20),
    SampleFormat("S24_3", 3, "", True, 24),
    SampleFormat("U24_3", 3, "", False, 24),
    SampleFormat("S20", 4, "<i4", True, 20),
    SampleFormat("U20", 4, "<u4", False, 20),
    SampleFormat("S24", 4, "<i4", True, 24),
    SampleFormat("U24", 4, "<u4", False, 24),
    SampleFormat("S32", 4, "<i4", True, 32),
    SampleFormat("U32", 4, "<u4", False, 32),
    SampleFormat("FLOAT", 4, "<f4", True, 32),
    SampleFormat("FLOAT64", 8, "<f8", True, 64),
)}


def silence(fmt: SampleFormat, nbytes: int) -> bytes:
    """``nbytes`` of silence (nbytes a multiple of the sample width)."""
    return fmt.silence * (nbytes // fmt.width)


def _as_int32(data: memoryview | bytes, fmt: SampleFormat) -> np.ndarray:
    """3-byte packed little-endian samples as int32 (sign-extended)."""
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
    value = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
    if fmt.signed:
        value = np.where(value & 0x800000, value - 0x1000000, value)
    return value


def _from_int32(value: np.ndarray, fmt: SampleFormat) -> bytes:
    value = value.astype(np.int32) & 0xFFFFFF
    out = np.empty((len(value), 3), dtype=np.uint8)
    out[:, 0] = value & 0xFF
    out[:, 1] = (value >> 8) & 0xFF
    out[:, 2] = (value >> 16) & 0xFF
    return out.tobytes()


def unpack(data: memoryview | bytes, fmt: SampleFormat) -> np.ndarray:
    """The samples of ``data`` as numbers, as stored (3-byte formats as int32)."""
    if fmt.dtype:
        return np.frombuffer(data, dtype=fmt.dtype)
    return _as_int32(data, fmt)


def pack(values: np.ndarray, fmt: SampleFormat) -> bytes:
    """Numbers in the format's own range (already rounded and clipped) as its bytes."""
    if fmt.dtype:
        return values.astype(fmt.dtype).tobytes()
    return _from_int32(values.reshape(-1), fmt)


def to_float(data: bytes | memoryview, fmt: SampleFormat) -> np.ndarray:
    """Samples as float64 in [-1, 1)."""
    values = unpack(data, fmt).astype(np.float64)
    if fmt.dtype.startswith("<f"):
        return values
    if not fmt.signed:
        values = values - (1 << (fmt.bits - 1))
    return values / (1 << (fmt.bits - 1))


def from_float(values: np.ndarray, fmt: SampleFormat) -> bytes:
    """float samples in [-1, 1) as the format's bytes (clipped, rounded)."""
    if fmt.dtype.startswith("<f"):
        return pack(values, fmt)
    full = 1 << (fmt.bits - 1)
    ints = np.clip(np.rint(values * full), -full, full - 1)
    return pack(ints if fmt.signed else ints + full, fmt)


def scale(data: memoryview | bytes, fmt: SampleFormat, channels: int,
          gains: list[float]) -> bytes:
    """Samples multiplied by a gain per channel (0.0 = silence), as a copy.

    ``data`` holds whole frames.  Results are rounded and clipped to the
    format's range, so unity gain returns the input unchanged.
    """
    per_channel = np.asarray((list(gains) + [gains[-1]] * channels)[:channels])
    frames = unpack(data, fmt).reshape(-1, channels)
    if fmt.dtype.startswith("<f"):
        # + 0.0 turns the -0.0 of muted negative samples into silence; a
        # guest's inf or NaN samples stay what IEEE makes of them, unsaid.
        with np.errstate(invalid="ignore", over="ignore"):
            return pack(frames * per_channel + 0.0, fmt)
    wide = frames.astype(np.float64)
    if fmt.signed:
        lo, hi = -(1 << (fmt.bits - 1)), (1 << (fmt.bits - 1)) - 1
        scaled = np.clip(np.rint(wide * per_channel), lo, hi)
    else:
        mid = 1 << (fmt.bits - 1)
        scaled = np.clip(np.rint((wide - mid) * per_channel) + mid, 0, (1 << fmt.bits) - 1)
    return pack(scaled, fmt)
