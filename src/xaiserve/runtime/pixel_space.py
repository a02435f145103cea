"""The served module: a network wrapped to take pixel-space input.

Its own module so that the stores of support models (gad_store) can name the type
without importing the model loader.
"""

from __future__ import annotations

import torch
from torch import nn


class PixelSpaceModel(nn.Module):
    """Wraps a network so it takes pixel-space input: ``net((x - mean) / std)``.

    x: N x C x H x W (or N x C x D x H x W) in [0, 1]; returns logits N x K.
    """

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.net((x - self.mean.view(shape)) / self.std.view(shape))
