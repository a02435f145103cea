"""Served networks for the method tests: the tiny 2-D model's siblings, ResNet-shaped and
3-D networks, wrapped as the engine serves them (pixel space, eval mode, frozen)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from support.resnets import RESNET_CAM_LAYER, TINY3D_CAM_LAYER, Tiny3dNet, resnet18
from support.tiny_models import model_config
from xaiserve.runtime.model import PixelSpaceModel, ServedModel


def served_from_net(
    net: nn.Module,
    input_shape: tuple[int, ...],
    cam_layer: str = "",
    mean: float = 0.0,
    std: float = 1.0,
    labels: int = 3,
) -> ServedModel:
    """``net`` served with the same mean/std on every channel (0 and 1: no normalization)."""
    names = [f"class{i}" for i in range(labels)]
    cfg = model_config(input_shape, mean, std, names, cam_layer, "net", type(net).__name__)
    module = PixelSpaceModel(net, cfg.mean, cfg.std).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    layer = net.get_submodule(cam_layer) if cam_layer else None
    return ServedModel(cfg, module, layer, Path("."))


def randomize_batchnorm(net: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)


def resnet_served(width: int = 8, side: int = 64, seed: int = 0) -> ServedModel:
    """ResNet-18 shape at ``width``, input 3 x side x side, 5 classes, CAM layer layer4."""
    torch.manual_seed(seed)
    net = resnet18(num_classes=5, width=width)
    randomize_batchnorm(net, seed)
    return served_from_net(net, (3, side, side), RESNET_CAM_LAYER, 0.45, 0.25, labels=5)


def volume_served(seed: int = 0) -> ServedModel:
    """Tiny3dNet on 1 x 8 x 12 x 12 volumes, 3 classes, CAM layer features.5."""
    torch.manual_seed(seed)
    net = Tiny3dNet(num_classes=3, in_channels=1)
    randomize_batchnorm(net, seed)
    return served_from_net(net, (1, 8, 12, 12), TINY3D_CAM_LAYER, 0.5, 0.2)


class FunctionalRelu(nn.Module):
    """Conv, ReLU applied as a function (``torch.relu``, no nn.ReLU module), mean, linear:
    3 x H x W -> 3 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class WithGelu(nn.Module):
    """Conv, GELU (module ``act``), mean, linear: 3 x H x W -> 3 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.GELU()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).mean(dim=(2, 3)))
