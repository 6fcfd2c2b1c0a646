"""virtio-snd wire format (VIRTIO 1.2 section 5.14, control elements from 1.3).

Only structs and constants live here; see ../shared/protocols/virtio-snd.md.
All integers are little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

DEVICE_ID = 25

# Virtqueues
CONTROL_QUEUE, EVENT_QUEUE, TX_QUEUE, RX_QUEUE = range(4)

# Feature bits
F_CTLS = 0


class Code(IntEnum):
    JACK_INFO = 0x0001
    JACK_REMAP = 0x0002
    PCM_INFO = 0x0100
    PCM_SET_PARAMS = 0x0101
    PCM_PREPARE = 0x0102
    PCM_RELEASE = 0x0103
    PCM_START = 0x0104
    PCM_STOP = 0x0105
    CHMAP_INFO = 0x0200
    CTL_INFO = 0x0300
    CTL_ENUM_ITEMS = 0x0301
    CTL_READ = 0x0302
    CTL_WRITE = 0x0303
    CTL_TLV_READ = 0x0304
    CTL_TLV_WRITE = 0x0305
    CTL_TLV_COMMAND = 0x0306


class Event(IntEnum):
    JACK_CONNECTED = 0x1000
    JACK_DISCONNECTED = 0x1001
    PCM_PERIOD_ELAPSED = 0x1100
    PCM_XRUN = 0x1101
    CTL_NOTIFY = 0x1200


class Status(IntEnum):
    OK = 0x8000
    BAD_MSG = 0x8001
    NOT_SUPP = 0x8002
    IO_ERR = 0x8003


class Direction(IntEnum):
    OUTPUT = 0
    INPUT = 1


# PCM sample formats: bit index in the PCM_INFO `formats` bitmap.
FORMATS = (
    "IMA_ADPCM", "MU_LAW", "A_LAW", "S8", "U8", "S16", "U16", "S18_3", "U18_3",
    "S20_3", "U20_3", "S24_3", "U24_3", "S20", "U20", "S24", "U24", "S32", "U32",
    "FLOAT", "FLOAT64", "DSD_U8", "DSD_U16", "DSD_U32", "IEC958_SUBFRAME",
)
FORMAT_INDEX = {name: i for i, name in enumerate(FORMATS)}

# PCM frame rates: bit index in the PCM_INFO `rates` bitmap.
RATES = (5512, 8000, 11025, 16000, 22050, 32000, 44100, 48000, 64000, 88200,
         96000, 176400, 192000, 384000)
RATE_INDEX = {rate: i for i, rate in enumerate(RATES)}

HDR = struct.Struct("<I")                    # virtio_snd_hdr {code}
QUERY_INFO = struct.Struct("<IIII")          # {code, start_id, count, size}
PCM_INFO = struct.Struct("<IIQQBBB5x")       # virtio_snd_pcm_info
PCM_HDR = struct.Struct("<II")               # {code, stream_id}
PCM_XFER = struct.Struct("<I")               # tx/rx {stream_id}
PCM_STATUS = struct.Struct("<II")            # {status, latency_bytes}
CONFIG = struct.Struct("<IIII")              # jacks, streams, chmaps, controls


@dataclass(frozen=True)
class PcmInfo:
    """One PCM_INFO item."""

    direction: Direction
    channels_min: int
    channels_max: int
    formats: int                 # bitmap over FORMATS
    rates: int                   # bitmap over RATES
    features: int = 0
    hda_fn_nid: int = 0

    def pack(self) -> bytes:
        return PCM_INFO.pack(self.hda_fn_nid, self.features, self.formats, self.rates,
                             self.direction, self.channels_min, self.channels_max)

    @classmethod
    def unpack(cls, data: bytes) -> PcmInfo:
        nid, features, formats, rates, direction, cmin, cmax = PCM_INFO.unpack_from(data)
        return cls(Direction(direction), cmin, cmax, formats, rates, features, nid)


def status_reply(status: Status) -> bytes:
    return HDR.pack(status)
