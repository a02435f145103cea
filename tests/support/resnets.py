"""Hand-written networks for tests and benchmarks: ResNet-18/50-shaped 2-D networks
(He et al., 2016, "Deep residual learning for image recognition") and a small 3-D CNN.

Only torch.nn: no torchvision. The ResNets follow torchvision's layout (7x7 stem with
stride 2, 3x3 max pool, four stages at strides 1, 2, 2, 2, global average pooling, a linear
head), with the base ``width`` in place of 64, and every ReLU its own ``nn.ReLU`` module
used once (so module hooks see each activation separately). The CAM layer of both is
``layer4`` (N x 8 width x H/32 x W/32 for resnet18, 4x that for resnet50). Random weights
unless trained; BatchNorm running statistics start at mean 0, variance 1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from xaiserve.runtime.model import ServedModel
from xaiserve.runtime.model_config import ModelConfig
from xaiserve.runtime.pixel_space import PixelSpaceModel

RESNET_CAM_LAYER = "layer4"
TINY3D_CAM_LAYER = "features.5"


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
    ]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut: relu(bn2(conv2(relu(bn1(conv1 x)))) + s(x))."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, width, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(width, width, 3)
        self.shortcut = _shortcut(cin, width * self.expansion, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand by 4, each with BN; shortcut added."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, width, 1)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.relu2 = nn.ReLU()
        self.conv3, self.bn3 = _conv_bn(width, width * self.expansion, 1)
        self.shortcut = _shortcut(cin, width * self.expansion, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """Identity, or a strided 1x1 conv + BN when the shape changes."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(*_conv_bn(cin, cout, 1, stride))


class ResNet(nn.Module):
    """Input N x C x H x W (normalized) -> logits N x num_classes."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: tuple[int, int, int, int],
        num_classes: int,
        width: int = 64,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_bn(in_channels, width, 7, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1)
        )
        stages, cin = [], width
        for i, depth in enumerate(depths):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(cin, width * 2**i, stride))
                cin = width * 2**i * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(num_classes: int = 1000, width: int = 64, in_channels: int = 3) -> ResNet:
    """ResNet-18 shape: basic blocks (2, 2, 2, 2); width 64 is the original."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, width, in_channels)


def resnet50(num_classes: int = 1000, width: int = 64, in_channels: int = 3) -> ResNet:
    """ResNet-50 shape: bottleneck blocks (3, 4, 6, 3); width 64 is the original."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, width, in_channels)


class Tiny3dNet(nn.Module):
    """A small volumetric CNN: N x C x D x H x W -> logits N x num_classes.

    conv3d-BN-ReLU, 2x max pool, conv3d-ReLU (``features.5``, the CAM layer, at half the
    input size), global average pooling, linear head. Any D, H, W >= 2 runs.
    """

    def __init__(self, num_classes: int = 3, in_channels: int = 1, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(in_channels, width, 3, padding=1),
            nn.BatchNorm3d(width),
            nn.ReLU(),
            nn.MaxPool3d(2),
            nn.Conv3d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3, 4)))


def resnet18_served(
    size: int,
    width: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    num_classes: int = 10,
) -> ServedModel:
    """A served ResNet-18 (random weights from seed 0) at 3 x ``size`` x ``size``, its
    CAM layer ``layer4``, labels "0".. , for benchmarks that need no model directory."""
    torch.manual_seed(0)
    net = resnet18(num_classes=num_classes, width=width)
    labels = tuple(str(i) for i in range(num_classes))
    cfg = ModelConfig(
        "resnet18", "1", "model.py", "ResNet", {}, "weights.pt",
        (3, size, size), mean, std, labels, RESNET_CAM_LAYER,
    )  # fmt: skip
    module = PixelSpaceModel(net, cfg.mean, cfg.std).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return ServedModel(cfg, module, net.get_submodule(RESNET_CAM_LAYER), Path("."))
