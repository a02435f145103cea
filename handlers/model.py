"""Model directories: ``config.yaml`` + model code + weights, loaded into a servable model.

A model directory holds::

    config.yaml   name, version, model code and class, weights, input size, normalization,
                  labels, CAM layer (see ModelConfig)
    model.py      the network's code (trusted, as in any model archive)
    weights.pt    a state dict, loaded with torch.load(weights_only=True): no arbitrary
                  objects are unpickled
    calibration.json, calibration.npz   optional: the data-set calibration of the CAM
                  methods (``xaiserve calibrate``, see ``calibration``)
    gad/          optional: GAD support models (``xaiserve gad-train``, see ``gad_store``)

The engine works in pixel space [0, 1]: ``ServedModel.module`` applies the configured
mean/std itself, so every attribution is with respect to the pixels the client sent.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .artifacts import file_sha256
from .calibration import Calibration, load_calibration
from .errors import ModelLoadError
from .gad_store import GadSupport, load_gad_support

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ModelConfig:
    """The contents of ``config.yaml``."""

    name: str
    version: str
    model_file: str
    model_class: str
    model_kwargs: dict[str, Any]
    weights: str
    input_shape: tuple[int, ...]  # C x H x W (C x D x H x W for volumetric models)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    cam_layer: str = ""

    @property
    def channels(self) -> int:
        return self.input_shape[0]

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.input_shape[1:]


def _require(raw: dict[str, Any], key: str, path: Path) -> Any:
    if key not in raw:
        raise ModelLoadError(f"{path}: missing key '{key}'")
    return raw[key]


def read_config(path: Path) -> ModelConfig:
    """Parses and validates ``config.yaml``; raises ModelLoadError with the file and key."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ModelLoadError(f"{path}: {err}") from err
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a mapping")
    name = str(_require(raw, "name", path))
    if not _NAME_RE.match(name):
        raise ModelLoadError(f"{path}: invalid model name {name!r}")
    model = _require(raw, "model", path)
    inp = _require(raw, "input", path)
    norm = raw.get("normalize", {})
    channels = int(inp["channels"])
    spatial = tuple(int(inp[k]) for k in ("depth", "height", "width") if k in inp)
    mean = tuple(float(v) for v in norm.get("mean", [0.0] * channels))
    std = tuple(float(v) for v in norm.get("std", [1.0] * channels))
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ModelLoadError(f"{path}: normalize.mean/std need {channels} values, std > 0")
    labels = tuple(str(v) for v in _require(raw, "labels", path))
    if len(labels) < 2:
        raise ModelLoadError(f"{path}: at least two labels are needed")
    return ModelConfig(
        name=name,
        version=str(raw.get("version", "1")),
        model_file=str(model.get("file", "model.py")),
        model_class=str(_require(model, "class", path)),
        model_kwargs=dict(model.get("kwargs") or {}),
        weights=str(raw.get("weights", "weights.pt")),
        input_shape=(channels, *spatial),
        mean=mean,
        std=std,
        labels=labels,
        cam_layer=str(raw.get("cam_layer") or ""),
    )


class PixelSpaceModel(nn.Module):
    """Wraps a network so it takes pixel-space input: ``net((x - mean) / std)``.

    x: N x C x H x W (or N x C x D x H x W) in [0, 1]; returns logits N x K.
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.net((x - self.mean.view(shape)) / self.std.view(shape))


@dataclass
class ServedModel:
    """A loaded model: its configuration, pixel-space module and CAM layer (if any).

    calibration: the data-set calibration of the CAM methods (seed 003), when stored.
    gad: the GAD support models (seed 002), when stored.
    """

    config: ModelConfig
    module: PixelSpaceModel
    cam_layer: nn.Module | None
    directory: Path
    calibration: Calibration | None = None
    gad: GadSupport | None = None


def _import_model_class(directory: Path, cfg: ModelConfig) -> type[nn.Module]:
    file = (directory / cfg.model_file).resolve()
    if directory.resolve() not in file.parents or not file.is_file():
        raise ModelLoadError(f"{directory}: model file {cfg.model_file!r} not found inside it")
    module_name = f"xaiserve_model_{cfg.name.replace('-', '_').replace('.', '_')}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"{file}: cannot import")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the model's own code failed
        raise ModelLoadError(f"{file}: import failed: {err}") from err
    cls = getattr(module, cfg.model_class, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelLoadError(f"{file}: no nn.Module class {cfg.model_class!r}")
    return cls


def load_model_dir(directory: Path) -> ServedModel:
    """Loads one model directory (config, code, weights) into eval mode on the CPU."""
    directory = Path(directory)
    cfg = read_config(directory / "config.yaml")
    cls = _import_model_class(directory, cfg)
    try:
        net = cls(**cfg.model_kwargs)
    except Exception as err:
        raise ModelLoadError(f"{directory}: constructing {cfg.model_class} failed: {err}") from err
    weights = directory / cfg.weights
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as err:  # unreadable file, pickled objects refused, shape mismatch
        raise ModelLoadError(f"{weights}: {err}") from err
    cam = None
    if cfg.cam_layer:
        try:
            cam = net.get_submodule(cfg.cam_layer)
        except AttributeError as err:
            raise ModelLoadError(f"{directory}: cam_layer {cfg.cam_layer!r} not found") from err
    module = _pixel_space(net, cfg)
    sha = file_sha256(weights)
    calibration = load_calibration(directory, cfg.cam_layer, sha)

    def support_module(support_state: dict[str, torch.Tensor]) -> nn.Module:
        support = cls(**cfg.model_kwargs)
        support.load_state_dict(support_state)
        return _pixel_space(support, cfg)

    gad = load_gad_support(directory, support_module, sha, len(cfg.labels))
    log.info("loaded model %s version %s from %s", cfg.name, cfg.version, directory)
    return ServedModel(config=cfg, module=module, cam_layer=cam, directory=directory,
                       calibration=calibration, gad=gad)


def _pixel_space(net: nn.Module, cfg: ModelConfig) -> PixelSpaceModel:
    """``net`` wrapped for pixel-space input, in eval mode, parameters frozen."""
    module = PixelSpaceModel(net, cfg.mean, cfg.std).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
