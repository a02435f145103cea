"""Model directories: ``config.yaml`` + model code + weights, loaded into a servable model.

A model directory holds::

    config.yaml   name, version, model code and class, weights, input size, normalization,
                  labels, CAM layer, device (see ``model_config.ModelConfig``)
    model.py      the network's code (trusted, as in any model archive); it may import
                  the files next to it (``from helpers import Block`` or
                  ``from .helpers import Block``)
    weights.pt    a state dict, loaded with torch.load(weights_only=True): no arbitrary
                  objects are unpickled (a pickled module is refused), or a
                  ``.safetensors`` file
    model.pt, model.pt2   instead of model.py + weights: a TorchScript file or a
                  torch.export program (config.yaml ``format``; see ``formats``)
    calibration.json, calibration.npz   optional: the data-set calibration of the CAM
                  methods (``xaiserve calibrate``, see ``calibration``)
    gad/          optional: GAD support models (``xaiserve gad-train``, see ``gad_store``)

The engine works in pixel space [0, 1]: ``ServedModel.module`` applies the configured
mean/std itself, so every attribution is with respect to the pixels the client sent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import logging
import re
import sys
import threading
import types
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from xaiserve.api.errors import ModelLoadError
from xaiserve.runtime.artifacts import file_sha256
from xaiserve.runtime.calibration import Calibration, load_calibration
from xaiserve.runtime.device import CPU, resolve_device
from xaiserve.runtime.formats import (
    CLASS,
    EXPORT,
    ONNX,
    ONNX_LAYER_REASON,
    TORCHSCRIPT,
    TORCHSCRIPT_LAYER_REASON,
    PerImage,
    load_exported,
    load_onnx,
    load_torchscript,
    read_state_dict,
)
from xaiserve.runtime.gad_store import GadSupport, load_gad_support
from xaiserve.runtime.model_config import NAME_RE, ModelConfig, read_config
from xaiserve.runtime.pixel_space import PixelSpaceModel

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A loaded model: its configuration, pixel-space module and CAM layer (if any).

    calibration: the data-set calibration of the CAM methods (seed 003), when stored.
    gad: the GAD support models (seed 002), when stored.
    device: where ``module``'s weights live, and so every tensor of its requests.
    format: the directory's format (``formats``: class, torchscript, export).
    layer_reason: why no CAM layer could be exposed although config.yaml names one
        (a TorchScript forward), else "".
    """

    config: ModelConfig
    module: PixelSpaceModel
    cam_layer: nn.Module | None
    directory: Path
    calibration: Calibration | None = None
    gad: GadSupport | None = None
    device: torch.device = CPU
    format: str = CLASS
    layer_reason: str = ""


@dataclass(frozen=True)
class FailedModel:
    """A model directory that could not be loaded, listed (ListModels) but not served.

    name: its config's name when that could be read, else the directory's name.
    version: its config's version, or "" when the config could not be read.
    reason: why, with paths given relative to the model store (clients see it).
    """

    name: str
    version: str
    directory: Path
    reason: str


#: Longest reason a FailedModel keeps (the whole error is logged).
MAX_REASON_CHARS = 400


