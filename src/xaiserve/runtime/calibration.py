"""Data-set calibration of the CAM methods (seed 003, integrated feature analysis).

Measured once over a data set by ``xaiserve calibrate`` (see ``calibration_pass``) and
stored in the model directory, next to the weights it was measured with:

    calibration.json   format, CAM layer, SHA-256 of the weights, data set, number of
                       images, how the importance matrix was formed, seconds taken, and per
                       CAM method its P10 and P90 (for people; the arrays are authoritative)
    calibration.npz    per CAM method ``<cam>.importance`` (F x C), ``<cam>.max_percentiles``
                       and ``<cam>.min_percentiles`` (101 values: percentiles 0..100);
                       read with ``numpy.load(allow_pickle=False)``, so nothing is unpickled

Distribution analysis (seed section II.A). A CAM's class activation map is the weighted
feature sum ``sum_f w_f A_f`` upsampled to the input (before any ReLU). Over the data set we
record each map's maximum and minimum; the common intensity scale takes P90 = the 90th
percentile of the maxima and P10 = the 10th percentile of the minima (they replace each
map's own maximum and minimum of the classical min-max scaling) and maps a value x to

    sigma(x) = tanh(a x + b),  a = (atanh 0.9 - atanh 0.1) / (P90 - P10),
                               b = (P90 atanh 0.1 - P10 atanh 0.9) / (P90 - P10)

(seed eq. 2), so sigma(P10) = 0.1 and sigma(P90) = 0.9; it is increasing, keeps values
outside [P10, P90] distinguishable, and sends negative contributions below sigma(0) =
tanh(b), which is positive unless P10 < 0.068 x P90: the output is negative only below
x = -b / a, under P10. The seed prints b = (P90 atanh 0.9 - P10 atanh 0.1) / (P10 - P90),
which would send P10 to -0.9 and P90 to -0.1; b above is the one that meets its stated
limits, as in the authors' code (IFA, ``Rescaler``; that code defaults to 0.05 / 0.95 and
reads P50 of the minima, where the paper says 0.1 / 0.9 and P10).

Feature decomposition (seed section II.B). The importance matrix IM (F x C) holds, for
feature f and class c, the average over the data set of the sum over positions of the
weighted feature ``w_f^c A_f`` (eq. 3: every image, every class as the selected class; or
eq. 4: each image only for its true class, averaged over that class's images). The
principal features of class c are the top fraction of column c.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xaiserve.api.errors import ModelLoadError
from xaiserve.runtime.artifacts import write_json_atomic

log = logging.getLogger(__name__)

CALIBRATION_JSON = "calibration.json"
CALIBRATION_NPZ = "calibration.npz"
CALIBRATION_FILES = (CALIBRATION_JSON, CALIBRATION_NPZ)
FORMAT = 1
LOW_LEVEL, HIGH_LEVEL = 0.1, 0.9
"""The values P10 and P90 are mapped to (seed eq. 2)."""
IMPORTANCE_MODES = ("all_classes", "true_class")
"""Eq. 3 (every class selected for every image) and eq. 4 (each image's true class)."""


def tanh_coefficients(p10: float, p90: float) -> tuple[float, float]:
    """(a, b) of sigma(x) = tanh(a x + b) with sigma(p10) = 0.1 and sigma(p90) = 0.9."""
    if not p90 > p10:
        raise ValueError(f"the common scale needs P90 > P10, got P10={p10:g}, P90={p90:g}")
    low, high = math.atanh(LOW_LEVEL), math.atanh(HIGH_LEVEL)
    a = (high - low) / (p90 - p10)
    b = (p90 * low - p10 * high) / (p90 - p10)
    return a, b


def tanh_scale(x: torch.Tensor, p10: float, p90: float) -> torch.Tensor:
    """The common intensity scale (seed eq. 1-2) applied element-wise; values in (-1, 1)."""
    a, b = tanh_coefficients(p10, p90)
    return torch.tanh(a * x + b)


def principal_count(features: int, fraction: float) -> int:
    """How many features the top ``fraction`` (0, 1] of ``features`` is (at least one)."""
    return max(1, min(features, math.ceil(fraction * features - 1e-9)))


@dataclass(frozen=True)
class CamCalibration:
    """One CAM method's calibration.

    importance: F x C float64 (seed eq. 3 or 4). max_percentiles, min_percentiles: 101
    values, percentiles 0..100 of the per-map maxima and minima of the upsampled weighted
    feature sums. maps: how many maps they were measured on.
    """

    importance: np.ndarray
    max_percentiles: np.ndarray
    min_percentiles: np.ndarray
    maps: int

    @property
    def p10(self) -> float:
        return float(self.min_percentiles[10])

    @property
    def p90(self) -> float:
        return float(self.max_percentiles[90])

    @property
    def features(self) -> int:
        return int(self.importance.shape[0])

    def principal_features(self, target: int, fraction: float) -> np.ndarray:
        """Indices of the top ``fraction`` of features of column ``target``, most important
        first (ties: lower index first)."""
        column = self.importance[:, target]
        order = np.argsort(-column, kind="stable")
        return order[: principal_count(len(column), fraction)]

    def principal_mask(self, target: torch.Tensor, fraction: float) -> torch.Tensor:
        """N x F float mask, 1 on the principal features of each sample's target class."""
        mask = torch.zeros(len(target), self.features, device="cpu")  # the caller moves it
        for i, c in enumerate(target.tolist()):
            mask[i, torch.from_numpy(self.principal_features(int(c), fraction))] = 1.0
        return mask


@dataclass(frozen=True)
class Calibration:
    """The data-set calibration of a model: one ``CamCalibration`` per CAM method key
    (``grad_cam``, ``xgrad_cam``, ``grad_cam_plus_plus``, ``grad_cam_pixel``)."""

    cams: dict[str, CamCalibration]
    cam_layer: str
    weights_sha256: str
    images: int
    data: str
    importance_mode: str
    seconds: float


def save_calibration(directory: Path, calibration: Calibration) -> list[Path]:
    """Writes calibration.npz and calibration.json into ``directory``; returns their paths."""
    directory = Path(directory)
    arrays: dict[str, np.ndarray] = {}
    for key, cam in calibration.cams.items():
        arrays[f"{key}.importance"] = np.asarray(cam.importance, dtype=np.float64)
        arrays[f"{key}.max_percentiles"] = np.asarray(cam.max_percentiles, dtype=np.float64)
        arrays[f"{key}.min_percentiles"] = np.asarray(cam.min_percentiles, dtype=np.float64)
    npz = directory / CALIBRATION_NPZ
    tmp = directory / f".{CALIBRATION_NPZ}.tmp.npz"
    np.savez(tmp, allow_pickle=False, **arrays)  # float arrays only
    tmp.replace(npz)
    meta = {
        "format": FORMAT,
        "cam_layer": calibration.cam_layer,
        "weights_sha256": calibration.weights_sha256,
        "images": calibration.images,
        "data": calibration.data,
        "importance_mode": calibration.importance_mode,
        "seconds": round(calibration.seconds, 3),
        "cams": {
            key: {"p10": cam.p10, "p90": cam.p90, "maps": cam.maps, "features": cam.features}
            for key, cam in calibration.cams.items()
        },
    }
    write_json_atomic(directory / CALIBRATION_JSON, meta)
    return [npz, directory / CALIBRATION_JSON]


def _cam_from_arrays(
    arrays: dict[str, np.ndarray], key: str, maps: int, path: Path
) -> CamCalibration:
    try:
        importance = arrays[f"{key}.importance"]
        highs = arrays[f"{key}.max_percentiles"]
        lows = arrays[f"{key}.min_percentiles"]
    except KeyError as err:
        raise ModelLoadError(f"{path}: missing array {err}") from None
    if importance.ndim != 2 or highs.shape != (101,) or lows.shape != (101,):
        raise ModelLoadError(f"{path}: {key}: arrays of unexpected shape")
    cam = CamCalibration(
        importance.astype(np.float64), highs.astype(np.float64), lows.astype(np.float64), maps
    )
    if not all(np.isfinite(a).all() for a in (importance, highs, lows)) or not cam.p90 > cam.p10:
        raise ModelLoadError(f"{path}: {key}: non-finite values or P90 <= P10")
    return cam


def load_calibration(directory: Path, cam_layer: str, weights_sha256: str) -> Calibration | None:
    """The calibration stored in ``directory``, or None when there is none.

    A calibration made for other weights or another CAM layer is stale: it is ignored with
    a warning (the model is served uncalibrated). Malformed files raise ModelLoadError.
    """
    directory = Path(directory)
    meta_path, npz_path = directory / CALIBRATION_JSON, directory / CALIBRATION_NPZ
    if not meta_path.exists() and not npz_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        with np.load(npz_path, allow_pickle=False) as packed:
            arrays = {name: packed[name] for name in packed.files}
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{directory}: unreadable calibration: {err}") from err
    if meta.get("format") != FORMAT:
        raise ModelLoadError(f"{meta_path}: unknown format {meta.get('format')!r}")
    if meta.get("weights_sha256") != weights_sha256 or meta.get("cam_layer") != cam_layer:
        log.warning(
            "%s: calibration was made for other weights or another CAM layer; ignored "
            "(run `xaiserve calibrate` again)",
            directory,
        )
        return None
    cams = {
        key: _cam_from_arrays(arrays, key, int(info.get("maps", 0)), npz_path)
        for key, info in dict(meta.get("cams") or {}).items()
    }
    return Calibration(
        cams=cams,
        cam_layer=cam_layer,
        weights_sha256=weights_sha256,
        images=int(meta.get("images", 0)),
        data=str(meta.get("data", "")),
        importance_mode=str(meta.get("importance_mode", "")),
        seconds=float(meta.get("seconds", 0.0)),
    )
