"""A model directory's ``config.yaml``: parsed and validated into a :class:`ModelConfig`.

See :mod:`.model` for the directory as a whole and the README for the format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from xaiserve.api.errors import ModelLoadError
from xaiserve.runtime.formats import CLASS, DEFAULT_FILES, EXPORT, FORMATS, ONNX, TORCHSCRIPT
from xaiserve.runtime.forward.config import device_spec

#: Model names: what ExplainRequest.model_name and archive names may hold.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ModelConfig:
    """The contents of ``config.yaml``.

    device: where this model runs (``auto``, ``cpu``, ``cuda``, ``cuda:N``), over the
        server's ``--device``; "" (not set): the server's.
    format: ``class`` (model_file/model_class + a state dict in ``weights``),
        ``torchscript`` or ``export`` (``weights`` is then the program; model_file and
        model_class are "" and unused); see :mod:`.formats` for the detection rule.
    """

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
    device: str = ""
    format: str = CLASS

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


def _mapping(raw: dict[str, Any], key: str, path: Path, required: bool = True) -> dict[str, Any]:
    """``raw[key]`` as a mapping ({} when absent and not required)."""
    value = _require(raw, key, path) if required else raw.get(key) or {}
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: '{key}' must be a mapping, got {type(value).__name__}")
    return value


def _numbers(values: Any, kind: type, key: str, path: Path) -> tuple[Any, ...]:
    """``values`` (a list) as a tuple of ``kind``; ModelLoadError naming ``key`` otherwise."""
    if not isinstance(values, list):
        raise ModelLoadError(f"{path}: '{key}' must be a list, got {type(values).__name__}")
    try:
        if kind is int and not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError("not whole numbers")
        return tuple(kind(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"{path}: '{key}' must hold {kind.__name__} values: {err}") from None


def read_config(path: Path) -> ModelConfig:
    """Parses and validates ``config.yaml``; raises ModelLoadError with the file and key."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ModelLoadError(f"{path}: {err}") from err
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a mapping")
    name = str(_require(raw, "name", path))
    if not NAME_RE.match(name):
        raise ModelLoadError(f"{path}: invalid model name {name!r}")
    fmt = _format(raw, path)
    model = _mapping(raw, "model", path, required=fmt == CLASS)
    inp = _mapping(raw, "input", path)
    norm = _mapping(raw, "normalize", path, required=False)
    (channels,) = _numbers([_require(inp, "channels", path)], int, "input.channels", path)
    axes = [k for k in ("depth", "height", "width") if k in inp]
    spatial = _numbers([inp[k] for k in axes], int, f"input.{'/'.join(axes)}", path)
    if channels < 1 or min(spatial, default=1) < 1:
        raise ModelLoadError(f"{path}: input sizes must be >= 1")
    mean = _numbers(norm.get("mean", [0.0] * channels), float, "normalize.mean", path)
    std = _numbers(norm.get("std", [1.0] * channels), float, "normalize.std", path)
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ModelLoadError(f"{path}: normalize.mean/std need {channels} values, std > 0")
    labels = _require(raw, "labels", path)
    if not isinstance(labels, list) or len(labels) < 2:
        raise ModelLoadError(f"{path}: 'labels' must be a list of at least two labels")
    device = raw.get("device")
    if device is not None:
        try:
            device = device_spec(device)
        except ValueError as err:
            raise ModelLoadError(f"{path}: 'device' {err}") from None
    return ModelConfig(
        name=name,
        version=str(raw.get("version", "1")),
        model_file=str(model.get("file", "model.py")) if fmt == CLASS else "",
        model_class=str(_require(model, "class", path)) if fmt == CLASS else "",
        model_kwargs=_mapping(model, "kwargs", path, required=False),
        weights=str(raw.get("weights", DEFAULT_FILES[fmt])),
        input_shape=(channels, *spatial),
        mean=mean,
        std=std,
        labels=tuple(str(v) for v in labels),
        cam_layer=str(raw.get("cam_layer") or ""),
        device=device or "",
        format=fmt,
    )


def _format(raw: dict[str, Any], path: Path) -> str:
    """config.yaml's ``format``. When absent: ``class`` if it has a ``model`` mapping; else
    by the program's file (``weights``, or ``model.pt2``/``model.pt``/``model.onnx`` beside
    config.yaml, first found): ``.pt2`` is ``export``, ``.onnx`` ``onnx``, any other file
    ``torchscript``."""
    if "format" in raw:
        fmt = str(raw["format"])
        if fmt not in FORMATS:
            raise ModelLoadError(
                f"{path}: 'format' must be one of {', '.join(FORMATS)}, got {fmt!r}"
            )
        return fmt
    if "model" in raw:
        return CLASS
    given = raw.get("weights")
    candidates = [str(given)] if given else [DEFAULT_FILES[f] for f in (EXPORT, TORCHSCRIPT, ONNX)]
    for name in candidates:
        if (path.parent / name).is_file():
            suffix = Path(name).suffix
            return {".pt2": EXPORT, ".onnx": ONNX}.get(suffix, TORCHSCRIPT)
    raise ModelLoadError(
        f"{path}: no model: give 'model' (file, class) with a state dict in 'weights', or "
        f"put a TorchScript file (model.pt), a torch.export program (model.pt2) or an ONNX "
        f"graph (model.onnx) beside it "
        f"(config.yaml 'format': {', '.join(FORMATS)})"
    )
