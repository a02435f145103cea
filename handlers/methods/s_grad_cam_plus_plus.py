"""S-Grad-CAM++ (seed 003): Grad-CAM++'s weighted features on the data set's common intensity
scale; FS-S-Grad-CAM++ with ``principal_fraction`` (see ``scaled_cam``)."""

from __future__ import annotations

from .grad_cam_plus_plus import GradCamPlusPlus
from .scaled_cam import ScaledCam


class SGradCamPlusPlus(ScaledCam):
    name = "s_grad_cam_plus_plus"
    cam = GradCamPlusPlus
