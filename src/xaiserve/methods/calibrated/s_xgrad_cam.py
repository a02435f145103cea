"""S-XGrad-CAM (seed 003): XGrad-CAM's weighted features on the data set's common intensity
scale; FS-S-XGrad-CAM with ``principal_fraction`` (see ``scaled_cam``)."""

from __future__ import annotations

from xaiserve.methods.calibrated.scaled_cam import ScaledCam
from xaiserve.methods.cam.xgrad_cam import XGradCam


class SXGradCam(ScaledCam):
    name = "s_xgrad_cam"
    cam = XGradCam
