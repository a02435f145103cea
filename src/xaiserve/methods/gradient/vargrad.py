"""VarGrad (Adebayo et al., 2018, "Local explanation methods for deep neural networks lack
sensitivity to parameter randomization"): the variance of the gradient over noisy copies.

    a(x) = 1/n sum_i g_i^2 - (1/n sum_i g_i)^2,  g_i = grad f_y(x + z_i),
    z_i ~ N(0, sigma^2), sigma = noise_level * (max x - min x) per image

(the population variance, as Captum's NoiseTunnel ``vargrad``). Each image draws its n
noise copies from its own generator seeded with ``seed``, so an image's map does not
depend on the other images of its batch; for one image the noise is the one Captum draws
after ``torch.manual_seed(seed)``. Shapes: x N x C x *spatial -> N x C x *spatial.
"""

from __future__ import annotations

from typing import Any

import torch

from xaiserve.methods.base import AttributionMethod, MethodContext
from xaiserve.methods.gradient.smoothgrad import SmoothGrad, noisy_gradients
from xaiserve.runtime.model import ServedModel


class VarGrad(AttributionMethod):
    name = "vargrad"
    params = SmoothGrad.params
    cost_advice = SmoothGrad.cost_advice

    def max_forward_passes(self, params: dict[str, Any], served: ServedModel) -> int:
        """One gradient pass per noisy copy, as SmoothGrad."""
        return SmoothGrad().max_forward_passes(params, served)

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        grads = noisy_gradients(ctx, x, target, params)
        return grads.pow(2).mean(dim=1) - grads.mean(dim=1).pow(2)
