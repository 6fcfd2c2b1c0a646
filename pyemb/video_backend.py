"""Video engines for virtio-video-py.

A backend reports what it can do (``capabilities``) and, with the video
decoder issue, opens decode sessions.  The default engine is PyAV (FFmpeg).

Status: the foundation reports capabilities from the decoders that this
PyAV build really has; decoding sessions come with the video decoder issue.
"""

from __future__ import annotations

from typing import Any

from pyemb.video.protocol import Format, FormatDesc, FormatFrame, QueueType, Range

# Coded formats and the FFmpeg decoder that handles each.
FFMPEG_DECODERS = {
    Format.H264: "h264",
    Format.HEVC: "hevc",
    Format.VP8: "vp8",
    Format.VP9: "vp9",
    Format.MPEG2: "mpeg2video",
    Format.MPEG4: "mpeg4",
}
RAW_OUTPUTS = (Format.NV12, Format.YUV420)

# Sizes FFmpeg's software decoders handle; 2-pixel steps for 4:2:0.
FRAME = FormatFrame(width=Range(16, 4096, 2), height=Range(16, 4096, 2),
                    frame_rates=(Range(1, 120, 1),))


class VideoBackend:
    """Interface of a video engine.  Construct with the device's config."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = config or {}

    def coded_formats(self) -> list[Format]:
        """Bitstream formats this engine decodes (or encodes to)."""
        raise NotImplementedError

    def raw_formats(self) -> list[Format]:
        """Picture formats it writes (or reads)."""
        return list(RAW_OUTPUTS)

    def capabilities(self, queue_type: QueueType) -> list[FormatDesc]:
        """QUERY_CAPABILITY for a decoder: coded formats on INPUT, raw on
        OUTPUT, every input compatible with every output."""
        coded, raw = self.coded_formats(), self.raw_formats()
        if queue_type == QueueType.INPUT:
            mask = (1 << len(raw)) - 1
            return [FormatDesc(f, mask=mask, frames=(FRAME,)) for f in coded]
        mask = (1 << len(coded)) - 1
        return [FormatDesc(f, mask=mask, frames=(FRAME,)) for f in raw]

    def close(self) -> None:
        """Release everything; the device is going away."""


class PyAVBackend(VideoBackend):
    """FFmpeg through PyAV."""

    def coded_formats(self) -> list[Format]:
        import av

        found = []
        for fmt, name in FFMPEG_DECODERS.items():
            try:
                av.codec.Codec(name, "r")
            except Exception:  # noqa: BLE001 - codec missing from this FFmpeg build
                continue
            found.append(fmt)
        return found
