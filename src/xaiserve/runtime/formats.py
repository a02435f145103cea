"""The model formats a directory may hold besides today's class + state dict.

Detection (``model_config.read_config``): ``config.yaml`` ``format:`` names it, one of

    class        ``model:`` (file, class, kwargs) + a state dict in ``weights``
                 (``weights.pt`` from torch.save, or ``*.safetensors``); the default
                 whenever config.yaml has a ``model:`` mapping
    torchscript  a ``torch.jit.save`` file (``weights``, default ``model.pt``)
    export       a ``torch.export.save`` program (``weights``, default ``model.pt2``)
    onnx         an ONNX graph (``weights``, default ``model.onnx``) run on ONNX Runtime:
                 forward passes only, no gradients, no layer to hook

Without ``format:`` and without ``model:``, ``model.pt2`` means ``export``, ``model.pt``
``torchscript`` and ``model.onnx`` ``onnx`` (in that order). The network of every format
takes normalised input, as config.yaml ``normalize`` says; config.yaml still gives input,
normalisation, labels and the CAM layer.

What loading runs:

- safetensors: a JSON header and raw tensor bytes; nothing is unpickled, no code runs.
- torch.save state dicts: ``torch.load(weights_only=True)`` (tensors only).
- TorchScript: ``torch.jit.load`` reads the archive's pickles with TorchScript's own
  unpickler, which rebuilds tensors and TorchScript classes and never imports or calls a
  Python object; but the archive's ``code/`` is the model's program and runs in the
  TorchScript interpreter on every forward pass, able to call any operator registered in
  the process. Serve TorchScript files from people you would take a ``model.py`` from.
- ONNX: a protobuf graph of ONNX operators read by ONNX Runtime; nothing is unpickled.
- torch.export: ``torch.export.load`` reads a JSON graph of ATen operators and raw tensor
  bytes; the graph calls operators only. torch itself would unpickle parts of an archive
  (weights marked ``use_pickle``, "opaque" constants, and a ``weights_only=False`` retry
  of sample inputs): while it loads here, ``torch.load`` reads tensors only and
  ``pickle.loads`` refuses (:func:`_tensors_only`), so such an archive is refused unrun.

A TorchScript forward runs compiled code: module hooks on its submodules do not fire, so
no CAM layer can be exposed (``layer_reason``) and methods that override a module's
backward cannot apply. A torch.export program is unflattened back into its module
hierarchy, so ``cam_layer`` names a submodule as for the class format.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xaiserve.api.errors import ModelLoadError

log = logging.getLogger(__name__)

CLASS, TORCHSCRIPT, EXPORT, ONNX = "class", "torchscript", "export", "onnx"
FORMATS = (CLASS, TORCHSCRIPT, EXPORT, ONNX)
FORMAT_NAMES = {
    CLASS: "class + weights",
    TORCHSCRIPT: "TorchScript",
    EXPORT: "torch.export",
    ONNX: "ONNX",
}
DEFAULT_FILES = {
    CLASS: "weights.pt",
    TORCHSCRIPT: "model.pt",
    EXPORT: "model.pt2",
    ONNX: "model.onnx",
}

TORCHSCRIPT_LAYER_REASON = (
    "the model is a TorchScript file: its forward runs compiled code, where module hooks "
    "do not fire, so no CAM layer can be exposed (serve it as a torch.export program or "
    "as a class + weights to get CAM methods)"
)

ONNX_LAYER_REASON = (
    "the model is an ONNX graph run by ONNX Runtime: no layer output is exposed to hook, so "
    "no CAM method can run (serve it as a torch.export program or as a class + weights)"
)


def read_state_dict(path: Path, advice: str) -> dict[str, torch.Tensor]:
    """The tensors of ``path``: a ``.safetensors`` file, else a torch.save state dict read
    with ``weights_only=True``. ModelLoadError naming the file and what to save instead."""
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # an object other than tensors, refused unrun
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise ModelLoadError(
            f"{path}: holds a pickled object{what}, not a state dict; objects are not "
            f"unpickled (torch.load weights_only=True): {advice}"
        ) from None
    except Exception as err:
        raise ModelLoadError(
            f"{path}: unreadable, not a torch.save file ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: holds a {type(state).__name__}, not a state dict; {advice}")
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise ModelLoadError(
            f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"{path}: unreadable safetensors file: {err}") from None


def load_torchscript(path: Path) -> nn.Module:
    """The module of a ``torch.jit.save`` file, on the CPU."""
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise ModelLoadError(
            f"{path}: not a TorchScript file torch.jit.load can read ({type(err).__name__}: "
            f"{_first_line(err)}); save one with torch.jit.save(torch.jit.script(model), "
            f"{path.name!r}) or set config.yaml 'format'"
        ) from None


def load_exported(path: Path) -> nn.Module:
    """The module of a ``torch.export.save`` program, unflattened into its module
    hierarchy (so a CAM layer can be hooked), on the CPU. A program exported for a fixed
    batch of 1 runs larger batches one image at a time (:class:`PerImage`)."""
    try:
        with _tensors_only():
            program = torch.export.load(str(path))
    except pickle.UnpicklingError as err:
        raise ModelLoadError(
            f"{path}: holds pickled Python objects, which are not unpickled "
            f"({_first_line(err)}); export a model whose weights and constants are tensors"
        ) from None
    except Exception as err:
        raise ModelLoadError(
            f"{path}: not a torch.export program torch.export.load can read "
            f"({type(err).__name__}: {_first_line(err)}); save one with "
            f"torch.export.save(torch.export.export(model, (x,)), {path.name!r})"
        ) from None
    inputs = [
        node
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs
    ]
    if len(inputs) != 1:
        raise ModelLoadError(f"{path}: the program takes {len(inputs)} inputs, not one image")
    value = inputs[0].meta.get("val")
    batch = value.shape[0] if isinstance(value, torch.Tensor) and value.dim() else None
    try:
        module: nn.Module = torch.export.unflatten(program)
    except Exception as err:
        log.warning("%s: unflatten failed (%s); no submodules to hook", path, err)
        module = program.module()
    if isinstance(batch, int):
        if batch != 1:
            raise ModelLoadError(
                f"{path}: exported for a fixed batch of {batch}; export with a batch of 1 or "
                "a dynamic batch (dynamic_shapes={'x': {0: torch.export.Dim('batch')}})"
            )
        log.info("%s: exported for a batch of 1; larger batches run image by image", path)
        module = PerImage(module)
    return module


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _tensors_only() -> Iterator[None]:
    """While the block runs, ``torch.load`` reads tensors only (``weights_only=True``
    whatever its caller asks) and the pt2 archive reader's ``pickle.loads`` raises
    UnpicklingError: torch.export.load then unpickles no Python object. Process-wide
    while it lasts (models load one at a time), under a lock."""
    from torch.export.pt2_archive import _package

    real_load = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    class NoLoads:
        def __getattr__(self, name: str) -> Any:
            return getattr(pickle, name)

        @staticmethod
        def loads(*_args: Any, **_kwargs: Any) -> Any:
            raise pickle.UnpicklingError("an opaque Python object constant")

    with _PATCH_LOCK:
        real_pickle = _package.pickle
        torch.load = load
        _package.pickle = NoLoads()  # type: ignore[assignment]
        try:
            yield
        finally:
            torch.load = real_load
            _package.pickle = real_pickle


def load_onnx(path: Path) -> nn.Module:
    """The graph of ``path`` as a module (:class:`OnnxNet`) on an ONNX Runtime CPU session;
    a graph with a fixed batch of 1 runs batches image by image."""
    try:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ModelLoadError(
            f"{path}: not an ONNX graph ONNX Runtime can load ({type(err).__name__}: "
            f"{_first_line(err)}); save one with torch.onnx.export(model, (x,), "
            f"{path.name!r}, dynamic_axes={{'input': {{0: 'batch'}}}})"
        ) from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or not outputs:
        raise ModelLoadError(f"{path}: the graph takes {len(inputs)} inputs, not one image")
    net = OnnxNet(session, inputs[0].name, outputs[0].name)
    batch = inputs[0].shape[0] if inputs[0].shape else None
    if isinstance(batch, int):
        if batch != 1:
            raise ModelLoadError(
                f"{path}: a fixed batch of {batch}; export with a batch of 1 or a dynamic batch"
            )
        return PerImage(net)
    return net


class OnnxNet(nn.Module):
    """An ONNX Runtime session as a module: N x C x ... float32 -> N x K logits, on the
    input's device. No gradients flow through it (the output is a new leaf)."""

    def __init__(self, session: Any, input_name: str, output_name: str) -> None:
        super().__init__()
        self.session, self.input_name, self.output_name = session, input_name, output_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(x) is not torch.Tensor or torch.jit.is_tracing():  # fx proxies, tracers
            raise RuntimeError("an ONNX Runtime session cannot be traced or exported")
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(logits).to(x.device)


class PerImage(nn.Module):
    """Runs ``net`` on each image of a batch (N x C x ...) alone and stacks the logits:
    for programs exported with a fixed batch of 1."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            raise RuntimeError("a program exported for a batch of 1 has no ONNX export here")
        return torch.cat([self.net(x[i : i + 1]) for i in range(x.shape[0])])


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
