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
    t = beta - mean k."""
    k = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        k = k * bn.weight
    t = -bn.running_mean * k
    if bn.bias is not None:
        t = t + bn.bias
    return k.detach(), t.detach()