def failed_model(directory: Path, error: Exception) -> FailedModel:
    """The FailedModel of ``directory``, whose load raised ``error``."""
    directory = Path(directory)
    shown = directory.resolve().name
    name, version = shown, ""
    try:
        raw = yaml.safe_load((directory / "config.yaml").read_text())
        if isinstance(raw, dict) and NAME_RE.match(str(raw.get("name", ""))):
            name, version = str(raw["name"]), str(raw.get("version", "1"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        pass  # the error itself says what is wrong with the file
    reason = str(error) or type(error).__name__
    if not isinstance(error, ModelLoadError):  # the model's own code raised it
        reason = f"{type(error).__name__}: {reason}"
    prefixes = {str(directory.resolve()), str(directory)} - {"."}
    for prefix in sorted(prefixes, key=len, reverse=True):  # the absolute path first
        reason = reason.replace(prefix, shown)
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 1] + "\u2026"
    return FailedModel(name, version, directory, reason)


_IMPORT_LOCK = threading.Lock()  # sys.path and sys.modules are process-wide
_PACKAGES = itertools.count()


def _import_model_class(directory: Path, cfg: ModelConfig) -> type[nn.Module]:
    """The class ``cfg.model_class`` of the directory's model file.

    The directory is imported as a package of its own, under a name no other load uses,
    so the model file may import the files next to it either way: ``from .helpers import
    Block`` (relative to that package) or ``from helpers import Block`` (the directory is
    first on ``sys.path`` while the file runs; see :func:`_sibling_imports`).
    """
    root = directory.resolve()
    file = (root / cfg.model_file).resolve()
    if root not in file.parents or not file.is_file():
        raise ModelLoadError(f"{directory}: model file {cfg.model_file!r} not found inside it")
    package = f"xaiserve_model_{next(_PACKAGES)}_" + re.sub(r"\W", "_", cfg.name)
    module_name = ".".join((package, *file.relative_to(root).with_suffix("").parts))
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"{file}: cannot import")
    with _IMPORT_LOCK, _sibling_imports(root):
        parent = types.ModuleType(package, f"model directory {directory}")
        parent.__path__ = [str(root)]
        sys.modules[package] = parent
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # the model's own code failed
            for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
                del sys.modules[name]
            raise ModelLoadError(f"{file}: import failed: {type(err).__name__}: {err}") from err
    cls = getattr(module, cfg.model_class, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelLoadError(f"{file}: no nn.Module class {cfg.model_class!r}")
    return cls


@contextlib.contextmanager
def _sibling_imports(root: Path) -> Iterator[None]:
    """While the block runs, ``import helpers`` finds ``root/helpers.py`` (or a package
    ``root/helpers/``) first, and only that. Afterwards the modules imported from ``root``
    this way are dropped from ``sys.modules`` and the modules they shadowed are put back,
    so the next directory's ``helpers`` is its own. Modules under the directory's package
    name (relative imports) stay: that name is unique to the load."""
    provided = {p.stem for p in root.glob("*.py")} | {
        p.parent.name for p in root.glob("*/__init__.py")
    }
    shadowed = {name: sys.modules.pop(name) for name in provided if name in sys.modules}
    before = set(sys.modules)
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for name in set(sys.modules) - before:
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if not name.startswith("xaiserve_model_") and Path(origin).is_relative_to(root):
                del sys.modules[name]
        sys.modules.update(shadowed)


def _load_weights(directory: Path, cfg: ModelConfig, net: nn.Module) -> Path:
    """Loads the state dict of ``cfg.weights`` into ``net``; returns the file's path.

    Only tensors are read (``torch.load(weights_only=True)``, or a ``.safetensors``
    file): a pickled module is refused with what to save instead, and a TorchScript
    archive with how to serve it as one.
    """
    weights = directory / cfg.weights
    advice = (
        f"save the weights with torch.save(model.state_dict(), {cfg.weights!r}) (or "
        f"safetensors.torch.save_file) and give the class in {cfg.model_file} "
        "(config.yaml model.class)"
    )
    if not weights.is_file():
        raise ModelLoadError(f"{weights}: weights file not found (config.yaml 'weights')")
    if _is_torchscript(weights):
        raise ModelLoadError(
            f"{weights}: a TorchScript archive, not a state dict; serve it as TorchScript "
            f"(config.yaml 'format: torchscript', 'weights: {cfg.weights}', no 'model'), "
            f"or {advice}"
        )
    state = read_state_dict(weights, advice)
    try:
        net.load_state_dict(state)
    except Exception as err:
        raise ModelLoadError(f"{weights}: does not fit {cfg.model_class}: {err}") from None
    return weights


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with the ``code/`` of its modules
    and ``constants.pkl``), which torch.save's zip files do not hold."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _check_forward(
    module: nn.Module, cfg: ModelConfig, directory: Path, device: torch.device
) -> None:
    """Runs one zero image (1 x C x H x W, on ``device``) through ``module``: its code must
    run and return logits 1 x K, one per label, or the model is not served."""
    shape = " x ".join(str(d) for d in (1, *cfg.input_shape))
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, *cfg.input_shape, device=device))
    except Exception as err:
        raise ModelLoadError(
            f"{directory}: a forward pass of a {shape} image failed: {type(err).__name__}: {err}"
        ) from None
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (1, len(cfg.labels)):
        raise ModelLoadError(
            f"{directory}: a {shape} image gave {got}, not logits (1, {len(cfg.labels)}), "
            f"one per label of config.yaml"
        )


