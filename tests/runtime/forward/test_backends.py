"""The counted forward on torch and on ONNX Runtime: the same results (within tolerance)
and the same forward passes for every forward-only stage, and batches sized by the memory
budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from support.tiny_models import tiny_served
from xaiserve.api.errors import InvalidArgument
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
from xaiserve.model_store import synthetic
from xaiserve.runtime.forward import backends as forward_backends
from xaiserve.runtime.forward import counted as forward_module
from xaiserve.runtime.forward.backends import OnnxForward, prepare_forwards
from xaiserve.runtime.forward.config import ONNXRUNTIME, TORCH, ForwardConfig
from xaiserve.runtime.forward.counted import (
    PROBE_CALLS,
    Budget,
    TorchForward,
    fastest_batch,
    image_bytes,
    memory_batch_size,
)
from xaiserve.runtime.model import load_model_dir

MAP_TOLERANCE = 1e-4


def method(name: str, i: int, **params) -> MethodRequest:
    return MethodRequest(
        name,
        params,
        field=f"methods[{i}]",
        params_field=name,
        reliability=ReliabilityRequest(shuffles=2),
        filter=FilterRequest(mode="fast"),
    )


def run(engine: Engine, model: str, image: np.ndarray, methods, backend: str) -> ExplainResult:
    raw = RawTensor(image.shape, image.astype("<f4").tobytes())
    return engine.explain(
        ExplainRequest(model=model, image=raw, methods=tuple(methods), forward_backend=backend)
    )


def assert_same(torch_result: ExplainResult, ort_result: ExplainResult) -> None:
    """Same prediction, maps within tolerance, same APEM records, filters and counts."""
    assert ort_result.forward_passes == torch_result.forward_passes
    assert "forward.torch" in torch_result.timings and "forward.onnxruntime" in ort_result.timings
    assert ort_result.prediction.target.index == torch_result.prediction.target.index
    for a, b in zip(torch_result.explanations, ort_result.explanations, strict=True):
        assert a.method == b.method and a.forward_passes == b.forward_passes
        np.testing.assert_allclose(b.map, a.map, atol=MAP_TOLERANCE, rtol=1e-4)
        ra, rb = a.reliability, b.reliability
        assert rb.forward_passes == ra.forward_passes
        assert (rb.eps_minus, rb.eps_plus) == pytest.approx((ra.eps_minus, ra.eps_plus), rel=1e-6)
        assert rb.apem_norm == pytest.approx(ra.apem_norm, rel=1e-6, nan_ok=True)
        fa, fb = a.filtered, b.filtered
        assert fb.forward_passes == fa.forward_passes
        assert fb.kept_fraction == fa.kept_fraction
        assert fb.apem_after == pytest.approx(fa.apem_after, rel=1e-6, nan_ok=True)


def test_forward_only_stages_agree_on_the_tiny_model() -> None:
    engine = Engine({"tiny": tiny_served()}, EngineLimits())
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(11)).numpy()
    methods = [
        method("occlusion", 0, window=4, stride=2),
        method("occlusion", 1, window=4, stride=1, adaptive={"enabled": True}),
        method("score_cam", 2),
        method("rise", 3, masks=64, cells=4),
        method("lime", 4, samples=64, segments=16),
        method("kernel_shap", 5, samples=64, segments=16),
    ]
    torch_result = run(engine, "tiny", image, methods, "torch")
    ort_result = run(engine, "tiny", image, methods, "onnxruntime")
    assert_same(torch_result, ort_result)
    assert set(torch_result.forward_passes) >= {"predict", "attribute", "apem", "apem_filter"}


def test_forward_only_stages_agree_on_the_demo_model(demo_model_dir: Path) -> None:
    engine = Engine({"demo": load_model_dir(demo_model_dir)}, EngineLimits())
    assert engine.list_models()[0].forward_backend == "onnxruntime"
    image = synthetic.make_sample(synthetic.TEST_SEED, 0).image
    methods = [method("occlusion", 0, window=8, stride=8)]
    torch_result = run(engine, "demo", image, methods, "torch")
    ort_result = run(engine, "demo", image, methods, "")  # the model's default
    assert_same(torch_result, ort_result)


def test_image_bytes_counts_the_input_and_every_layer_output() -> None:
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    floats = 3 * 8 * 8 + 4 * 8 * 8 + 4 * 8 * 8 + 4 * 4 * 4  # input, conv, relu, pool
    indices = 4 * 4 * 4  # max pooling's int64 indices, which torch allocates too
    assert image_bytes(module, (3, 8, 8)) == 4 * floats + 8 * indices


class Residual(nn.Module):
    """conv(x) + x, then an in-place ReLU and a flattening view."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) + x
        return y.relu_().flatten(1)


