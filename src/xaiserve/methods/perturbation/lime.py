"""LIME on superpixels (Ribeiro et al., 2016, "Why should I trust you?").

Masks: the all-on vector first (the image itself), then cells kept independently with
probability 1/2. Weights: the exponential kernel of lime_image on the cosine distance to
the all-on vector, kernel width 0.25:

    d(z) = 1 - cos(z, 1) = 1 - sqrt(|z| / M)    (d = 1 for z = 0)
    w(z) = sqrt(exp(-d^2 / 0.25^2))

Surrogate: weighted least squares with intercept (lime's default is ridge regression with
alpha = 1; Captum's Lasso with alpha = 0.01; no regularization keeps the fit exact for a
model linear in the cells). See ``surrogate`` for the rest.
"""

from __future__ import annotations

import torch

from xaiserve.methods.perturbation.surrogate import SurrogateMethod

KERNEL_WIDTH = 0.25


class Lime(SurrogateMethod):
    name = "lime"

    def sample(self, cells: int, samples: int, generator: torch.Generator) -> torch.Tensor:
        coins = torch.rand(samples - 1, cells, generator=generator, device="cpu") < 0.5
        return torch.cat([torch.ones(1, cells, dtype=torch.long, device="cpu"), coins.long()])

    def weights(self, z: torch.Tensor) -> torch.Tensor:
        kept = z.sum(dim=1).float()
        distance = torch.where(kept > 0, 1 - torch.sqrt(kept / z.shape[1]), torch.ones_like(kept))
        return torch.sqrt(torch.exp(-distance.pow(2) / KERNEL_WIDTH**2))
