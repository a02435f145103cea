"""The data-set pass of ``xaiserve calibrate`` (seed 003): the distribution of class
activation levels and the importance matrix of every S-CAM method's CAM.

For each batch the model runs forward once, with the CAM layer's output detached into a
leaf tensor, and one backward per selected class goes from that class's logit to the leaf
only (the network's head, not its feature extractor). Every CAM's weights come from the
same activations and gradients, so all four are calibrated in one pass. Deterministic for a
fixed data set and order: no randomness, sums accumulated in float64 in data order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from xaiserve.methods.calibrated.scaled_cam import ScaledCam
from xaiserve.methods.cam.grad_cam import upsample
from xaiserve.methods.registry import METHODS
from xaiserve.runtime.artifacts import file_sha256
from xaiserve.runtime.calibration import IMPORTANCE_MODES, Calibration, CamCalibration
from xaiserve.runtime.model import ServedModel

PERCENTILES = np.arange(101)
AUTO_ALL_CLASSES_MAX = 32
"""With at most this many classes the importance matrix follows eq. 3 (every class for every
image); with more, eq. 4 (each image's true class) keeps the pass to one backward."""


@dataclass(frozen=True)
class LabeledImage:
    """image: C x *spatial float32 in [0, 1]; label: the true class, or None."""

    image: np.ndarray
    label: int | None


def scaled_cams() -> dict[str, ScaledCam]:
    """Every registered S-CAM method by calibration key."""
    return {
        cls.calibration_key(): cls()
        for cls in METHODS.values()
        if isinstance(cls, type) and issubclass(cls, ScaledCam)
    }


def _batches(items: Iterable[LabeledImage], size: int) -> Iterator[list[LabeledImage]]:
    batch: list[LabeledImage] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _activations_and_logits(
    served: ServedModel, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CAM layer's output as a leaf that requires grad, and the logits built on it."""
    layer = served.cam_layer
    if layer is None:
        raise ValueError(f"model {served.config.name!r} configures no cam_layer")
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _inputs: object, out: torch.Tensor) -> torch.Tensor:
        leaf = out.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = served.module(x)
    finally:
        handle.remove()
    return captured[0], logits


class _Accumulator:
    """Running sums for one CAM: importance numerators (F x C), per-class counts, and the
    maxima and minima of every upsampled map."""

    def __init__(self, features: int, classes: int) -> None:
        self.sums = np.zeros((features, classes), dtype=np.float64)
        self.counts = np.zeros(classes, dtype=np.float64)
        self.maxima: list[np.ndarray] = []
        self.minima: list[np.ndarray] = []

    def add(self, weighted: torch.Tensor, cls: torch.Tensor, spatial: tuple[int, ...]) -> None:
        """weighted: B x F x *s (w_f A_f for class cls[i] of image i); cls: B."""
        per_feature = weighted.flatten(2).sum(dim=2).double().numpy()  # B x F
        for i, c in enumerate(cls.tolist()):
            self.sums[:, c] += per_feature[i]
            self.counts[c] += 1
        maps = upsample(weighted.sum(dim=1, keepdim=True), spatial).flatten(1)
        self.maxima.append(maps.amax(dim=1).double().numpy())
        self.minima.append(maps.amin(dim=1).double().numpy())

    def result(self) -> CamCalibration:
        maxima, minima = np.concatenate(self.maxima), np.concatenate(self.minima)
        importance = self.sums / np.maximum(self.counts, 1.0)
        return CamCalibration(
            importance=importance,
            max_percentiles=np.percentile(maxima, PERCENTILES),
            min_percentiles=np.percentile(minima, PERCENTILES),
            maps=len(maxima),
        )


def calibrate(
    served: ServedModel,
    images: Iterable[LabeledImage],
    *,
    importance_mode: str = "auto",
    batch_size: int = 32,
    data: str = "",
    progress: Callable[[Iterator[list[LabeledImage]]], Iterator[list[LabeledImage]]] = (
        lambda it: it
    ),
) -> Calibration:
    """Measures the calibration of every S-CAM method over ``images``.

    importance_mode: ``all_classes`` (seed eq. 3: each image's maps for every class; the
    scale's percentiles pool all of them), ``true_class`` (eq. 4: each image only for its
    label, or its predicted class when unlabeled) or ``auto`` (eq. 3 up to 32 classes).
    Raises ValueError for an unknown mode, an empty data set, a model without CAM layer,
    or a degenerate scale (P90 <= P10).
    """
    n_classes = len(served.config.labels)
    if importance_mode == "auto":
        importance_mode = "all_classes" if n_classes <= AUTO_ALL_CLASSES_MAX else "true_class"
    if importance_mode not in IMPORTANCE_MODES:
        raise ValueError(f"importance mode must be auto or one of {IMPORTANCE_MODES}")
    start = time.perf_counter()
    cams = scaled_cams()
    accumulators: dict[str, _Accumulator] = {}
    spatial = served.config.spatial
    count = 0
    for batch in progress(_batches(images, batch_size)):
        x = torch.from_numpy(np.stack([item.image for item in batch])).float()
        acts, logits = _activations_and_logits(served, x)
        if not accumulators:
            accumulators = {key: _Accumulator(acts.shape[1], n_classes) for key in cams}
        if importance_mode == "all_classes":
            selections = [torch.full((len(batch),), c) for c in range(n_classes)]
        else:
            predicted = logits.argmax(dim=1)
            selections = [
                torch.tensor(
                    [
                        item.label if item.label is not None else int(predicted[i])
                        for i, item in enumerate(batch)
                    ]
                )
            ]
        for cls in selections:
            selected = logits.gather(1, cls.view(-1, 1)).sum()
            (grads,) = torch.autograd.grad(selected, acts, retain_graph=True)
            for key, method in cams.items():
                weighted = method.weighted_features(acts.detach(), grads)
                accumulators[key].add(weighted, cls, spatial)
        count += len(batch)
    if not count:
        raise ValueError("the calibration data set is empty")
    results = {key: acc.result() for key, acc in accumulators.items()}
    for key, cam in results.items():
        if not cam.p90 > cam.p10:
            raise ValueError(f"{key}: degenerate class activation levels (P90 <= P10)")
    return Calibration(
        cams=results,
        cam_layer=served.config.cam_layer,
        weights_sha256=file_sha256(served.directory / served.config.weights),
        images=count,
        data=data,
        importance_mode=importance_mode,
        seconds=time.perf_counter() - start,
    )
