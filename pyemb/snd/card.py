"""The card's shape from the ``[snd]`` table of the TOML config.

::

    [[snd.streams]]                  # one table per PCM stream, in id order
    direction = "output"             # or "input"
    channels = [1, 2]                # [min, max] within 1..8
    formats = ["S16", "S32", "FLOAT"]
    rates = [44100, 48000]
    backend = "portaudio"            # "wav", "null", "module:Class" or a table
    chmaps = ["mono", "stereo"]      # default: every standard layout that fits
    volume = true                    # control elements (default true)
    mute = true
    nid = 0                          # HDA function group: streams with one nid
                                     # form one ALSA PCM device in Linux
    [[snd.jacks]]
    device = "headphone"             # line-out, speaker, headphone, line-in, mic
    connected = true
    nid = 0
    remap = false

Every mistake is a :class:`ConfigError` with one line that says what to fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pyemb.config import ConfigError, import_class
from pyemb.snd import protocol as p
from pyemb.snd_backend import BACKENDS, SndBackend

DEFAULT_STREAMS: tuple[dict[str, Any], ...] = (
    {"direction": "output", "channels": [1, 2],
     "formats": ["U8", "S8", "S16", "S24", "S32", "FLOAT"], "rates": [44100, 48000]},
    {"direction": "input", "channels": [1, 2],
     "formats": ["U8", "S8", "S16", "S24", "S32", "FLOAT"], "rates": [44100, 48000]},
)

# Standard layouts in ALSA's channel order.
CHMAP_LAYOUTS = {
    "mono": ("MONO",),
    "stereo": ("FL", "FR"),
    "2.1": ("FL", "FR", "LFE"),
    "quad": ("FL", "FR", "RL", "RR"),
    "5.1": ("FL", "FR", "RL", "RR", "FC", "LFE"),
    "7.1": ("FL", "FR", "RL", "RR", "FC", "LFE", "SL", "SR"),
}
DEFAULT_CHMAPS = ("mono", "stereo", "5.1", "7.1")

# HDA default device of a pin (bits 23:20 of the pin configuration) and
# whether it plays (out) or records.
JACK_DEVICES = {"line-out": (0x0, True), "speaker": (0x1, True), "headphone": (0x2, True),
                "line-in": (0x8, False), "mic": (0xA, False)}

# Stream features pyemb serves: XRUN events.  Not MSG_POLLING: with it the
# Linux driver stops notifying the tx/rx queues and expects the device to
# poll them, while QEMU devices run on notifications.
PCM_FEATURES = 1 << p.PcmFeature.EVT_XRUNS


@dataclass
class StreamConfig:
    index: int
    info: p.PcmInfo
    backend_class: type[SndBackend]
    backend_options: dict[str, Any]
    chmaps: list[tuple[str, ...]]
    volume: bool
    mute: bool

    @property
    def output(self) -> bool:
        return self.info.direction == p.Direction.OUTPUT


@dataclass
class JackConfig:
    nid: int
    defconf: int
    caps: int
    connected: bool
    remap: bool

    def info(self, connected: bool) -> bytes:
        features = 1 << p.JACK_F_REMAP if self.remap else 0
        return p.JACK_INFO.pack(self.nid, features, self.defconf, self.caps, int(connected))


@dataclass
class CardConfig:
    streams: list[StreamConfig]
    jacks: list[JackConfig] = field(default_factory=list)


def _list(table: Mapping[str, Any], key: str, default: Any, where: str) -> list[Any]:
    value = table.get(key, default)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config: {where}.{key} must be an array")
    return list(value)


def _bool(table: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"config: {where}.{key} must be true or false")
    return value


def _nid(table: Mapping[str, Any], where: str) -> int:
    nid = table.get("nid", 0)
    if isinstance(nid, bool) or not isinstance(nid, int) or not 0 <= nid < 1 << 16:
        raise ConfigError(f"config: {where}.nid must be an integer from 0 to 65535")
    return nid


def parse_backend(spec: Any, default: type[SndBackend] | None,
                  where: str) -> tuple[type[SndBackend], dict[str, Any]]:
    """``backend = "name"`` or ``{ name = "...", option = ... }``."""
    if spec is None:
        return default or BACKENDS["portaudio"], {}
    options: dict[str, Any] = {}
    if isinstance(spec, dict):
        options = dict(spec)
        spec = options.pop("name", None)
        if spec is None:
            return default or BACKENDS["portaudio"], options
    if not isinstance(spec, str):
        raise ConfigError(f"config: {where}.backend must be a name or a table")
    if spec in BACKENDS:
        return BACKENDS[spec], options
    if ":" not in spec:
        raise ConfigError(f"config: {where}.backend: unknown backend {spec!r} "
                          f"(use {', '.join(BACKENDS)} or module:Class)")
    cls = import_class(spec)
    if not issubclass(cls, SndBackend):
        raise ConfigError(f"backend {cls.__name__} is not a pyemb SndBackend")
    return cls, options


def parse_stream(index: int, table: Mapping[str, Any],
                 default_backend: type[SndBackend] | None = None) -> StreamConfig:
    """One ``[[snd.streams]]`` table."""
    where = f"snd.streams[{index}]"
    if not isinstance(table, dict):
        raise ConfigError(f"config: {where} must be a table")
    known = {"direction", "channels", "formats", "rates", "backend", "chmaps", "volume",
             "mute", "nid"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"config: {where}: unknown key {unknown[0]!r}")
    direction = table.get("direction", "output")
    if direction not in ("output", "input"):
        raise ConfigError(f"config: {where}.direction must be \"output\" or \"input\"")
    channels = table.get("channels", [1, 2])
    if (not isinstance(channels, list) or len(channels) != 2
            or not all(isinstance(c, int) and 1 <= c <= 8 for c in channels)
            or channels[0] > channels[1]):
        raise ConfigError(f"config: {where}.channels must be [min, max] within 1..8")
    from pyemb.snd.pcm import SAMPLE_FORMATS
    formats = 0
    for name in _list(table, "formats", ["S16"], where):
        if name not in SAMPLE_FORMATS:
            raise ConfigError(f"config: {where}.formats: unsupported format {name!r} "
                              f"(use {', '.join(SAMPLE_FORMATS)})")
        formats |= 1 << p.FORMAT_INDEX[name]
    rates = 0
    for rate in _list(table, "rates", [48000], where):
        if rate not in p.RATE_INDEX:
            raise ConfigError(f"config: {where}.rates: unsupported rate {rate!r}")
        rates |= 1 << p.RATE_INDEX[rate]
    if not formats or not rates:
        raise ConfigError(f"config: {where} needs at least one format and one rate")
    chmaps = []
    for layout in _list(table, "chmaps", [c for c in DEFAULT_CHMAPS
                                          if channels[0] <= len(CHMAP_LAYOUTS[c])
                                          <= channels[1]], where):
        if isinstance(layout, str) and layout in CHMAP_LAYOUTS:
            chmaps.append(CHMAP_LAYOUTS[layout])
        elif (isinstance(layout, list) and 1 <= len(layout) <= 8
              and all(pos in p.CHMAP_POSITION for pos in layout)):
            chmaps.append(tuple(layout))
        else:
            raise ConfigError(f"config: {where}.chmaps: {layout!r} is neither one of "
                              f"{', '.join(CHMAP_LAYOUTS)} nor a list of positions")
    backend_class, options = parse_backend(table.get("backend"), default_backend, where)
    info = p.PcmInfo(p.Direction.OUTPUT if direction == "output" else p.Direction.INPUT,
                     channels[0], channels[1], formats, rates, PCM_FEATURES,
                     _nid(table, where))
    return StreamConfig(index, info, backend_class, options, chmaps,
                        _bool(table, "volume", True, where), _bool(table, "mute", True, where))


def parse_jack(index: int, table: Mapping[str, Any]) -> JackConfig:
    where = f"snd.jacks[{index}]"
    if not isinstance(table, dict):
        raise ConfigError(f"config: {where} must be a table")
    device = table.get("device", "headphone")
    if device not in JACK_DEVICES:
        raise ConfigError(f"config: {where}.device must be one of {', '.join(JACK_DEVICES)}")
    kind, output = JACK_DEVICES[device]
    # Pin configuration: jack connectivity, external rear location, 1/8" plug,
    # association 1, sequence = index.
    defconf = (0x1 << 24) | (kind << 20) | (0x1 << 16) | (1 << 4) | (index & 0xF)
    # Pin capabilities: presence detect, and output (+ headphone drive) or input.
    caps = (1 << 2) | ((1 << 4) | ((1 << 3) if device == "headphone" else 0)
                       if output else (1 << 5))
    return JackConfig(_nid(table, where), defconf, caps,
                      _bool(table, "connected", True, where), _bool(table, "remap", False, where))


def parse_card(snd: Mapping[str, Any], default_backend: type[SndBackend] | None) -> CardConfig:
    streams = snd.get("streams", list(DEFAULT_STREAMS))
    if not isinstance(streams, list) or not streams:
        raise ConfigError("config: snd.streams must be a non-empty array of tables")
    jacks = snd.get("jacks", [])
    if not isinstance(jacks, list):
        raise ConfigError("config: snd.jacks must be an array of tables")
    unknown = sorted(set(snd) - {"streams", "jacks"})
    if unknown:
        raise ConfigError(f"config: snd: unknown key {unknown[0]!r}")
    return CardConfig([parse_stream(i, s, default_backend) for i, s in enumerate(streams)],
                      [parse_jack(i, j) for i, j in enumerate(jacks)])
