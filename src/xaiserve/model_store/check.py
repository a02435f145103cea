"""``xaiserve check-model DIR``: loads a model directory the way the server will and tries
every method on it, before it is served or archived.

Prints the format, device, input, labels, CAM layer, the ONNX Runtime status, and for each
registered method "ok" with the time of one Explain of a generated image, or the reason it
cannot run (the engine's own plan and validation give it). Exits 1 when the directory does
not load or no method runs, else 0.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xaiserve.api.errors import XaiError
from xaiserve.api.types import ExplainRequest, MethodRequest, RawTensor
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.engine.plan import method_reason
from xaiserve.methods.registry import METHODS
from xaiserve.runtime.device import resolve_device
from xaiserve.runtime.formats import FORMAT_NAMES
from xaiserve.runtime.forward.config import AUTO, ForwardConfig
from xaiserve.runtime.model import ServedModel, failed_model, load_model_dir


@dataclass(frozen=True)
class MethodCheck:
    """One method on the model: reason None and the seconds of one Explain when it ran."""

    name: str
    reason: str | None
    seconds: float | None = None


@dataclass(frozen=True)
class ModelCheck:
    """What ``check_model`` found; ``error``: why the directory cannot be served at all."""

    directory: Path
    error: str = ""
    served: ServedModel | None = None
    forward_backend: str = ""
    onnx_status: str = ""
    methods: tuple[MethodCheck, ...] = ()

    @property
    def serves(self) -> bool:
        return not self.error and any(m.reason is None for m in self.methods)


def check_model(directory: Path, device: str = AUTO, seed: int = 0) -> ModelCheck:
    """Loads ``directory`` as the server does (``load_model_dir`` on ``device``, then the
    engine's forward preparation) and explains one generated image (uniform pixels in
    [0, 1], C x H x W of the config, ``seed``) with every registered method, one at a time."""
    directory = Path(directory)
    try:
        served = load_model_dir(directory, resolve_device(device))
        engine = Engine({served.config.name: served}, EngineLimits(), ForwardConfig(device=device))
    except Exception as err:  # the model's own code too: as the server lists it
        return ModelCheck(directory, error=failed_model(directory, err).reason)
    if engine.failed:
        return ModelCheck(directory, error=engine.failed[0].reason, served=served)
    name = served.config.name
    shape = served.config.input_shape
    pixels = np.random.default_rng(seed).random(shape, dtype=np.float32)
    image = RawTensor(shape, pixels.tobytes())
    checks = []
    for method_name, cls in METHODS.items():
        reason = method_reason(cls(), served)
        if reason is not None:
            checks.append(MethodCheck(method_name, reason))
            continue
        request = ExplainRequest(name, image, methods=(MethodRequest(method_name),))
        start = time.perf_counter()
        try:
            engine.explain(request)
        except XaiError as err:
            checks.append(MethodCheck(method_name, str(err)))
            continue
        except Exception as err:  # a fault the server would answer INTERNAL to
            checks.append(MethodCheck(method_name, f"failed: {type(err).__name__}: {err}"))
            continue
        checks.append(MethodCheck(method_name, None, time.perf_counter() - start))
    forwards = engine.forwards[name]
    return ModelCheck(
        directory,
        served=served,
        forward_backend=forwards.default_backend,
        onnx_status=forwards.onnx_status or "ok",
        methods=tuple(checks),
    )


def format_check(check: ModelCheck) -> str:
    """The report ``xaiserve check-model`` prints."""
    lines = [f"directory  {check.directory}"]
    served = check.served
    if served is not None:
        cfg = served.config
        lines += [
            f"model      {cfg.name} version {cfg.version}",
            f"format     {FORMAT_NAMES[served.format]} ({cfg.weights})",
            f"device     {served.device}",
            f"input      {' x '.join(map(str, cfg.input_shape))}, mean {list(cfg.mean)}, "
            f"std {list(cfg.std)}",
            f"labels     {', '.join(cfg.labels)}",
            f"cam layer  {cfg.cam_layer or '-'}"
            + (" (unavailable)" if cfg.cam_layer and served.cam_layer is None else ""),
        ]
    if check.error:
        return "\n".join([*lines, f"error      {check.error}", "result     cannot serve"])
    lines += [f"onnx       {check.onnx_status}", f"forward    {check.forward_backend}", "methods"]
    width = max(len(m.name) for m in check.methods)
    for m in check.methods:
        state = f"ok  {m.seconds:8.3f} s" if m.reason is None else f"no  {m.reason}"
        lines.append(f"  {m.name:<{width}}  {state}")
    ok = sum(m.reason is None for m in check.methods)
    verdict = "serves" if check.serves else "cannot serve"
    lines.append(f"result     {ok} of {len(check.methods)} methods ok; {verdict}")
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``xaiserve check-model``."""
    parser.add_argument("directory", type=Path, help="a model directory (with config.yaml)")
    parser.add_argument(
        "--device", default=AUTO, help="auto (default), cpu, cuda or cuda:N, as the server's"
    )


def run(args: argparse.Namespace) -> int:
    """Checks one model directory; 0 when it serves, 1 when it cannot."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    check = check_model(args.directory, args.device)
    print(format_check(check))
    return 0 if check.serves else 1
