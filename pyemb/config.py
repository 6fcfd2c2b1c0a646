"""Device configuration: the TOML file named by ``config=`` and the
``backend=module:Class`` property.

Everything here fails with :class:`ConfigError`, whose message is one line
that says what to fix; QEMU prints it and exits before the guest starts.
"""

from __future__ import annotations

import importlib
import tomllib
from collections.abc import Mapping
from typing import Any


class ConfigError(Exception):
    """A device cannot be built as configured; the message says what to fix."""


def load_config(path: str | None) -> dict[str, Any]:
    """Read the device's TOML config; no path means an empty config."""
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path}: not valid TOML: {e}") from None


def import_class(spec: str) -> type:
    """Import ``module:Class`` (or ``module.Class``)."""
    module_name, sep, class_name = spec.partition(":")
    if not sep:
        module_name, _, class_name = spec.rpartition(".")
    if not module_name or not class_name:
        raise ConfigError(f"backend '{spec}' must be written module:Class")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is a config error
        raise ConfigError(
            f"cannot import backend '{spec}': {type(e).__name__}: {e}"
        ) from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ConfigError(f"backend '{spec}': module {module_name} has no class {class_name}")
    return cls


def section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A table of the config (``[name]``), empty if absent."""
    value = config.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"config: [{name}] must be a table")
    return value


def get_int(table: Mapping[str, Any], key: str, default: int, lo: int, hi: int,
            where: str) -> int:
    """An integer option within [lo, hi]."""
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"config: {where}.{key} must be an integer from {lo} to {hi}")
    return value
