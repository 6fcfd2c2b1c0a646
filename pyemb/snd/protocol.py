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
EVENT = struct.Struct("<II")                 # virtio_snd_event {type, data}
CTL_EVENT = struct.Struct("<IHH")            # {type, control_id, mask}
CONFIG = struct.Struct("<IIII")              # jacks, streams, chmaps, controls

# Jacks
JACK_HDR = struct.Struct("<II")              # {code, jack_id}
JACK_REMAP = struct.Struct("<IIII")          # {code, jack_id, association, sequence}
JACK_INFO = struct.Struct("<IIIIB7x")        # {nid, features, defconf, caps, connected}
JACK_F_REMAP = 0

# PCM
PCM_INFO = struct.Struct("<IIQQBBB5x")       # virtio_snd_pcm_info
PCM_HDR = struct.Struct("<II")               # {code, stream_id}
PCM_SET_PARAMS = struct.Struct("<IIIIIBBBx")  # {code, id, buffer, period, features, ch, fmt, rate}
PCM_XFER = struct.Struct("<I")               # tx/rx {stream_id}
PCM_STATUS = struct.Struct("<II")            # {status, latency_bytes}


class PcmFeature(IntEnum):
    SHMEM_HOST = 0
    SHMEM_GUEST = 1
    MSG_POLLING = 2
    EVT_SHMEM_PERIODS = 3
    EVT_XRUNS = 4


# Channel maps
CHMAP_MAX_SIZE = 18
CHMAP_INFO = struct.Struct("<IBB18s")        # {nid, direction, channels, positions[18]}
CHMAP_POSITIONS = (
    "NONE", "NA", "MONO", "FL", "FR", "RL", "RR", "FC", "LFE", "SL", "SR", "RC",
    "FLC", "FRC", "RLC", "RRC", "FLW", "FRW", "FLH", "FCH", "FRH", "TC", "TFL",
    "TFR", "TFC", "TRL", "TRR", "TRC", "TFLC", "TFRC", "TSL", "TSR", "LLFE",
    "RLFE", "BC", "BLC", "BRC",
)
CHMAP_POSITION = {name: i for i, name in enumerate(CHMAP_POSITIONS)}

# Control elements (VIRTIO 1.3)
CTL_HDR = struct.Struct("<II")               # {code, control_id}
CTL_INFO = struct.Struct("<IIIIII44s4x24s")  # {nid, role, type, access, count, index, name, value}
CTL_INTEGER_RANGE = struct.Struct("<III")    # {min, max, step}
CTL_VALUE_SIZE = 512                         # virtio_snd_ctl_value
CTL_ENUM_ITEM_SIZE = 64


class CtlRole(IntEnum):
    UNDEFINED = 0
    VOLUME = 1
    MUTE = 2
    GAIN = 3


class CtlType(IntEnum):
    BOOLEAN = 0
    INTEGER = 1
    INTEGER64 = 2
    ENUMERATED = 3
    BYTES = 4
    IEC958 = 5


class CtlAccess(IntEnum):
    READ = 0
    WRITE = 1
    VOLATILE = 2
    INACTIVE = 3
    TLV_READ = 4
    TLV_WRITE = 5
    TLV_COMMAND = 6


CTL_EVT_MASK_VALUE = 0
CTL_EVT_MASK_INFO = 1
CTL_EVT_MASK_TLV = 2

# ALSA TLV (include/uapi/sound/tlv.h): {type, length in bytes, data...}
TLV_DB_SCALE = 1
TLV_DB_SCALE_MUTE = 0x10000


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


@dataclass(frozen=True)
class SetParams:
    """PCM_SET_PARAMS as the guest sent it (format and rate are bit indexes)."""

    stream_id: int
    buffer_bytes: int
    period_bytes: int
    features: int
    channels: int
    format: int
    rate: int

    def pack(self) -> bytes:
        return PCM_SET_PARAMS.pack(Code.PCM_SET_PARAMS, self.stream_id, self.buffer_bytes,
                                   self.period_bytes, self.features, self.channels,
                                   self.format, self.rate)

    @classmethod
    def unpack(cls, data: bytes) -> SetParams:
        _, sid, buffer_bytes, period_bytes, features, ch, fmt, rate = \
            PCM_SET_PARAMS.unpack(data)
        return cls(sid, buffer_bytes, period_bytes, features, ch, fmt, rate)


def status_reply(status: Status) -> bytes:
    return HDR.pack(status)


def event(code: Event, data: int) -> bytes:
    return EVENT.pack(code, data)
