"""pyemb: QEMU virtio devices whose behaviour is written in Python.

The patched QEMU hands every virtqueue element to a device model
(:class:`pyemb.device.DeviceModel`); the bundled models are
:mod:`pyemb.snd` (virtio-snd) and :mod:`pyemb.video` (virtio-video), and
their engines are the backends in :mod:`pyemb.snd_backend` and
:mod:`pyemb.video_backend`.
"""

from pyemb.config import ConfigError
from pyemb.device import DeviceModel, Request

__all__ = ["ConfigError", "DeviceModel", "Request"]
