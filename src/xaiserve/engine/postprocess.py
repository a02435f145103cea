"""Visualization stages of a raw attribution (seed 004, sections 4.2 and 4.4).

The seed's visualization function, for a relevance matrix a (C x *spatial per sample):
take |a|, clamp it at the 99th percentile of those absolute values (all C x *spatial of
them), then either keep the channels (stage 1), sum them (stage 2) or multiply by the image
and sum (stage 3), and normalize to [0, 1] by min-max (the public reference code's
``save_image(..., normalize=True)``). So, per sample, with ``q`` the 99th percentile of
|a| (linear interpolation, as numpy) and ``c = min(|a|, q)``:

- ``raw``: the method's output as it is, N x C x *spatial (signed); not a seed stage.
- ``three_channel`` (stage 1): minmax(c), N x C x *spatial in [0, 1].
- ``one_channel`` (stage 2): minmax(sum_C c), N x 1 x *spatial in [0, 1].
- ``times_image`` (stage 3): minmax(sum_C c * image), N x 1 x *spatial in [0, 1]
  (Smilkov et al., 2017): the final map of the seed's visualization function.

minmax(v) = (v - min v) / (max v - min v); a map without spread (all values equal, e.g.
all zero) becomes all zeros. Maps of one channel (the CAM family) keep their one channel
at stage 1.
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
    """Min-max scaling of each sample to [0, 1]: (x - min) / (max - min); samples whose
    values are all equal become zeros. x: N x ... -> same shape."""
    flat = x.flatten(1)
    shape = (-1, *([1] * (x.dim() - 1)))
    low = flat.amin(dim=1).view(shape)
    spread = flat.amax(dim=1).view(shape) - low
    positive = spread > 0
    return torch.where(positive, (x - low) / torch.where(positive, spread, 1.0), 0.0)


def apply_stage(attr: torch.Tensor, image: torch.Tensor, stage: str) -> torch.Tensor:
    """Turns a raw attribution into the map of ``stage`` (module docstring).

    attr: N x C' x *spatial (C' = C, or 1 for CAM maps); image: N x C x *spatial in [0, 1].
    """
    if stage == "raw":
        return attr
    if stage not in STAGES:
        raise InvalidArgument("stage", f"unknown stage {stage!r}; use one of {STAGES}")
    clamped = clamp_abs(attr)
    if stage == "three_channel":
        return scale_to_unit(clamped)
    if stage == "times_image":
        clamped = clamped * image
    return scale_to_unit(clamped.sum(dim=1, keepdim=True))
