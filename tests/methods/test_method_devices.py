"""Device placement: every method a test model supports, plain, with an APEM record and with
a record and the APEM filter, answers through ``Engine.explain`` with torch's default device
set to ``meta``, exactly as it answers normally.

Why meta catches what a GPU would. A model may live on a GPU: the engine moves the module
and x to ``served.device``, and the executor moves rows there before each pass, so the
method code, APEM and the engine's post-processing must make each tensor where it is used
(``device=x.device`` next to the input and the model's outputs, ``device="cpu"`` for CPU
bookkeeping, ``.cpu()`` before numpy). A tensor factory (``torch.zeros``, ``torch.tensor``,
``torch.rand``, ...) without ``device=`` makes its tensor on torch's default device: on a
GPU node that is the CPU while the model and x are on cuda, and the first operation mixing
the two raises (or the work silently runs on the CPU). This machine has no GPU, so the test
keeps the model and x on the CPU and sets the default device to ``meta`` instead: a factory
without ``device=`` then makes a meta tensor, and mixing it with a CPU tensor raises, naming
the line, as does converting it to numpy. A request whose every tensor has its device named
creates nothing on meta, so it also answers bit for bit as the normal run does: the
placement is explicit, and no number changed (the same generators, seeds and draws). What
meta cannot see is a missing ``.cpu()`` before numpy on a tensor that is on x's device (the
CPU here): those conversions are named in the code.

Models: the tiny 2-D model with a made-up S-CAM calibration (so the S-CAM methods run too)
and the 3-D CNN on 1 x 8 x 12 x 12 volumes (C x D x H x W). Each request runs normally
first, so what a model builds on first use (the incremental occluder's plan) exists, as on a
warm server, when the same request runs under meta.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from support.calibrated_models import calibrated_tiny
from support.method_models import volume_served
from xaiserve.api.types import (
    ExplainRequest,
    ExplainResult,
    FilterRequest,
    MethodRequest,
    RawTensor,
    ReliabilityRequest,
)
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.methods.registry import METHODS
from xaiserve.runtime.model import ServedModel

MODELS: dict[str, Callable[[], ServedModel]] = {"tiny": calibrated_tiny, "volume": volume_served}

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "record": {"reliability": ReliabilityRequest()},
    "record+filter": {"reliability": ReliabilityRequest(), "filter": FilterRequest()},
}


def supported(model: str) -> list[str]:
    """The methods ``model`` supports (what ListModels lists for it)."""
    with torch.random.fork_rng():  # building the model seeds torch's global generator
        served = MODELS[model]()
    return [name for name, cls in METHODS.items() if cls().unsupported_reason(served) is None]


CASES = [(model, name) for model in MODELS for name in supported(model)]


@pytest.fixture(scope="module")
def engines() -> dict[str, Engine]:
    """One engine per model, the model served under its configured name."""
    limits = EngineLimits(max_image_pixels=64 * 64, max_methods=4)
    out = {}
    for model, factory in MODELS.items():
        served = factory()
        out[model] = Engine({served.config.name: served}, limits)
    return out


@contextlib.contextmanager
def default_device(device: str) -> Iterator[None]:
    """torch's default device is ``device`` inside the block, and none again after it,
    whatever the block raises."""
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(None)


def request(
    engine: Engine, method: str, variant: str, params: dict[str, Any] | None = None
) -> ExplainRequest:
    """One method (at its defaults unless ``params`` says otherwise) on a fixed random input
    of the engine's model."""
    (info,) = engine.list_models()
    shape = (1, *info.input_shape)
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    wanted = MethodRequest(method, params or {}, params_field=method, **VARIANTS[variant])
    return ExplainRequest(info.name, RawTensor(shape, x.tobytes()), (wanted,), want_png=True)


def answer(result: ExplainResult) -> dict[str, Any]:
    """The result without its timings, as nested dicts (numpy arrays, PNG bytes)."""
    explanations = [dataclasses.replace(e, timings={}) for e in result.explanations]
    return {
        "prediction": dataclasses.asdict(result.prediction),
        "explanations": [dataclasses.asdict(e) for e in explanations],
        "forward_passes": result.forward_passes,
    }


def assert_same_on_meta(engine: Engine, req: ExplainRequest) -> None:
    """``req`` answers under the meta default device as it does normally, bit for bit
    (maps, PNGs, APEM records, filtered maps, forward passes)."""
    expected = answer(engine.explain(req))
    with default_device("meta"):
        got = answer(engine.explain(req))
    np.testing.assert_equal(got, expected)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(("model", "method"), CASES)
def test_explain_places_every_tensor_explicitly(engines, model, method, variant):
    assert_same_on_meta(engines[model], request(engines[model], method, variant))


def test_fs_s_cam_principal_mask_is_placed_explicitly(engines):
    """FS-S-CAM (principal_fraction < 1): the runtime's calibration builds the
    principal-feature mask on the CPU, named (``device="cpu"``), and the method moves it
    to the features' device."""
    engine = engines["tiny"]
    req = request(engine, "s_grad_cam", "record+filter", {"principal_fraction": 0.5})
    assert_same_on_meta(engine, req)
