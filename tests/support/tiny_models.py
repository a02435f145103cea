"""Tiny models for engine tests: fast, deterministic, with BatchNorm and a CAM layer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from xaiserve.methods.base import MethodContext
from xaiserve.runtime.forward.counted import Budget, TorchForward
from xaiserve.runtime.model import ModelConfig, PixelSpaceModel, ServedModel

LABELS = ("a", "b", "c")


class TinyNet(nn.Module):
    """3 x 16 x 16 -> 3 logits; ``features.4`` is the CAM layer (last ReLU, 8 x 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1, stride=2),
            nn.ReLU(),
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def model_config(
    input_shape: tuple[int, ...],
    mean: float | Sequence[float] = 0.0,
    std: float | Sequence[float] = 1.0,
    labels: Sequence[str] = ("a", "b"),
    cam_layer: str = "",
    name: str = "m",
    model_class: str = "Net",
) -> ModelConfig:
    """A model's configuration for tests: input C x *spatial, ``mean``/``std`` per channel
    (one number: the same on every channel; 0 and 1: no normalization)."""
    channels = input_shape[0]
    return ModelConfig(
        name=name,
        version="1",
        model_file="model.py",
        model_class=model_class,
        model_kwargs={},
        weights="weights.pt",
        input_shape=tuple(input_shape),
        mean=(float(mean),) * channels if isinstance(mean, (int, float)) else tuple(mean),
        std=(float(std),) * channels if isinstance(std, (int, float)) else tuple(std),
        labels=tuple(labels),
        cam_layer=cam_layer,
    )


def tiny_served(seed: int = 0) -> ServedModel:
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net.features[1].running_mean.uniform_(-0.2, 0.2)
        net.features[1].running_var.uniform_(0.5, 1.5)
    cfg = model_config(
        (3, 16, 16), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), LABELS, "features.4", "tiny", "TinyNet"
    )
    module = PixelSpaceModel(net, cfg.mean, cfg.std).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return ServedModel(cfg, module, net.features[4], Path("."))


def make_context(served: ServedModel, max_batch: int = 16, budget: int = 10**6) -> MethodContext:
    b = Budget(budget)
    return MethodContext(served, TorchForward(served.module, b, max_batch), b, max_batch)


def write_tiny_model_dir(directory: Path, seed: int = 0, cam_layer: str = "features.4") -> Path:
    """Writes the tiny model as a model directory (config.yaml, model.py, weights.pt)."""
    import inspect

    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    source = "import torch\nfrom torch import nn\n\n\n" + inspect.getsource(TinyNet)
    (directory / "model.py").write_text(source)
    served = tiny_served(seed)
    torch.save(served.module.net.state_dict(), directory / "weights.pt")
    cfg = served.config
    config = {
        "name": cfg.name,
        "version": cfg.version,
        "model": {"file": "model.py", "class": "TinyNet", "kwargs": {}},
        "weights": "weights.pt",
        "input": {"channels": 3, "height": 16, "width": 16},
        "normalize": {"mean": list(cfg.mean), "std": list(cfg.std)},
        "labels": list(cfg.labels),
        "cam_layer": cam_layer,
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return directory
