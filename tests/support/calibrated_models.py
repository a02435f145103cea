"""The tiny model with a made-up S-CAM calibration, for the S-CAM and cost tests."""

from __future__ import annotations

import numpy as np

from support.tiny_models import tiny_served
from xaiserve.offline.calibrate import scaled_cams
from xaiserve.runtime.calibration import Calibration, CamCalibration
from xaiserve.runtime.model import ServedModel


def calibrated_tiny() -> ServedModel:
    """The tiny model with a made-up calibration of every scaled CAM (channel importance
    8 x 3, percentiles from -2 to 2), so the S-CAM methods run on it."""
    served = tiny_served()
    cams = {
        key: CamCalibration(
            importance=np.arange(8 * 3, dtype=np.float64).reshape(8, 3)[::-1].copy(),
            max_percentiles=np.linspace(0.0, 2.0, 101),
            min_percentiles=np.linspace(-2.0, 0.0, 101),
            maps=10,
        )
        for key in scaled_cams()
    }
    served.calibration = Calibration(cams, "features.4", "", 1, "test", "all_classes", 0.0)
    return served
