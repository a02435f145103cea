"""Guided Grad-CAM (Selvaraju et al., 2017): guided backpropagation times the Grad-CAM map.

    a(x) = GuidedBackprop(x) * upsample(ReLU(sum_k w_k A_k))

Shapes: N x C x *spatial (the CAM map N x 1 x *spatial broadcast over channels). The map is
upsampled bilinearly (trilinearly for volumes), as our Grad-CAM; Captum's GuidedGradCam
defaults to nearest-neighbour upsampling and agrees when given ``interpolate_mode="bilinear"``.
Needs the CAM layer and nn.ReLU modules.
"""

from __future__ import annotations

from typing import Any

import torch

from xaiserve.methods.base import MethodContext
from xaiserve.methods.cam.grad_cam import GradCam
from xaiserve.methods.gradient.guided_backprop import GuidedBackprop, relu_module_reason
from xaiserve.runtime.model import ServedModel


class GuidedGradCam(GradCam):
    name = "guided_grad_cam"

    def unsupported_reason(self, served: ServedModel) -> str | None:
        return super().unsupported_reason(served) or relu_module_reason(served, self.name)

    def max_forward_passes(self, params: dict[str, Any], served: ServedModel) -> int:
        """Grad-CAM's gradient pass and guided backpropagation's."""
        return 2

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        cam = super().attribute(ctx, x, target, params)
        return GuidedBackprop().attribute(ctx, x, target, {}) * cam
