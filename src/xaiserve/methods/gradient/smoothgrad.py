"""SmoothGrad: the gradient averaged over noisy copies of the input (Smilkov et al., 2017).

a(x) = 1/n sum_i grad f_y(x + z_i), z_i ~ N(0, sigma^2), sigma = noise_level * (max x - min x)
per image. Each image draws its n noise copies from its own generator seeded with ``seed``,
so an image's map does not depend on the other images of its batch; for one image the noise
is the one Captum's NoiseTunnel draws after ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

from typing import Any

import torch

from xaiserve.methods.base import AttributionMethod, MethodContext, Param, input_gradients
from xaiserve.runtime.model import ServedModel


def noise_for_image(x: torch.Tensor, samples: int, noise_level: float, seed: int) -> torch.Tensor:
    """The noise of one image's copies: x 1 x C x *spatial -> samples x C x *spatial, on
    x's device. Drawn on the CPU (the same numbers on every device), then moved."""
    spread = float(x.max() - x.min()) * noise_level
    std = torch.full((samples, *x.shape[1:]), spread, device="cpu")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.normal(torch.zeros_like(std), std, generator=generator).to(x.device)


def noisy_gradients(
    ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
) -> torch.Tensor:
    """Gradients at the noisy copies: x N x C x *spatial -> N x samples x C x *spatial."""
    n = params["samples"]
    noise = torch.cat(
        [
            noise_for_image(x[i : i + 1], n, params["noise_level"], params["seed"])
            for i in range(x.shape[0])
        ]
    )
    noisy = x.repeat_interleave(n, dim=0) + noise
    grads = input_gradients(ctx, noisy, target.repeat_interleave(n))
    return grads.view(x.shape[0], n, *x.shape[1:])


class SmoothGrad(AttributionMethod):
    name = "smoothgrad"
    params = (
        Param("samples", int, 25, 1, 1024, "noisy copies averaged"),
        Param("noise_level", float, 0.15, 0.0, 1.0, "noise std as a fraction of the range"),
        Param("seed", int, 0, 0, 2**63 - 1, "seed of the noise"),
    )
    cost_advice = "ask for fewer samples"

    def max_forward_passes(self, params: dict[str, Any], served: ServedModel) -> int:
        """One gradient pass per noisy copy."""
        return int(params["samples"])

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        return noisy_gradients(ctx, x, target, params).mean(dim=1)
