"""The demo network: a small CNN for the synthetic shape images.

This file is self-contained (it imports only torch): it is copied verbatim into the demo
model directory as ``model.py`` and loaded from there by the serving engine.
"""

from __future__ import annotations

import torch
from torch import nn

DEMO_CAM_LAYER = "features.14"
"""Dotted path of the module whose output is the last spatial feature map (N x 64 x H/8 x W/8)."""


def _conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    """3x3 convolution (same padding), batch norm and a non-inplace ReLU."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=False),
    ]


class DemoCNN(nn.Module):
    """Four conv blocks, each but the last followed by a 2x2 max pool, then global average
    pooling and a linear classifier.

    Input N x 3 x H x W (normalized); any H, W of at least 8 runs (multiples of 8 keep the
    feature map aligned with the pixels). Output: logits N x num_classes. ``features`` ends
    with the ReLU named by ``DEMO_CAM_LAYER``, whose output N x 64 x H/8 x W/8 (8 x 8 for
    the 64 x 64 demo images) is the Grad-CAM layer.
    """

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_block(3, 16),  # 0 conv, 1 bn, 2 relu
            nn.MaxPool2d(2),  # 3
            *_conv_block(16, 32),  # 4 conv, 5 bn, 6 relu
            nn.MaxPool2d(2),  # 7
            *_conv_block(32, 64),  # 8 conv, 9 bn, 10 relu
            nn.MaxPool2d(2),  # 11
            *_conv_block(64, 64),  # 12 conv, 13 bn, 14 relu  <- DEMO_CAM_LAYER
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits N x num_classes for normalized images N x 3 x H x W."""
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)
