"""Running incremental occlusion: logits equal to full forward passes, on torch and ONNX
Runtime, and through the occlusion method and the forwards that hold the occluders."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from support.occluder_models import BACKENDS, all_corners, small_resnet18
from support.tiny_models import make_context, model_config, tiny_served
from xaiserve.methods.base import MethodContext
from xaiserve.methods.perturbation.occlusion import Occlusion, window_starts
from xaiserve.runtime.forward.backends import prepare_forwards
from xaiserve.runtime.forward.config import ForwardConfig
from xaiserve.runtime.forward.counted import Budget
from xaiserve.runtime.forward.incremental.build import build_occluder
from xaiserve.runtime.model import ServedModel


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name,shape,window,stride",
    [
        ("resnet18", (3, 64, 64), 9, 4),
        ("tiny", (3, 16, 16), 4, 2),
        ("resnet18", (3, 40, 36), 7, 5),  # not square, border-flush windows
        ("resnet18", (3, 64, 64), 16, 16),  # 4 x 4 windows
    ],
)
def test_occluded_logits_equal_full_forward_passes(backend, name, shape, window, stride):
    module = small_resnet18() if name == "resnet18" else tiny_served().module
    axes, corners = all_corners(shape, window, stride)
    occluder, reason = build_occluder(module, shape, window, axes, backend)
    assert occluder is not None, reason
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(3))
    occluded = x.expand(len(corners), *shape).clone()
    for j, (a, b) in enumerate(corners):
        occluded[j, :, a : a + window, b : b + window] = 0.25
    with torch.no_grad():
        expected = module(occluded)
        activations, original = occluder.original(x)
        got = torch.cat(
            [
                occluder.logits(activations, corners[s : s + 16], 0.25)
                for s in range(0, len(corners), 16)
            ]
        )
    tolerance = 1e-5 if backend == "torch" else 1e-4
    assert (got - expected).abs().max() <= tolerance
    assert (original - module(x)).abs().max() <= tolerance
    assert not any(m.training for m in module.modules())  # exports leave eval mode alone


def test_onnx_occluder_runs_the_whole_image_in_onnx_runtime(monkeypatch):
    """``original`` on ONNX Runtime: no torch convolution runs, and every activation
    matches the torch occluder's."""
    module = small_resnet18()
    axes, _ = all_corners((3, 64, 64), 9, 4)
    on_torch, reason = build_occluder(module, (3, 64, 64), 9, axes, "torch")
    on_onnx, _ = build_occluder(module, (3, 64, 64), 9, axes, "onnxruntime")
    assert on_torch is not None and on_onnx is not None, reason
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    expected, expected_logits = on_torch.original(x)

    def no_torch(*_args: object) -> None:
        raise AssertionError("a torch convolution ran")

    monkeypatch.setattr(nn.Conv2d, "forward", no_torch)
    got, logits = on_onnx.original(x)
    assert len(got) == len(expected) == len(on_onnx.plan.stages) + 1
    for ours, theirs in zip(got, expected, strict=True):  # padded ones hold -inf (max pools) alike
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    assert (logits - expected_logits).abs().max() <= 1e-4


def resnet_served(shape: tuple[int, ...]) -> ServedModel:
    module = small_resnet18()
    config = model_config(shape, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "abcde", "layer4", "r18")
    return ServedModel(config, module, module.net.layer4, Path("."))


@pytest.mark.parametrize("backend", BACKENDS)
def test_occlusion_maps_and_counts_match_with_and_without_incremental(backend):
    shape = (3, 48, 48)
    served = resnet_served(shape)
    forwards = prepare_forwards(served, ForwardConfig(memory_mb=64))
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([1, 3])
    method = Occlusion()
    maps, spent = {}, {}
    for incremental in (True, False):
        budget = Budget(10**6)
        forward = forwards.forward(budget, backend)
        if not incremental:
            forward.occluders = None
        assert (forward.occluder(8, [window_starts(48, 8, 4)] * 2) is not None) is incremental
        params = method.resolve_params({"window": 8, "stride": 4}, shape, "occlusion")
        maps[incremental] = method.attribute(
            MethodContext(served, forward, budget, 16), x, target, params
        )
        spent[incremental] = budget.spent
    assert spent[True] == spent[False] == 2 * (1 + 11 * 11)
    assert (maps[True] - maps[False]).abs().max() <= 1e-4


