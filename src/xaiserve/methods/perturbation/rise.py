"""RISE (Petsiuk et al., 2018, "RISE: randomized input sampling for explanation of
black-box models").

Masks: a cells^d binary grid, each cell kept with probability p, upsampled (bi/trilinear,
align_corners=False) to (cells + 1) * ceil(side / cells) per axis and cropped at a random
shift in [0, ceil(side / cells)), giving smooth masks M_i in [0, 1] of the input size.

    map(x) = 1 / (n p) * sum_i softmax(f(x * M_i))_y * M_i

(the masked pixels go to 0, the paper's black baseline; its probability score). The masks
depend on the seed only, so every image of a batch gets the same ones. Forward-only:
n masked copies per image through ``ctx.forward`` in batches, masks built batch by batch.
Shapes: x N x C x *spatial (2-D or 3-D) -> N x 1 x *spatial.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from xaiserve.api.errors import InvalidArgument
from xaiserve.methods.base import AttributionMethod, MethodContext, Param
from xaiserve.runtime.forward.counted import batches
from xaiserve.runtime.forward.incremental.boxes import boxes_at
from xaiserve.runtime.model import ServedModel


def rise_masks(
    grids: torch.Tensor, shifts: torch.Tensor, spatial: tuple[int, ...], cells: int
) -> torch.Tensor:
    """grids: n x 1 x cells^d (0/1), shifts: n x d -> masks n x 1 x *spatial, on the CPU."""
    step = [math.ceil(s / cells) for s in spatial]
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    up = F.interpolate(grids, size=[(cells + 1) * c for c in step], mode=mode, align_corners=False)
    # every mask's crop in one copy of a strided view, not a slice per mask
    # (docs/performance.md)
    return torch.from_numpy(boxes_at(up.cpu().numpy(), shifts.cpu().numpy(), spatial))


class Rise(AttributionMethod):
    name = "rise"
    needs_gradients = False
    forward_only = True
    params = (
        Param("masks", int, 1000, 8, 8192, "random masks"),
        Param("cells", int, 8, 2, 64, "cells per side of the low-resolution masks"),
        Param("keep_probability", float, 0.5, 0.0, 1.0, "probability a cell is kept"),
        Param("seed", int, 0, 0, 2**63 - 1, "seed of the masks"),
    )
    cost_advice = "ask for fewer masks"

    def max_forward_passes(self, params: dict[str, Any], served: ServedModel) -> int:
        """One masked copy per mask."""
        return int(params["masks"])

    def check_params(
        self, params: dict[str, Any], input_shape: tuple[int, ...], field: str
    ) -> None:
        if not 0 < params["keep_probability"] < 1:
            raise InvalidArgument(
                f"{field}.keep_probability",
                f"must be strictly between 0 and 1, got {params['keep_probability']:g}",
            )
        smallest = min(input_shape[1:])
        if params["cells"] > smallest:
            raise InvalidArgument(
                f"{field}.cells",
                f"{params['cells']} cells per side is more than the input's {smallest} pixels",
            )

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        n, cells, p = params["masks"], params["cells"], params["keep_probability"]
        spatial = tuple(x.shape[2:])
        # the masks are drawn and built on the CPU (the same on every device), then moved
        cpu = torch.device("cpu")
        generator = torch.Generator(device=cpu).manual_seed(params["seed"])
        grid_shape = (n, 1, *([cells] * len(spatial)))
        grids = (torch.rand(grid_shape, generator=generator, device=cpu) < p).float()
        shifts = torch.stack(
            [
                torch.randint(0, math.ceil(s / cells), (n,), generator=generator, device=cpu)
                for s in spatial
            ],
            1,
        )
        total = torch.zeros(x.shape[0], 1, *spatial, device=x.device)
        for part in batches(n, ctx.forward.batch_size):
            masks = rise_masks(grids[part], shifts[part], spatial, cells).to(x.device)
            for i in range(x.shape[0]):
                probs = torch.softmax(ctx.forward(x[i : i + 1] * masks, "attribute"), dim=1)
                score = probs[:, target[i]].view(-1, *([1] * (masks.dim() - 1)))
                total[i] += (score * masks).sum(dim=0)
        return total / (n * p)
