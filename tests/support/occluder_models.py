"""Models and window grids the incremental occlusion tests share."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from support import resnets
from xaiserve.methods.perturbation.occlusion import window_starts
from xaiserve.runtime.model import PixelSpaceModel

BACKENDS = ("torch", "onnxruntime")


def pixel_model(net: nn.Module) -> PixelSpaceModel:
    module = PixelSpaceModel(net.eval(), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def small_resnet18() -> PixelSpaceModel:
    torch.manual_seed(0)
    return pixel_model(resnets.resnet18(num_classes=5, width=8))


def all_corners(shape: tuple[int, ...], window: int, stride: int) -> tuple[list, list]:
    axes = [window_starts(n, window, stride) for n in shape[1:]]
    return axes, list(itertools.product(*axes))
