"""SmoothGrad: the gradient averaged over noisy copies of the input (Smilkov et al., 2017).

a(x) = 1/n sum_i grad f_y(x + z_i), z_i ~ N(0, sigma^2), sigma = noise_level * (max x - min x)
per sample. The noise comes from a generator seeded by the ``seed`` parameter, drawn for all
samples of an image at once in the order Captum's NoiseTunnel uses, so equal seeds give
equal noise.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import AttributionMethod, MethodContext, Param, input_gradients


def smoothgrad_noise(
    x: torch.Tensor, samples: int, noise_level: float, seed: int
) -> torch.Tensor:
    """Noise for every copy: x N x C x *spatial -> (N * samples) x C x *spatial.

    Rows are sample-major (image 0's copies first), as ``repeat_interleave`` orders them.
    """
    spread = (x.flatten(1).amax(1) - x.flatten(1).amin(1)) * noise_level
    std = spread.repeat_interleave(samples).view(-1, *([1] * (x.dim() - 1)))
    std = std.expand(x.shape[0] * samples, *x.shape[1:])
    generator = torch.Generator().manual_seed(seed)
    return torch.normal(torch.zeros_like(std), std, generator=generator)


class SmoothGrad(AttributionMethod):
    name = "smoothgrad"
    params = (
        Param("samples", int, 25, 1, 1024, "noisy copies averaged"),
        Param("noise_level", float, 0.15, 0.0, 1.0, "noise std as a fraction of the range"),
        Param("seed", int, 0, 0, 2**63 - 1, "seed of the noise"),
    )

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        n = params["samples"]
        noisy = x.repeat_interleave(n, dim=0)
        noisy = noisy + smoothgrad_noise(x, n, params["noise_level"], params["seed"])
        grads = input_gradients(ctx, noisy, target.repeat_interleave(n))
        return grads.view(x.shape[0], n, *x.shape[1:]).mean(dim=1)