def test_incremental_off_in_the_configuration():
    served = resnet_served((3, 32, 32))
    forwards = prepare_forwards(served, ForwardConfig(incremental_occlusion=False))
    forward = forwards.forward(Budget(10), "torch")
    assert forward.occluder(8, [window_starts(32, 8, 4)] * 2) is None
    with pytest.raises(ValueError, match="incremental_occlusion"):
        ForwardConfig(incremental_occlusion="yes")


def test_plain_contexts_have_no_occluder():
    ctx = make_context(tiny_served())
    assert ctx.forward.occluder(4, [[0, 2], [0, 2]]) is None


def test_a_failing_plan_means_full_passes_not_a_failed_request(monkeypatch):
    import xaiserve.runtime.forward.backends as backends

    def broken(*_args, **_kwargs):
        raise RuntimeError("a graph nobody foresaw")

    served = resnet_served((3, 32, 32))
    forwards = prepare_forwards(served, ForwardConfig())
    monkeypatch.setattr(backends, "build_occluder", broken)
    budget = Budget(10**6)
    forward = forwards.forward(budget, "torch")
    assert forward.occluder(8, [window_starts(32, 8, 8)] * 2) is None
    method = Occlusion()
    params = method.resolve_params({"window": 8, "stride": 8}, (3, 32, 32), "occlusion")
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    got = method.attribute(MethodContext(served, forward, budget, 16), x, torch.tensor([0]), params)
    assert got.shape == x.shape and budget.spent == 1 + 16 and got.abs().sum() > 0


def test_a_build_blocks_neither_other_windows_nor_builds_twice(monkeypatch):
    """While one window's plan is being built, a request for another window gets its own
    (here: already cached) occluder at once; two requests for the building window share the
    one build."""
    import xaiserve.runtime.forward.backends as backends

    served = resnet_served((3, 32, 32))
    forwards = prepare_forwards(served, ForwardConfig())
    ready = forwards.occluder("torch", 8, [window_starts(32, 8, 8)] * 2)
    assert ready is not None
    started, release, builds = threading.Event(), threading.Event(), []
    real = backends.build_occluder

    def slow(*args, **kwargs):
        builds.append(args[2])
        started.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(backends, "build_occluder", slow)
    axes = [window_starts(32, 8, 4)] * 2  # the same window side at other positions
    results = []
    callers = [
        threading.Thread(target=lambda: results.append(forwards.occluder("torch", 8, axes)))
        for _ in range(2)
    ]
    callers[0].start()
    assert started.wait(30)
    callers[1].start()
    assert forwards.occluder("torch", 8, [window_starts(32, 8, 8)] * 2) is ready  # no wait
    release.set()
    for caller in callers:
        caller.join(30)
    assert builds == [8]
    assert len(results) == 2 and results[0] is results[1] and results[0] is not None


@pytest.mark.parametrize("incremental", [True, False])
def test_warm_up_builds_the_default_windows_plan_that_requests_then_use(monkeypatch, incremental):
    import xaiserve.runtime.forward.backends as backends
    from xaiserve.api.types import ExplainRequest, MethodRequest, RawTensor
    from xaiserve.engine.engine import Engine
    from xaiserve.engine.limits import EngineLimits

    built = []
    real = backends.build_occluder

    def counting(*args, **kwargs):
        built.append((args[2], args[4]))  # window, backend
        return real(*args, **kwargs)

    monkeypatch.setattr(backends, "build_occluder", counting)
    config = ForwardConfig(incremental_occlusion=incremental)
    served = resnet_served((3, 32, 32))
    engine = Engine({served.config.name: served}, EngineLimits(), config)
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()
    raw = RawTensor(image.shape, image.astype("<f4").tobytes())

    def request(method: str) -> ExplainRequest:
        item = MethodRequest(method, {}, field="methods[0]", params_field=method)
        return ExplainRequest(model=served.config.name, image=raw, methods=(item,))

    # a request running (held before its first forward): the build does not wait for it
    running, release = threading.Event(), threading.Event()
    real_forward = engine.forward

    def held_forward(*args, **kwargs):
        running.set()
        release.wait(60)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(engine, "forward", held_forward)
    first = threading.Thread(target=engine.explain, args=(request("saliency"),))
    first.start()
    assert running.wait(60)
    warming = engine.warm_up()
    warming.join(60)
    assert not warming.is_alive() and first.is_alive()  # built while the request was held
    release.set()
    first.join(60)
    default = Occlusion().resolve_params({}, (3, 32, 32), "occlusion")["window"]
    assert built == ([(default, "onnxruntime")] if incremental else [])
    result = engine.explain(request("occlusion"))
    assert result.explanations[0].forward_passes > 1
    assert len(built) == (1 if incremental else 0)  # the request used the warm plan
