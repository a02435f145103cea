"""Occlusion (Zeiler and Fergus, 2014): the drop of the target logit when a window is
replaced by a baseline value.

Windows of side ``window`` slide with step ``stride`` over every spatial axis, all channels
at once; when (side - window) is not a multiple of stride a last window flush with the
border is added, so every pixel is covered. A pixel's attribution is the mean drop
f_y(x) - f_y(x with window occluded) over the windows covering it; all channels get the same
value. Forward-only: occluded copies go through the model in counted batches.

Captum's Occlusion uses the same definition but leaves the border remainder uncovered; the
two agree exactly when (side - window) is a multiple of stride.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from ..errors import InvalidArgument
from ..forward import batches
from .base import AttributionMethod, MethodContext, Param, target_logits


def window_starts(side: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis, the last window flush with the border."""
    starts = list(range(0, side - window + 1, stride))
    if starts[-1] != side - window:
        starts.append(side - window)
    return starts


class Occlusion(AttributionMethod):
    name = "occlusion"
    needs_gradients = False
    forward_only = True
    params = (
        Param("window", int, 8, 1, None, "side of the square window in pixels"),
        Param("stride", int, 4, 1, None, "step between windows in pixels"),
        Param("baseline", float, 0.5, 0.0, 1.0, "value replacing the occluded pixels"),
    )

    def check_params(
        self, params: dict[str, Any], input_shape: tuple[int, ...], field: str
    ) -> None:
        smallest = min(input_shape[1:])
        if params["window"] > smallest:
            raise InvalidArgument(
                f"{field}.window",
                f"window {params['window']} is larger than the model input ({smallest} pixels)",
            )
        if params["stride"] > params["window"]:
            raise InvalidArgument(
                f"{field}.stride",
                f"stride {params['stride']} is larger than the window {params['window']} "
                "(pixels would be left out)",
            )

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        w, s = params["window"], params["stride"]
        spatial = tuple(x.shape[2:])
        boxes = [
            tuple(slice(a, a + w) for a in corner)
            for corner in itertools.product(*(window_starts(d, w, s) for d in spatial))
        ]
        base = target_logits(ctx.forward(x, "attribute"), target)  # N
        total = torch.zeros(x.shape[0], 1, *spatial)
        count = torch.zeros(1, 1, *spatial)
        for box in boxes:
            count[(..., *box)] += 1
        for i in range(x.shape[0]):
            xi, yi = x[i : i + 1], target[i : i + 1]
            for part in batches(len(boxes), ctx.max_batch):
                chunk = boxes[part]
                occluded = xi.repeat(len(chunk), *([1] * (x.dim() - 1)))
                for j, box in enumerate(chunk):
                    occluded[(j, slice(None), *box)] = params["baseline"]
                scores = target_logits(ctx.forward(occluded, "attribute"), yi.expand(len(chunk)))
                drops = base[i] - scores
                for j, box in enumerate(chunk):
                    total[(i, slice(None), *box)] += drops[j]
        return (total / count).expand(-1, x.shape[1], *spatial).contiguous()