def load_model_dir(
    directory: Path, device: torch.device = CPU, gpu_id: int | None = None
) -> ServedModel:
    """Loads one model directory (config, code, weights) into eval mode on its device.

    device: where the model goes unless its config.yaml names a ``device``, which is
    resolved here (``device.resolve_device``; gpu_id: the GPU TorchServe gave the worker,
    or None). The weights are read onto the CPU and the module moved to the device
    afterwards, GAD support models too; the check's zero image runs there.

    Raises:
        ModelLoadError: whatever fails, with the file and the reason; the model's own
            code's exceptions (import, constructor, a first forward pass) included, and a
            config.yaml ``device`` that torch cannot provide.
    """
    directory = Path(directory)
    cfg = read_config(directory / "config.yaml")
    if cfg.device:
        try:
            device = resolve_device(cfg.device, gpu_id)
        except ValueError as err:
            raise ModelLoadError(f"{directory / 'config.yaml'}: 'device' {err}") from None
    if cfg.format != CLASS:
        return _load_program(directory, cfg, device)
    cls = _import_model_class(directory, cfg)
    try:
        net = cls(**cfg.model_kwargs)
    except Exception as err:
        raise ModelLoadError(
            f"{directory}: constructing {cfg.model_class} failed: {type(err).__name__}: {err}"
        ) from err
    weights = _load_weights(directory, cfg, net)
    cam = _cam_layer(net, cfg, directory)
    module = _pixel_space(net, cfg).to(device)  # in place: ``cam`` is still its layer
    _check_forward(module, cfg, directory, device)
    sha = file_sha256(weights)
    calibration = load_calibration(directory, cfg.cam_layer, sha)

    def support_module(support_state: dict[str, torch.Tensor]) -> PixelSpaceModel:
        support = cls(**cfg.model_kwargs)
        support.load_state_dict(support_state)
        return _pixel_space(support, cfg).to(device)

    gad = load_gad_support(directory, support_module, sha, len(cfg.labels))
    log.info("loaded model %s version %s from %s on %s", cfg.name, cfg.version, directory, device)
    return ServedModel(
        config=cfg,
        module=module,
        cam_layer=cam,
        directory=directory,
        calibration=calibration,
        gad=gad,
        device=device,
    )


def _cam_layer(net: nn.Module, cfg: ModelConfig, directory: Path) -> nn.Module | None:
    """The submodule config.yaml's ``cam_layer`` names, or None when it names none."""
    if not cfg.cam_layer:
        return None
    try:
        return net.get_submodule(cfg.cam_layer)
    except AttributeError as err:
        raise ModelLoadError(f"{directory}: cam_layer {cfg.cam_layer!r} not found") from err


def _load_program(directory: Path, cfg: ModelConfig, device: torch.device) -> ServedModel:
    """A TorchScript file, torch.export program or ONNX graph (``cfg.weights``) as a
    served model:
    no calibration or GAD support models (they are stored for class + weights models)."""
    path = directory / cfg.weights
    if not path.is_file():
        raise ModelLoadError(f"{path}: {cfg.format} file not found (config.yaml 'weights')")
    cam, layer_reason = None, ""
    if cfg.format == TORCHSCRIPT:
        net = load_torchscript(path)
        layer_reason = TORCHSCRIPT_LAYER_REASON if cfg.cam_layer else ""
    elif cfg.format == ONNX:
        net = load_onnx(path)
        layer_reason = ONNX_LAYER_REASON if cfg.cam_layer else ""
    elif cfg.format == EXPORT:
        net = load_exported(path)
        cam = _cam_layer(net.net if isinstance(net, PerImage) else net, cfg, directory)
    else:  # read_config admits no other
        raise ModelLoadError(f"{directory}: unknown model format {cfg.format!r}")
    module = _pixel_space(net, cfg).to(device)
    _check_forward(module, cfg, directory, device)
    log.info(
        "loaded %s model %s version %s from %s on %s",
        cfg.format,
        cfg.name,
        cfg.version,
        directory,
        device,
    )
    return ServedModel(
        config=cfg,
        module=module,
        cam_layer=cam,
        directory=directory,
        device=device,
        format=cfg.format,
        layer_reason=layer_reason,
    )


def _pixel_space(net: nn.Module, cfg: ModelConfig) -> PixelSpaceModel:
    """``net`` wrapped for pixel-space input, in eval mode, parameters frozen. A program
    (TorchScript, torch.export) has its modules' flags cleared instead: exported programs
    refuse ``eval()`` (they run as they were exported)."""
    module = PixelSpaceModel(net, cfg.mean, cfg.std)
    if cfg.format == CLASS:
        module.eval()
    for sub in module.modules():
        sub.training = False
    for p in module.parameters():
        p.requires_grad_(False)
    return module
