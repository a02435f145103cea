"""Visualization stages of a raw attribution (seed 004, sections 4.2 and 4.4).

- ``raw``: the method's output as it is, N x C x *spatial (signed).
- ``one_channel``: |a|, clamped at its 99th percentile (per sample), summed over channels,
  divided by its maximum: N x 1 x *spatial in [0, 1].
- ``times_image``: as ``one_channel``, but the clamped |a| is multiplied by the input image
  before the channel sum (Smilkov et al., 2017).

A map that is zero everywhere stays zero (no division by zero).
"""

from __future__ import annotations

import torch

from xaiserve.api.errors import InvalidArgument
from xaiserve.api.types import STAGES

CLAMP_QUANTILE = 0.99


def clamp_abs(attr: torch.Tensor, quantile: float = CLAMP_QUANTILE) -> torch.Tensor:
    """|attr| clamped per sample at its ``quantile`` (linear interpolation, as numpy).

    attr: N x C x *spatial -> same shape, non-negative.
    """
    magnitude = attr.abs()
    flat = magnitude.flatten(1)
    bound = torch.quantile(flat, quantile, dim=1)
    return torch.minimum(magnitude, bound.view(-1, *([1] * (attr.dim() - 1))))


def scale_to_unit(x: torch.Tensor) -> torch.Tensor:
    """Divides each sample by its maximum; all-zero samples stay zero. x >= 0."""
    peak = x.flatten(1).amax(dim=1).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(peak > 0, x / torch.where(peak > 0, peak, 1.0), torch.zeros_like(x))


def apply_stage(attr: torch.Tensor, image: torch.Tensor, stage: str) -> torch.Tensor:
    """Turns a raw attribution into the map of ``stage``.

    attr: N x C' x *spatial (C' = C, or 1 for CAM maps); image: N x C x *spatial in [0, 1].
    """
    if stage == "raw":
        return attr
    if stage not in STAGES:
        raise InvalidArgument("stage", f"unknown stage {stage!r}; use one of {STAGES}")
    clamped = clamp_abs(attr)
    if stage == "times_image":
        clamped = clamped * image
    return scale_to_unit(clamped.sum(dim=1, keepdim=True))
