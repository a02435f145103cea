"""Superpixels as a regular grid, and the masked forward passes built on them.

A grid of square cells (cubes for volumes) of side s = round((prod spatial / segments)
^ (1 / dims)), at least 1, the last cell of an axis cut at the border: about ``segments``
cells, exactly ceil(d_1 / s) * ... * ceil(d_k / s). A binary vector z (one entry per cell)
keeps the cells where it is 1 and replaces the others by a constant baseline value.
"""

from __future__ import annotations

import math

import torch

from xaiserve.methods.base import MethodContext, target_logits
from xaiserve.runtime.forward.counted import batches


def grid_segments(spatial: tuple[int, ...], segments: int) -> tuple[torch.Tensor, int]:
    """(labels: *spatial long tensor of cell indices, row-major, on the CPU; number of
    cells)."""
    side = max(1, round((math.prod(spatial) / segments) ** (1.0 / len(spatial))))
    labels = torch.zeros(spatial, dtype=torch.long, device="cpu")
    count = 1
    for axis, d in enumerate(spatial):
        cells = math.ceil(d / side)
        index = (torch.arange(d, device="cpu") // side).view(
            *([1] * axis), d, *([1] * (len(spatial) - axis - 1))
        )
        labels = labels * cells + index
        count *= cells
    return labels, count


def masked_logits(
    ctx: MethodContext,
    x: torch.Tensor,
    target: torch.Tensor,
    z: torch.Tensor,
    labels: torch.Tensor,
    baseline: float,
) -> torch.Tensor:
    """Target logits of one image with cells switched off.

    x: 1 x C x *spatial; target: 1; z: S x M in {0, 1}; labels: *spatial (z's device) -> S
    logits. Batches of ``ctx.forward.batch_size`` go through the counted forward
    (ONNX-ready); each batch's masks are moved to x's device.
    """
    scores = []
    for part in batches(z.shape[0], ctx.forward.batch_size):
        keep = z[part][:, labels].unsqueeze(1).to(x.device, x.dtype)  # s x 1 x *spatial
        images = x * keep + baseline * (1 - keep)
        logits = ctx.forward(images, "attribute")
        scores.append(target_logits(logits, target.expand(images.shape[0])))
    return torch.cat(scores)


def weighted_linear_fit(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Coefficients c of min_{b, c} sum_s w_s (y_s - b - z_s . c)^2, in float64.

    z: S x M, y: S, w: S (>= 0) -> M (the intercept b is dropped). Minimum-norm solution
    when the system is underdetermined.
    """
    z, y, w = z.double(), y.double(), w.double()
    design = torch.cat([torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device), z], dim=1)
    root = w.sqrt().unsqueeze(1)
    solution = torch.linalg.lstsq(design * root, (y.unsqueeze(1) * root), driver="gelsd")
    return solution.solution[1:, 0]
