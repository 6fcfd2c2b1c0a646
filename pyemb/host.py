"""Entry points that the C shim calls inside QEMU.

- :func:`check_environment` once, right after the interpreter starts;
- :func:`create_device` at every pyemb device's realize;
- :func:`collect_cycles_soon` when a dropped device model outlived its last
  reference (unplug, failed realize);
- :func:`shutdown` at QEMU exit, before the interpreter is finalized.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from typing import Any

from pyemb.config import ConfigError, import_class, load_config, section
from pyemb.device import DeviceHandle, DeviceModel

# A busy Python thread makes every other thread (QEMU's main loop included)
# wait up to the switch interval for the GIL; 5 ms is far too long for
# audio periods and synchronous virtio replies.
SWITCH_INTERVAL_S = 0.0005


def check_environment(venv: str) -> None:
    """Fail unless the embedded interpreter runs from the project's venv."""
    if os.path.realpath(sys.prefix) != os.path.realpath(venv):
        raise RuntimeError(
            f"the embedded Python runs from {sys.prefix}, not from the venv {venv}"
        )
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def _model_class(kind: str) -> type[DeviceModel]:
    """The bundled model of a device kind, imported only when it is used (a
    whole-model backend never imports it)."""
    if kind == "snd":
        from pyemb.snd.device import SoundDevice
        return SoundDevice
    if kind == "video":
        from pyemb.video.device import VideoDevice
        return VideoDevice
    if kind == "media":
        from pyemb.media.device import MediaDevice
        return MediaDevice
    raise ConfigError(f"unknown device kind {kind!r}")


def create_device(
    kind: str,
    role: str | None,
    backend: str | None,
    config_path: str | None,
    handle: DeviceHandle,
) -> DeviceModel:
    """Build the device model for one ``-device``.

    ``backend=module:Class`` (or ``class`` in the config's ``[backend]``
    table, whose other keys are the backend's options) names either an
    engine for the bundled model of
    this device (an audio or video backend), or a whole
    :class:`~pyemb.device.DeviceModel` subclass that replaces the bundled one.
    Raises :class:`ConfigError` with a one-line message on any problem.
    """
    config = load_config(config_path)
    spec = backend or section(config, "backend").get("class")
    if spec is not None and not isinstance(spec, str):
        raise ConfigError("config: backend.class must be a string module:Class")
    backend_class = import_class(spec) if spec else None
    kwargs: dict[str, Any] = {}
    if role is not None:
        kwargs["role"] = role
    whole_model = backend_class is not None and issubclass(backend_class, DeviceModel)
    model_class = backend_class if whole_model else _model_class(kind)
    try:
        if whole_model:
            return model_class(handle, config, **kwargs)
        return model_class(handle, config, backend_class=backend_class, **kwargs)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - report any constructor failure as config
        what = spec or model_class.__name__
        raise ConfigError(f"cannot create {what}: {type(e).__name__}: {e}") from e


class _CycleCollector:
    """One daemon thread that runs the cyclic garbage collector when asked.

    Device models commonly sit in reference cycles (streams and queues that
    point back at their device), which only the cyclic collector frees; a
    model that has lived a while is in its oldest generation, collected
    rarely, so an unplugged device's tables, pictures and engines stayed until
    some later full collection (a sawtooth of 30 MB in bench.unplug_loop).
    A full collection traverses every object of the interpreter (5 to 25 ms
    here), so it runs on this thread, not on QEMU's main loop; requests made
    while it runs are served by one more collection.
    """

    def __init__(self) -> None:
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def request(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="pyemb-gc")
                self._thread.start()
        self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            gc.collect()


_cycle_collector = _CycleCollector()


def collect_cycles_soon() -> None:
    """A dropped device model is still alive: free its cycles, off the main loop."""
    _cycle_collector.request()


def shutdown(timeout: float) -> bool:
    """Join the threads backends left running; True if none is left.

    Daemon threads do not stop the interpreter from finalizing; a non-daemon
    thread still alive after ``timeout`` seconds makes QEMU skip finalization
    rather than hang at exit.
    """
    deadline = time.monotonic() + timeout
    me = threading.current_thread()
    for thread in threading.enumerate():
        if thread is me or thread.daemon or isinstance(thread, threading._DummyThread):
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
    return not any(
        t.is_alive() and not t.daemon and t is not me
        and not isinstance(t, threading._DummyThread)
        for t in threading.enumerate()
    )
