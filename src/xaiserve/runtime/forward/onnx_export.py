"""The model's forward exported to ONNX, and checked against torch.

``export_onnx`` traces a pixel-space module (``PixelSpaceModel``: the normalization is
inside, so the ONNX graph takes pixels in [0, 1]) with a dynamic batch axis:
input ``x`` N x C x *spatial float32, output ``logits`` N x K.

``check_onnx`` runs the exported graph on ONNX Runtime and torch on the same inputs and
compares logits: random images (uniform in [0, 1], two batch sizes, so the batch axis is
exercised), constant images (0, 0.5, 1) and, when given, real images. It passes when the
largest absolute logit difference is at most the tolerance (1e-4 by default).

Where it runs:

- when a model directory or archive is built (``export_model_dir``, called by
  ``xaiserve.model_store``): writes ``model.onnx`` (atomically) and ``model.onnx.json``
  (the check's figures, or why export or check failed; no ``model.onnx`` then);
- when the engine loads a model (``xaiserve.engine.runtime``): ``model.onnx`` from the
  directory, else a fresh export in memory, and the check again on random and constant
  inputs, so a stale file is never used.

A model that fails export or the check still serves, on torch; the reason is logged and
shown by ListModels (``onnx_status``).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xaiserve.runtime.cpus import usable_cpus
from xaiserve.runtime.device import module_device
from xaiserve.runtime.forward.config import DEFAULT_TOLERANCE

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
REPORT_FILE = "model.onnx.json"
OPSET = 17
INPUT_NAME = "x"
OUTPUT_NAME = "logits"
CHECK_SEED = 0
CHECK_BATCHES = (1, 5)
"""Batch sizes of the random check inputs (two, so a batch axis fixed at export shows)."""
MAX_REASON = 400
"""Characters of an exception message kept in a status line."""


class OnnxUnavailable(Exception):
    """Why the ONNX forward cannot be used (export failed, check failed, no onnxruntime)."""


@dataclass(frozen=True)
class CheckReport:
    """torch vs ONNX Runtime logits.

    max_abs_diff: the largest |torch - onnxruntime| over every input and logit.
    by_input: the same per input group ("random", "constant", "real").
    """

    max_abs_diff: float
    tolerance: float
    by_input: dict[str, float]
    images: int

    @property
    def passed(self) -> bool:
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        groups = ", ".join(f"{k} {v:.2g}" for k, v in self.by_input.items())
        verdict = "<=" if self.passed else ">"
        return (
            f"max |logit difference| {self.max_abs_diff:.3g} {verdict} tolerance "
            f"{self.tolerance:g} on {self.images} images ({groups})"
        )


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    text = f"{type(err).__name__}: {text}"
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def onnxruntime_module() -> Any:
    """The ``onnxruntime`` module; raises OnnxUnavailable when it is not installed."""
    try:
        import onnxruntime
    except ImportError as err:  # an optional runtime: torch serves without it
        raise OnnxUnavailable(f"onnxruntime is not installed ({err})") from err
    return onnxruntime


def export_onnx(module: nn.Module, input_shape: Sequence[int]) -> bytes:
    """The ONNX graph of ``module`` (eval mode, pixel space) with a dynamic batch axis.

    input_shape: C x *spatial. The example input goes to the module's device (a module on
    a GPU exports with GPU inputs; the graph is the same). Raises OnnxUnavailable with the
    exporter's reason.
    """
    example = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(CHECK_SEED))
    example = example.to(module_device(module))
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    buffer = io.BytesIO()
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # deprecation and tracer notices
            torch.onnx.export(
                module,
                (example,),
                buffer,  # type: ignore[arg-type]  # a file object works; the hint says paths
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as err:  # the exporter raises many types; the model still serves
        raise OnnxUnavailable(f"export failed: {_short(err)}") from err
    finally:
        module.train(was_training)
    return buffer.getvalue()


def check_inputs(
    input_shape: Sequence[int], real_inputs: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The check's input groups, each M x C x *spatial in [0, 1]."""
    generator = torch.Generator().manual_seed(CHECK_SEED)
    shape = tuple(input_shape)
    groups = {
        "random": torch.rand(sum(CHECK_BATCHES), *shape, generator=generator),
        "constant": torch.stack([torch.full(shape, v) for v in (0.0, 0.5, 1.0)]),
    }
    if real_inputs is not None and len(real_inputs):
        groups["real"] = real_inputs.float()
    return groups


def check_onnx(
    module: nn.Module,
    session: Any,
    input_shape: Sequence[int],
    *,
    real_inputs: torch.Tensor | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> CheckReport:
    """Compares torch and ONNX Runtime logits (module docstring). A mismatch is reported,
    not raised; a graph ONNX Runtime cannot run (wrong inputs, a failing kernel) raises
    OnnxUnavailable.

    session: an ``onnxruntime.InferenceSession`` of the exported graph. The random group
    runs in batches of ``CHECK_BATCHES`` images, the others one batch each. torch runs on
    the module's device; the logits are compared on the CPU.
    """
    device = module_device(module)
    by_input: dict[str, float] = {}
    images = 0
    for name, x in check_inputs(input_shape, real_inputs).items():
        sizes = CHECK_BATCHES if name == "random" else (len(x),)
        worst = 0.0
        start = 0
        for size in sizes:
            part = x[start : start + size].contiguous()
            start += size
            with torch.no_grad():
                expected = module(part.to(device)).cpu()
            try:
                (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: part.numpy()})
            except Exception as err:  # onnxruntime's own exception types
                reason = f"onnxruntime could not run the graph: {_short(err)}"
                raise OnnxUnavailable(reason) from err
            diff = (torch.from_numpy(got) - expected).abs().max()
            worst = max(worst, float(diff)) if torch.isfinite(diff) else math.inf
        by_input[name] = worst
        images += len(x)
    return CheckReport(max(by_input.values()), tolerance, by_input, images)


