"""Surrogate-model attributions on grid superpixels: the shared part of LIME and
KernelSHAP.

For each image: S binary vectors z over the M cells (``sample``), the target logit of the
image with the cells where z = 0 set to ``baseline`` (forward-only, counted, batched), a
weight per sample (``weights``), and a weighted least-squares linear fit
f_y(x_z) ~ b + z . c. Every pixel of cell m gets c_m on every channel:
N x C x *spatial. The logits are explained, so KernelSHAP's values add up to
f_y(x) - f_y(baseline image) in logit space. The same seed gives every image the same
masks, so a batched call equals one call per image. Volumes use cubic cells.
"""

from __future__ import annotations

from typing import Any

import torch

from xaiserve.methods.base import AttributionMethod, MethodContext, Param
from xaiserve.methods.perturbation.superpixels import (
    grid_segments,
    masked_logits,
    weighted_linear_fit,
)
from xaiserve.runtime.model import ServedModel


class SurrogateMethod(AttributionMethod):
    """Subclasses define ``sample`` (the masks) and ``weights`` (their kernel)."""

    needs_gradients = False
    forward_only = True
    params = (
        Param("samples", int, 256, 8, 4096, "random on/off masks evaluated"),
        Param("segments", int, 64, 4, 1024, "approximate number of grid cells"),
        Param("baseline", float, 0.5, 0.0, 1.0, "value of switched-off cells"),
        Param("seed", int, 0, 0, 2**63 - 1, "seed of the sampler"),
    )
    cost_advice = "ask for fewer samples"

    def max_forward_passes(self, params: dict[str, Any], served: ServedModel) -> int:
        """One masked copy per sample."""
        return int(params["samples"])

    def sample(self, cells: int, samples: int, generator: torch.Generator) -> torch.Tensor:
        """S x M binary masks (long, CPU; ``generator`` is a CPU generator)."""
        raise NotImplementedError

    def weights(self, z: torch.Tensor) -> torch.Tensor:
        """S float32 sample weights of the fit (z's device)."""
        raise NotImplementedError

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        """Masks, weights and the fit on the CPU (the same draws on every device; the
        fit's driver is CPU-only), the masked images on x's device; returns on x's device."""
        labels, cells = grid_segments(tuple(x.shape[2:]), params["segments"])
        generator = torch.Generator(device="cpu").manual_seed(params["seed"])
        z = self.sample(cells, params["samples"], generator)
        w = self.weights(z)
        out = []
        for i in range(x.shape[0]):
            y = masked_logits(ctx, x[i : i + 1], target[i : i + 1], z, labels, params["baseline"])
            coef = weighted_linear_fit(z, y.cpu(), w).to(x.dtype)
            out.append(coef[labels].expand(x.shape[1], *labels.shape))
        return torch.stack(out).to(x.device)
