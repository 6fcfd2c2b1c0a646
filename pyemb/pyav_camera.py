"""Camera sources through PyAV: a video file, looped, and a host V4L2 camera.

Both decode pictures with FFmpeg and convert each one to the guest's format
and size (libswscale through ``VideoFrame.reformat``) before it goes into
the buffer.  ``[camera]`` options: ``path`` (file) or ``device`` (v4l2,
default ``/dev/video0``), plus ``sizes`` and ``frame_rates`` (what the guest
may choose; the picture is scaled to the size chosen).
"""

from __future__ import annotations

from typing import Any

import av
import numpy as np

from pyemb.camera_source import CameraSource
from pyemb.config import ConfigError
from pyemb.media.formats import AV_NAMES, ImageFormat


def copy_frame(frame: Any, fmt: ImageFormat, target: np.ndarray) -> None:
    """``frame`` converted to ``fmt`` into ``target``, rows unpadded."""
    out = frame.reformat(width=fmt.width, height=fmt.height, format=AV_NAMES[fmt.fourcc])
    target[: fmt.sizeimage] = out.to_ndarray().reshape(-1)[: fmt.sizeimage]


class FileSource(CameraSource):
    """A video file played in a loop, one decoded picture per captured one."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        path = self.config.get("path")
        if not isinstance(path, str):
            raise ConfigError('config: camera.path must name a video file (source = "file")')
        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise ConfigError(f"config: camera.path {path} has no video stream")
        except av.FFmpegError as e:
            raise ConfigError(f"config: camera.path {path}: {e}") from None
        self.path = path
        self._container: Any = None
        self._frames: Any = None

    def start(self, fmt: ImageFormat, fps: int) -> None:
        super().start(fmt, fps)
        self._open()

    def _open(self) -> None:
        self.stop()
        self._container = av.open(self.path)
        self._frames = self._container.decode(video=0)

    def _next(self) -> Any:
        for _ in range(2):
            try:
                return next(self._frames)
            except StopIteration:
                self._open()            # the end: loop
        raise RuntimeError(f"{self.path}: no picture")

    def render(self, sequence: int, target: np.ndarray, pattern: int = 0) -> None:
        if self._frames is None:
            self._open()
        copy_frame(self._next(), self.fmt, target)

    def stop(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._frames = None


class HostCamera(CameraSource):
    """A camera of the host through FFmpeg's v4l2 input, opened at STREAMON
    at the size and rate the guest chose (FFmpeg picks the nearest the
    camera has; the picture is scaled to the guest's size)."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        device = self.config.get("device", "/dev/video0")
        if not isinstance(device, str):
            raise ConfigError("config: camera.device must be a path like /dev/video0")
        self.device = device
        self._container: Any = None
        self._frames: Any = None

    def start(self, fmt: ImageFormat, fps: int) -> None:
        super().start(fmt, fps)
        self.stop()
        self._container = av.open(self.device, format="v4l2", options={
            "video_size": f"{fmt.width}x{fmt.height}", "framerate": str(fps)})
        self._frames = self._container.decode(video=0)

    def render(self, sequence: int, target: np.ndarray, pattern: int = 0) -> None:
        if self._frames is None:
            raise RuntimeError(f"{self.device} is not open")
        copy_frame(next(self._frames), self.fmt, target)

    def stop(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._frames = None