def write_atomically(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class ExportResult:
    """What ``export_model_dir`` did: ``onnx_status`` is "" when model.onnx was written and
    passed the check, else the reason (then there is no model.onnx)."""

    onnx_status: str
    check: CheckReport | None = None


def export_model_dir(
    directory: Path,
    *,
    real_inputs: torch.Tensor | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportResult:
    """Exports a model directory's forward to ``directory/model.onnx`` and checks it.

    real_inputs: M x C x *spatial images in [0, 1] for the check (e.g. held-out data), in
    addition to random and constant ones. Writes ``model.onnx.json`` either way; on failure
    removes a stale ``model.onnx`` and returns the reason (the model then serves on torch).
    """
    from xaiserve.runtime.model import load_model_dir  # model.py does not import this module

    directory = Path(directory)
    served = load_model_dir(directory)
    shape = served.config.input_shape
    check: CheckReport | None = None
    try:
        data = export_onnx(served.module, shape)
        session = new_session(data)
        check = check_onnx(
            served.module, session, shape, real_inputs=real_inputs, tolerance=tolerance
        )
        if not check.passed:
            raise OnnxUnavailable(f"check failed: {check.describe()}")
        write_atomically(directory / ONNX_FILE, data)
        status = ""
        log.info(
            "exported %s to %s: %s", served.config.name, directory / ONNX_FILE, check.describe()
        )
    except OnnxUnavailable as err:
        status = str(err)
        (directory / ONNX_FILE).unlink(missing_ok=True)
        log.warning("model %s will serve on torch only: %s", served.config.name, status)
    report = {
        "onnx_status": status,
        "opset": OPSET,
        "torch": torch.__version__,
        "check": asdict(check) | {"passed": check.passed} if check else None,
    }
    write_atomically(directory / REPORT_FILE, (json.dumps(report, indent=2) + "\n").encode())
    return ExportResult(status, check)


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider")
"""Providers that run on one GPU, chosen by their ``device_id`` option."""


def provider_list(
    wanted: Sequence[str], available: Sequence[str], device_id: int = 0
) -> list[str | tuple[str, dict[str, str]]]:
    """The ``providers`` argument of an InferenceSession: the ``wanted`` providers this
    onnxruntime has (``available``), in order, GPU providers with their ``device_id``."""
    return [
        (name, {"device_id": str(device_id)}) if name in GPU_PROVIDERS else name
        for name in wanted
        if name in available
    ]


def new_session(
    model: bytes | Path,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int = 0,
    device_id: int = 0,
) -> Any:
    """An ``onnxruntime.InferenceSession`` of ``model`` (bytes or a file).

    providers: wanted execution providers in order of preference; those this onnxruntime
    lacks are skipped (none left: OnnxUnavailable). threads: intra-op threads (0: the CPUs
    this process may use, ``cpus.usable_cpus``, rather than onnxruntime's default of one
    per core of the host). device_id: the GPU of GPU providers.
    onnxruntime itself falls back to the next provider when one it has cannot start (a
    GPU build on a node without a GPU); that is logged as a warning, and
    ``session.get_providers()`` says what runs.
    """
    ort = onnxruntime_module()
    available = ort.get_available_providers()
    usable = provider_list(providers, available, device_id)
    if not usable:
        raise OnnxUnavailable(
            f"none of the configured providers ({', '.join(providers)}) is available; "
            f"onnxruntime has {', '.join(sorted(available))}"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cpus()
    options.inter_op_num_threads = 1
    # the engine interleaves ONNX Runtime calls with torch work (building perturbed
    # images, gradients): idle intra-op threads must not spin on the cores torch needs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; failures come back as exceptions
    source = str(model) if isinstance(model, Path) else model
    try:
        session = ort.InferenceSession(source, options, providers=usable)
    except Exception as err:  # onnxruntime's own exception types
        raise OnnxUnavailable(f"onnxruntime could not load the graph: {_short(err)}") from err
    first = next(name for name in providers if name in available)
    if first not in session.get_providers():
        log.warning(
            "onnxruntime could not start %s; the session runs on %s",
            first,
            ", ".join(session.get_providers()),
        )
    return session


def release_arena(session: Any, input_shape: Sequence[int]) -> None:
    """Gives the memory ONNX Runtime's CPU arena holds back to the system: one run of a
    1 x ``input_shape`` zero image with the run option that shrinks the arena at its end.

    The arena only grows: after the batch probe (``forward.fastest_batch``, largest batch
    first) it would keep what the largest batch needed, however small the batch chosen.
    A session that cannot shrink (its CPU arena disabled) keeps what it has; that is
    logged, not raised.
    """
    ort = onnxruntime_module()
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    x = torch.zeros(1, *input_shape).numpy()
    try:
        session.run([OUTPUT_NAME], {INPUT_NAME: x}, options)
    except Exception as err:  # onnxruntime's own exception types
        log.warning("onnxruntime could not release its arena: %s", _short(err))
