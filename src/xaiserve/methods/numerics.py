"""Small numerical helpers shared by several methods."""

from __future__ import annotations

import torch
from torch import nn


def safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den element-wise (broadcasting), 0 where den == 0."""
    zero = den == 0
    ratio = num / torch.where(zero, torch.ones_like(den), den)
    return torch.where(zero, torch.zeros_like(ratio), ratio)


def batchnorm_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm as y = k x + t per channel: k = gamma / sqrt(var + eps),
    t = beta - mean k.

    Raises:
        TypeError: ``bn`` is not a BatchNorm layer with running statistics.
    """
    if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        raise TypeError(f"not a BatchNorm layer: {type(bn).__name__}")
    if bn.running_var is None or bn.running_mean is None:
        raise TypeError("a BatchNorm layer without running statistics is not affine")
    k = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        k = k * bn.weight
    t = -bn.running_mean * k
    if bn.bias is not None:
        t = t + bn.bias
    return k.detach(), t.detach()
