"""Pixel-wise S-Grad-CAM (seed 003): the gradients multiply the features element-wise (the
seed's "pixel-wise Grad CAM", HiResCAM's weights) before the sum over features, then the
data set's common intensity scale; FS- with ``principal_fraction`` (see ``scaled_cam``)."""

from __future__ import annotations

from xaiserve.methods.calibrated.scaled_cam import ScaledCam
from xaiserve.methods.cam.hires_cam import HiResCam


class SGradCamPixel(ScaledCam):
    name = "s_grad_cam_pixel"
    cam = HiResCam