def test_image_bytes_counts_functional_operations_but_not_views_or_in_place_results() -> None:
    # input, conv output, the sum; the in-place ReLU and the view allocate nothing
    assert image_bytes(Residual(), (3, 8, 8)) == 4 * 3 * (3 * 8 * 8)


@pytest.mark.parametrize(
    ("per_image", "budget", "cap", "expected"),
    [(100, 1000, None, 10), (100, 999, None, 9), (100, 50, None, 1), (100, 1000, 4, 4)],
)
def test_memory_batch_size(per_image: int, budget: int, cap: int | None, expected: int) -> None:
    assert memory_batch_size(per_image, budget, cap) == expected


class RecordingSession:
    """An ONNX Runtime session stand-in that records the batch sizes it is given."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.batches: list[int] = []

    def run(self, _outputs, feeds):
        x = torch.from_numpy(feeds["x"])
        self.batches.append(x.shape[0])
        with torch.no_grad():
            return [self.module(x).numpy()]


def test_batches_follow_the_memory_budget() -> None:
    served = tiny_served()
    per_image = image_bytes(served.module, (3, 16, 16))
    config = ForwardConfig(memory_mb=1)
    forwards = prepare_forwards(served, config)
    assert forwards.bytes_per_image == per_image
    assert forwards.batch_size == (1024 * 1024) // per_image
    assert forwards.batch_size * per_image <= config.memory_budget
    assert (forwards.batch_size + 1) * per_image > config.memory_budget

    session = RecordingSession(served.module)
    budget = Budget(10**6)
    forward = OnnxForward(session, budget, batch_size=7)
    logits = forward(torch.rand(30, 3, 16, 16), "attribute")
    assert logits.shape == (30, 3)
    assert session.batches == [7, 7, 7, 7, 2]
    assert budget.by_stage == {"attribute": 30}


def test_the_batch_has_a_count_cap_and_the_probe_stays_within_it(monkeypatch) -> None:
    served = tiny_served()
    per_image = image_bytes(served.module, (3, 16, 16))
    probed: list[int] = []

    def spy(run, input_shape, limit, seconds=forward_module.PROBE_SECONDS):
        probed.append(limit)
        return fastest_batch(run, input_shape, limit, seconds)

    monkeypatch.setattr(forward_backends, "fastest_batch", spy)
    config = ForwardConfig(max_batch=40)
    assert config.memory_budget // per_image > 1000  # the budget alone would allow far more
    forwards = prepare_forwards(served, config)
    assert forwards.batch_size == 40
    assert forwards.call_batches[TORCH] == 40
    assert probed == [40]  # the probe's largest call is the capped batch
    assert forwards.call_batches[ONNXRUNTIME] <= 40
    assert forwards.gradient_batch(64) == 40
    assert forwards.gradient_batch(16) == 16
    assert prepare_forwards(served, ForwardConfig()).batch_size == ForwardConfig().max_batch
    with pytest.raises(ValueError, match="max_batch"):
        ForwardConfig(max_batch=0)


def test_gradient_batches_follow_the_memory_budget() -> None:
    served = tiny_served()
    per_image = image_bytes(served.module, (3, 16, 16))
    config = ForwardConfig(memory_mb=1, backend=TORCH)
    forwards = prepare_forwards(served, config)
    assert forwards.gradient_batch(10**6) == (1024 * 1024) // per_image
    engine = Engine({"tiny": served}, EngineLimits(max_batch=10**6), config)
    seen: list[int] = []
    hook = served.module.register_forward_pre_hook(
        lambda _module, args: seen.append(args[0].shape[0]) if args[0].requires_grad else None
    )
    try:
        image = torch.rand(3, 16, 16)
        request = ExplainRequest(
            "tiny",
            RawTensor((3, 16, 16), image.numpy().tobytes()),
            (MethodRequest("integrated_gradients", {"steps": 100}),),
        )
        engine.explain(request)
    finally:
        hook.remove()
    assert seen and max(seen) == min(100, (1024 * 1024) // per_image)


def test_calls_take_at_most_the_call_batch_of_what_the_memory_budget_builds() -> None:
    served = tiny_served()
    session = RecordingSession(served.module)
    budget = Budget(10**6)
    forward = OnnxForward(session, budget, batch_size=8, call_batch=3)
    x = torch.rand(10, 3, 16, 16)
    logits = forward(x, "attribute")
    assert session.batches == [3, 3, 3, 1]
    with torch.no_grad():
        assert torch.allclose(logits, served.module(x), atol=1e-6)
    assert budget.by_stage == {"attribute": 10}
    assert OnnxForward(session, budget, batch_size=4, call_batch=50).call_batch == 4
    assert OnnxForward(session, budget, batch_size=4).call_batch == 4
    with pytest.raises(ValueError, match="call_batch"):
        TorchForward(served.module, budget, 4, call_batch=0)


class FakeClock:
    """``time`` for ``fastest_batch``: a call of B images takes ``cost(B)`` seconds, its
    first call at each size (the warm-up) ``warm_up`` seconds."""

    def __init__(self, cost, warm_up: float = 1000.0) -> None:
        self.now, self.cost, self.warm_up, self.seen = 0.0, cost, warm_up, set()
        self.sizes: list[int] = []

    def perf_counter(self) -> float:
        return self.now

    def run(self, x: torch.Tensor) -> None:
        size = x.shape[0]
        if size not in self.seen:
            self.seen.add(size)
            self.sizes.append(size)
            self.now += self.warm_up
        else:
            self.now += self.cost(size)


@pytest.mark.parametrize(
    ("limit", "cost", "fastest"),
    [
        (100, lambda b: 1.0 + b, 100),  # per-call overhead: larger is faster, up to the limit
        (675, lambda b: 2.0 + b * (1.0 if b <= 64 else 1.3), 64),  # a cache cliff past 64
        (675, lambda b: 0.5 + b * (1.0 if b <= 16 else 2.0), 16),  # past 16: half the speed
        (1, lambda b: 1.0, 1),
    ],
)
def test_fastest_batch_takes_the_size_with_the_best_rate(monkeypatch, limit, cost, fastest) -> None:
    clock = FakeClock(cost)
    monkeypatch.setattr(forward_module, "time", clock)
    size, rates = fastest_batch(clock.run, (3, 4, 4), limit, seconds=1e9)
    expected_sizes = sorted({min(limit, 2**k) for k in range(12)}, reverse=True)
    assert clock.sizes == list(rates) == expected_sizes  # the limit, then powers of two
    assert size == fastest
    for s, rate in rates.items():  # the warm-up call never counts
        assert rate == pytest.approx(s / cost(s))


def test_fastest_batch_stops_trying_smaller_sizes_when_its_time_is_up(monkeypatch) -> None:
    clock = FakeClock(lambda b: 1.0 + b * (1.0 if b <= 64 else 2.0), warm_up=0.0)
    monkeypatch.setattr(forward_module, "time", clock)
    seconds = PROBE_CALLS * (1 + 2 * 100) + PROBE_CALLS * (1 + 64) - 1  # passes during 64
    size, rates = fastest_batch(clock.run, (3, 4, 4), 100, seconds=seconds)
    assert list(rates) == [100, 64] and size == 64
    with pytest.raises(ValueError, match="limit"):
        fastest_batch(clock.run, (3, 4, 4), 0)


def test_call_batches_are_measured_on_onnx_runtime_or_configured() -> None:
    served = tiny_served()
    measured = prepare_forwards(served)
    assert measured.call_batches["torch"] == measured.batch_size
    assert 1 <= measured.call_batches["onnxruntime"] <= measured.batch_size
    limit = measured.batch_size
    powers = {min(limit, 2**k) for k in range(limit.bit_length() + 1)}
    assert measured.call_batches["onnxruntime"] in powers
    fixed = prepare_forwards(served, ForwardConfig(call_batch=5))
    assert fixed.call_batches == {"torch": 5, "onnxruntime": 5}
    for backend in ("torch", "onnxruntime"):
        forward = fixed.forward(Budget(100), backend)
        assert (forward.batch_size, forward.call_batch) == (fixed.batch_size, 5)
    capped = prepare_forwards(served, ForwardConfig(call_batch=10**9, memory_mb=1))
    assert capped.call_batches["onnxruntime"] == capped.batch_size
    with pytest.raises(ValueError, match="call_batch"):
        ForwardConfig(call_batch=-1)


def test_both_backends_charge_the_same_passes_and_stop_at_the_budget() -> None:
    forwards = prepare_forwards(tiny_served())
    x = torch.rand(10, 3, 16, 16)
    spent = {}
    for backend in ("torch", "onnxruntime"):
        budget = Budget(20)
        forward = forwards.forward(budget, backend)
        assert forward.backend == backend and forward.batch_size == forwards.batch_size
        forward(x, "a")
        forward(x[:5], "b")
        spent[backend] = dict(budget.by_stage)
        with pytest.raises(Exception, match="forward passes"):
            forward(x, "c")
    assert spent["torch"] == spent["onnxruntime"] == {"a": 10, "b": 5}


def test_unknown_backend_is_an_invalid_argument() -> None:
    engine = Engine({"tiny": tiny_served()}, EngineLimits())
    with pytest.raises(InvalidArgument) as err:
        run(engine, "tiny", np.zeros((3, 16, 16), np.float32), [], "tensorrt")
    assert err.value.field == "forward_backend"


def test_torch_forward_keeps_its_old_signature() -> None:
    served = tiny_served()
    forward = TorchForward(served.module, Budget(100), 4)
    assert forward.batch_size == 4 and forward.label == "torch"
    assert forward(torch.rand(9, 3, 16, 16), "x").shape == (9, 3)
