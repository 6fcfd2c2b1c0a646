"""virtio-snd control requests parsed once into typed values, as
:mod:`pyemb.video.commands` does for virtio-video (crosvm's ``command.rs``
is the model): a handler gets named fields, never byte offsets, and a
request of the wrong size fails here with VIRTIO_SND_S_BAD_MSG.

What a request says about itself is checked here (its size for its code);
what depends on the device (whether the stream, jack or control element
exists, whether control elements were negotiated) is the device's.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyemb.device import ProtocolError
from pyemb.snd import protocol as p


@dataclass(frozen=True)
class Command:
    code: p.Code


@dataclass(frozen=True)
class Query(Command):
    """JACK_INFO, PCM_INFO, CHMAP_INFO, CTL_INFO: items [start_id, start_id + count)."""

    start_id: int
    count: int
    size: int               # of one item, as the driver expects it


@dataclass(frozen=True)
class JackRemap(Command):
    jack_id: int
    association: int
    sequence: int


@dataclass(frozen=True)
class PcmCommand(Command):
    """PCM_PREPARE, PCM_RELEASE, PCM_START, PCM_STOP."""

    stream_id: int


@dataclass(frozen=True)
class PcmSetParams(Command):
    params: p.SetParams

    @property
    def stream_id(self) -> int:
        return self.params.stream_id


@dataclass(frozen=True)
class CtlCommand(Command):
    """The control element requests; ``value`` is CTL_WRITE's
    virtio_snd_ctl_value (empty for the others)."""

    control_id: int
    value: bytes = b""


QUERIES = {p.Code.JACK_INFO, p.Code.PCM_INFO, p.Code.CHMAP_INFO, p.Code.CTL_INFO}
PCM_OPS = {p.Code.PCM_PREPARE, p.Code.PCM_RELEASE, p.Code.PCM_START, p.Code.PCM_STOP}
# Control element requests that are the header alone; CTL_WRITE carries a
# value; the TLV writes are refused whatever follows (NOT_SUPP).
CTL_HEADER_ONLY = {p.Code.CTL_READ, p.Code.CTL_TLV_READ}
CTL_ANY_SIZE = {p.Code.CTL_ENUM_ITEMS, p.Code.CTL_TLV_WRITE, p.Code.CTL_TLV_COMMAND}


# One byte more than the largest control request: a longer one still reads
# as the wrong size, and no more of it is copied.
MAX_COMMAND_BYTES = max(p.QUERY_INFO.size, p.JACK_REMAP.size, p.PCM_SET_PARAMS.size,
                        p.PCM_HDR.size, p.CTL_HDR.size + p.CTL_VALUE_SIZE) + 1


def _exactly(command: bytes, size: int, what: str) -> None:
    if len(command) != size:
        raise ProtocolError(p.Status.BAD_MSG, f"{what} of wrong size")


def parse(command: bytes) -> Command:
    """The control request ``command`` as a typed value."""
    if len(command) < p.HDR.size:
        raise ProtocolError(p.Status.BAD_MSG, "short control request")
    (raw,) = p.HDR.unpack_from(command)
    try:
        code = p.Code(raw)
    except ValueError:
        raise ProtocolError(p.Status.BAD_MSG, f"unknown request 0x{raw:x}") from None
    if code in QUERIES:
        _exactly(command, p.QUERY_INFO.size, "query")
        _, start, count, size = p.QUERY_INFO.unpack(command)
        return Query(code, start, count, size)
    if code == p.Code.JACK_REMAP:
        _exactly(command, p.JACK_REMAP.size, "JACK_REMAP")
        _, jack_id, association, sequence = p.JACK_REMAP.unpack(command)
        return JackRemap(code, jack_id, association, sequence)
    if code == p.Code.PCM_SET_PARAMS:
        _exactly(command, p.PCM_SET_PARAMS.size, "PCM_SET_PARAMS")
        return PcmSetParams(code, p.SetParams.unpack(command))
    if code in PCM_OPS:
        _exactly(command, p.PCM_HDR.size, "PCM request")
        return PcmCommand(code, p.PCM_HDR.unpack(command)[1])
    # The control element requests.
    if len(command) < p.CTL_HDR.size:
        raise ProtocolError(p.Status.BAD_MSG, "short control element request")
    control_id = p.CTL_HDR.unpack_from(command)[1]
    if code in CTL_HEADER_ONLY:
        _exactly(command, p.CTL_HDR.size, code.name)
    elif code == p.Code.CTL_WRITE:
        _exactly(command, p.CTL_HDR.size + p.CTL_VALUE_SIZE, "CTL_WRITE")
        return CtlCommand(code, control_id, command[p.CTL_HDR.size:])
    return CtlCommand(code, control_id)
