"""S-CAM: a CAM on the data set's common intensity scale (seed 003, eq. 1 and 5).

With the CAM layer's activations A (N x F x *s), the target logit's gradients G there and
the CAM's weights w = ``cam.channel_weights(A, G)``:

    S-CAM    = sigma(upsample(sum_f w_f A_f))
    FS-S-CAM = sigma(upsample(sum_{f in P_c} w_f A_f))

sigma is the calibrated tanh (``calibration.tanh_scale``: P10 -> 0.1, P90 -> 0.9) and P_c the
principal features of the target class c (the top ``principal_fraction`` of the importance
matrix column c). No ReLU and no per-image min-max: maps of different images (and classes)
share one scale, and a negative contribution maps below a zero activation's value
sigma(0) = tanh(b), which is positive whenever P10 < 0.068 x P90 (the usual case); the
output is negative only below the zero crossing x = -b / a, which lies below P10. Output
N x 1 x *spatial in (-1, 1). The ``raw`` stage returns it as is; the seed-004 stages take
|map| (folding negative outputs onto positive ones) and min-max scale each map on its own,
like any method's, so ask for ``raw`` to keep the common scale.

FS-S-CAM uses the method's common scale as measured over all features (the scale is
calibrated once; the fraction is a request parameter).

A variant names the CAM whose weights it scales (``cam``); its calibration key is its name
without the ``s_`` prefix.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from xaiserve.api.errors import InvalidArgument
from xaiserve.methods.base import AttributionMethod, MethodContext, Param
from xaiserve.methods.cam.grad_cam import GradCam, layer_activations_and_gradients, upsample
from xaiserve.runtime.calibration import tanh_scale
from xaiserve.runtime.model import ServedModel


class ScaledCam(AttributionMethod):
    """Base of the S-CAM variants; subclasses set ``name`` and ``cam``."""

    needs_layer = True
    needs_calibration: ClassVar[bool] = True
    cam: ClassVar[type[GradCam]]
    params = (
        Param(
            "principal_fraction",
            float,
            1.0,
            0.0,
            1.0,
            "fraction (0, 1] of the features, the most important for the target class by "
            "the importance matrix, the map is made of; 1 uses all features (S-CAM), less "
            "gives FS-S-CAM",
        ),
    )

    @classmethod
    def calibration_key(cls) -> str:
        """The key of this method's scale and importance matrix in the calibration."""
        return cls.name.removeprefix("s_")

    def unsupported_reason(self, served: ServedModel) -> str | None:
        reason = super().unsupported_reason(served)
        if reason is not None:
            return reason
        command = f"`xaiserve calibrate --model {served.config.name}`"
        if served.calibration is None:
            return f"the model has no calibration: run {command}"
        if self.calibration_key() not in served.calibration.cams:
            return f"the model's calibration has no {self.calibration_key()} scale: run {command}"
        return None

    def check_params(
        self, params: dict[str, Any], input_shape: tuple[int, ...], field: str
    ) -> None:
        if not params["principal_fraction"] > 0:
            raise InvalidArgument(
                f"{field}.principal_fraction",
                f"must be in (0, 1], got {params['principal_fraction']:g}",
            )

    def weighted_features(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """w_f A_f for every feature: N x F x *s (``cam``'s weights, no ReLU)."""
        return self.cam().channel_weights(acts, grads) * acts

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        calibration = ctx.served.calibration
        if calibration is None:
            raise RuntimeError("no calibration")  # unsupported_reason() stops this earlier
        scale = calibration.cams[self.calibration_key()]
        acts, grads = layer_activations_and_gradients(ctx, x, target)
        weighted = self.weighted_features(acts, grads)
        fraction = float(params["principal_fraction"])
        if fraction < 1.0:
            mask = scale.principal_mask(target, fraction).to(weighted.device, weighted.dtype)
            weighted = weighted * mask.view(*mask.shape, *([1] * (weighted.dim() - 2)))
        cam = upsample(weighted.sum(dim=1, keepdim=True), tuple(x.shape[2:]))
        return tanh_scale(cam, scale.p10, scale.p90)
