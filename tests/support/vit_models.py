"""The small ViT of ``support.vits`` served as the engine serves it, and written as a model
directory (config.yaml, model.py, weights.pt)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from support import vits
from support.method_models import served_from_net
from xaiserve.runtime.model import ServedModel

VIT_SIDE = 16
VIT_MEAN = 0.45
VIT_STD = 0.25


def vit_net(seed: int = 0) -> vits.TinyViT:
    """TinyViT on 3 x 16 x 16 inputs (4 x 4 patches of 4 pixels), 3 classes, seeded."""
    torch.manual_seed(seed)
    return vits.TinyViT(num_classes=3, size=VIT_SIDE, patch=4, dim=16, depth=3, heads=2).eval()


def vit_served(seed: int = 0) -> ServedModel:
    """The ViT served with ``VIT_MEAN``/``VIT_STD`` normalization and its last block as
    the CAM layer."""
    net = vit_net(seed)
    return served_from_net(net, (3, VIT_SIDE, VIT_SIDE), vits.VIT_CAM_LAYER, VIT_MEAN, VIT_STD)


def write_vit_model_dir(directory: Path, seed: int = 0) -> Path:
    """Writes the ViT as a model directory: its source file copied as model.py."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.py").write_text(Path(vits.__file__).read_text())
    torch.save(vit_net(seed).state_dict(), directory / "weights.pt")
    config = {
        "name": "vit",
        "version": "1",
        "model": {"file": "model.py", "class": "TinyViT", "kwargs": {"num_classes": 3}},
        "weights": "weights.pt",
        "input": {"channels": 3, "height": VIT_SIDE, "width": VIT_SIDE},
        "normalize": {"mean": [VIT_MEAN] * 3, "std": [VIT_STD] * 3},
        "labels": ["a", "b", "c"],
        "cam_layer": vits.VIT_CAM_LAYER,
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return directory
