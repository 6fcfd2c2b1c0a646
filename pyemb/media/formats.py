"""Raw picture formats the media devices write: layout of one image.

One memory plane per buffer for every format (the single-planar API, and
one plane of the multi-planar API): YUYV (packed 4:2:2), NV12 (Y, then
interleaved CbCr) and YU12 (Y, Cb, Cr), 8-bit, rows without padding.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyemb.media import v4l2

YUYV = v4l2.fourcc("YUYV")
NV12 = v4l2.fourcc("NV12")
YU12 = v4l2.fourcc("YU12")
RAW_FORMATS = {YUYV: "YUYV 4:2:2", NV12: "Y/UV 4:2:0", YU12: "Planar YUV 4:2:0"}
# The names libswscale / PyAV give them.
AV_NAMES = {YUYV: "yuyv422", NV12: "nv12", YU12: "yuv420p"}


@dataclass(frozen=True)
class ImageFormat:
    fourcc: int
    width: int
    height: int

    @property
    def bytesperline(self) -> int:
        return self.width * 2 if self.fourcc == YUYV else self.width

    @property
    def sizeimage(self) -> int:
        if self.fourcc == YUYV:
            return self.width * 2 * self.height
        return self.width * self.height * 3 // 2

    def layout(self) -> list[tuple[int, int]]:
        """(offset, stride) of each plane within the image."""
        w, h = self.width, self.height
        if self.fourcc == YUYV:
            return [(0, 2 * w)]
        if self.fourcc == NV12:
            return [(0, w), (w * h, w)]
        return [(0, w), (w * h, w // 2), (w * h + (w // 2) * (h // 2), w // 2)]

    def fill_pix(self, pix: v4l2.PixFormat) -> None:
        pix.width, pix.height, pix.pixelformat = self.width, self.height, self.fourcc
        pix.field = v4l2.FIELD_NONE
        pix.bytesperline, pix.sizeimage = self.bytesperline, self.sizeimage
        pix.colorspace = v4l2.COLORSPACE_SMPTE170M if self.height <= 576 else v4l2.COLORSPACE_REC709
        pix.priv = pix.flags = pix.ycbcr_enc = pix.xfer_func = 0
        pix.quantization = 0

    def fill_pix_mp(self, mp: v4l2.PixFormatMplane) -> None:
        C = v4l2.C
        C.memset(C.addressof(mp), 0, C.sizeof(mp))
        mp.width, mp.height, mp.pixelformat = self.width, self.height, self.fourcc
        mp.field = v4l2.FIELD_NONE
        mp.colorspace = v4l2.COLORSPACE_SMPTE170M if self.height <= 576 else v4l2.COLORSPACE_REC709
        mp.num_planes = 1
        mp.plane_fmt[0].sizeimage = self.sizeimage
        mp.plane_fmt[0].bytesperline = self.bytesperline
