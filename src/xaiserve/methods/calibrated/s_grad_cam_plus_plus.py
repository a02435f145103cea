"""S-Grad-CAM++ (seed 003): Grad-CAM++'s weighted features on the data set's common intensity
scale; FS-S-Grad-CAM++ with ``principal_fraction`` (see ``scaled_cam``)."""

from __future__ import annotations

from xaiserve.methods.calibrated.scaled_cam import ScaledCam
from xaiserve.methods.cam.grad_cam_plus_plus import GradCamPlusPlus


class SGradCamPlusPlus(ScaledCam):
    name = "s_grad_cam_plus_plus"
    cam = GradCamPlusPlus
