"""ONNX export of the pixel-space forward, its check against torch, and what a model that
fails either serves on (torch, with the reason in ListModels)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from support.tiny_models import TinyNet, tiny_served, write_tiny_model_dir
from xaiserve.api.types import ExplainRequest, MethodRequest, RawTensor
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.model_store import synthetic
from xaiserve.runtime.forward import backends as forward_backends
from xaiserve.runtime.forward import onnx_export
from xaiserve.runtime.forward.config import ForwardConfig
from xaiserve.runtime.forward.onnx_export import (
    ONNX_FILE,
    REPORT_FILE,
    OnnxUnavailable,
    check_onnx,
    export_model_dir,
    export_onnx,
    new_session,
)
from xaiserve.runtime.model import PixelSpaceModel, ServedModel, load_model_dir

TOLERANCE = 1e-4


def held_out(n: int, size: int = synthetic.IMAGE_SIZE) -> torch.Tensor:
    """Held-out shape images (seed TEST_SEED), n x 3 x size x size."""
    return torch.from_numpy(
        np.stack([synthetic.make_sample(synthetic.TEST_SEED, i, size).image for i in range(n)])
    )


def logits_both(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    session = new_session(export_onnx(module, tuple(x.shape[1:])))
    (got,) = session.run(["logits"], {"x": x.numpy()})
    with torch.no_grad():
        return module(x), torch.from_numpy(got)


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_tiny_model_torch_equals_onnxruntime(batch: int) -> None:
    module = tiny_served().module
    generator = torch.Generator().manual_seed(batch)
    for x in (torch.rand(batch, 3, 16, 16, generator=generator), held_out(batch, 16)):
        expected, got = logits_both(module, x)
        assert got.shape == expected.shape == (batch, 3)
        assert (got - expected).abs().max() <= TOLERANCE


def test_demo_model_torch_equals_onnxruntime(demo_model_dir: Path) -> None:
    served = load_model_dir(demo_model_dir)
    real = held_out(24)
    random = torch.rand(9, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for x in (real, random):
        expected, got = logits_both(served.module, x)
        assert (got - expected).abs().max() <= TOLERANCE
        assert torch.equal(got.argmax(1), expected.argmax(1))
    session = new_session(export_onnx(served.module, served.config.input_shape))
    report = check_onnx(served.module, session, served.config.input_shape, real_inputs=real)
    assert report.passed and set(report.by_input) == {"random", "constant", "real"}
    assert report.max_abs_diff <= TOLERANCE and report.images == 6 + 3 + 24


def test_export_model_dir_writes_the_graph_and_its_report(tmp_path: Path) -> None:
    model_dir = write_tiny_model_dir(tmp_path / "tiny")
    result = export_model_dir(model_dir, real_inputs=held_out(4, 16))
    assert result.onnx_status == "" and result.check is not None and result.check.passed
    assert (model_dir / ONNX_FILE).is_file()
    report = json.loads((model_dir / REPORT_FILE).read_text())
    assert report["onnx_status"] == "" and report["check"]["passed"]
    assert report["check"]["max_abs_diff"] <= TOLERANCE and "real" in report["check"]["by_input"]

    engine = Engine.from_model_store(tmp_path, EngineLimits())
    (info,) = engine.list_models()
    assert (info.forward_backend, info.onnx_status) == ("onnxruntime", "")


def test_stale_graph_is_exported_again_at_load(tmp_path: Path) -> None:
    """A model.onnx of other weights fails the load-time check; a fresh export is used."""
    model_dir = write_tiny_model_dir(tmp_path / "tiny", seed=0)
    other = write_tiny_model_dir(tmp_path / "other", seed=1)
    export_model_dir(other)
    (model_dir / ONNX_FILE).write_bytes((other / ONNX_FILE).read_bytes())
    forwards = forward_backends.prepare_forwards(load_model_dir(model_dir))
    assert forwards.session is not None and forwards.onnx_status == ""
    x = torch.rand(4, 3, 16, 16)
    expected = forwards.served.module(x)
    (got,) = forwards.session.run(["logits"], {"x": x.numpy()})
    assert (torch.from_numpy(got) - expected).abs().max() <= TOLERANCE


def test_unreadable_graph_is_exported_again_at_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = write_tiny_model_dir(tmp_path / "tiny")
    (model_dir / ONNX_FILE).write_bytes(b"not an onnx graph")
    forwards = forward_backends.prepare_forwards(load_model_dir(model_dir))
    assert forwards.session is not None and forwards.onnx_status == ""
    assert "model.onnx unusable (onnxruntime could not load the graph" in caplog.text


class MedianNet(TinyNet):
    """TinyNet with a median over the image added to every logit: aten::median has no
    ONNX export at opset 17."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x.flatten(1).median(dim=1, keepdim=True).values


class FrozenNet(TinyNet):
    """A Python float taken from the input: tracing freezes the example input's value, so
    the exported graph differs from torch on other inputs and fails the check."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * float(x.std())


def served_with(net: nn.Module, name: str) -> ServedModel:
    base = tiny_served()
    net.load_state_dict(base.module.net.state_dict())
    cfg = replace(base.config, name=name)
    module = PixelSpaceModel(net, cfg.mean, cfg.std).eval()
    return ServedModel(cfg, module, net.features[4], Path("."))


def explain(engine: Engine, model: str, backend: str = "") -> tuple[dict, dict, np.ndarray]:
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(5)).numpy()
    method = MethodRequest(
        "occlusion", {"window": 4, "stride": 4}, field="methods[0]", params_field="occlusion"
    )
    result = engine.explain(
        ExplainRequest(
            model=model,
            image=RawTensor(image.shape, image.astype("<f4").tobytes()),
            methods=(method,),
            forward_backend=backend,
        )
    )
    return result.timings, result.forward_passes, result.explanations[0].map


def test_model_failing_export_or_check_serves_on_torch(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xaiserve.runtime.forward.backends")
    models = {
        "median": served_with(MedianNet(), "median"),
        "frozen": served_with(FrozenNet(), "frozen"),
        "tiny": tiny_served(),
    }
    engine = Engine(models, EngineLimits())
    infos = {info.name: info for info in engine.list_models()}
    assert infos["tiny"].forward_backend == "onnxruntime" and infos["tiny"].onnx_status == ""
    median, frozen = infos["median"], infos["frozen"]
    assert median.forward_backend == "torch"
    assert median.onnx_status.startswith("export failed: ")
    assert "aten::median" in median.onnx_status
    assert frozen.forward_backend == "torch"
    assert frozen.onnx_status.startswith("check failed: max |logit difference| ")
    assert "> tolerance 0.0001" in frozen.onnx_status
    logged = caplog.text
    assert "median serves forward-only batches on torch: export failed" in logged
    assert "frozen serves forward-only batches on torch: check failed" in logged

    # it still serves; asking for onnxruntime runs torch and says so in the timings
    default_timings, default_passes, default_map = explain(engine, "median")
    asked_timings, asked_passes, asked_map = explain(engine, "median", "onnxruntime")
    assert "forward.torch" in default_timings
    assert "forward.torch_fallback" in asked_timings and "forward.onnxruntime" not in asked_timings
    assert asked_passes == default_passes
    np.testing.assert_array_equal(asked_map, default_map)
    assert "median: onnxruntime requested, running torch: export failed" in caplog.text


def test_without_onnxruntime_models_serve_on_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise OnnxUnavailable("onnxruntime is not installed (No module named 'onnxruntime')")

    monkeypatch.setattr(forward_backends, "onnxruntime_module", missing)
    engine = Engine({"tiny": tiny_served()}, EngineLimits())
    (info,) = engine.list_models()
    assert info.forward_backend == "torch"
    assert info.onnx_status == "onnxruntime is not installed (No module named 'onnxruntime')"
    timings, _, _ = explain(engine, "tiny", "onnxruntime")
    assert "forward.torch_fallback" in timings


def test_unavailable_providers_are_a_reason_not_an_error() -> None:
    config = ForwardConfig(onnx_providers=("NoSuchExecutionProvider",))
    engine = Engine({"tiny": tiny_served()}, EngineLimits(), config)
    (info,) = engine.list_models()
    assert info.forward_backend == "torch"
    assert info.onnx_status.startswith("none of the configured providers (NoSuchExecutionProvider)")


def test_export_model_dir_records_a_failure(tmp_path: Path) -> None:
    model_dir = write_tiny_model_dir(tmp_path / "tiny")
    source = (model_dir / "model.py").read_text()
    source = source.replace(
        "return self.head(self.features(x).mean(dim=(2, 3)))",
        "return self.head(self.features(x).mean(dim=(2, 3))) + x.flatten(1).median(1, True)[0]",
    )
    assert "median" in source
    (model_dir / "model.py").write_text(source)
    (model_dir / ONNX_FILE).write_bytes(b"an old graph")
    result = export_model_dir(model_dir)
    assert result.onnx_status.startswith("export failed: ")
    assert not (model_dir / ONNX_FILE).exists()
    report = json.loads((model_dir / REPORT_FILE).read_text())
    assert report["onnx_status"] == result.onnx_status and report["check"] is None


def test_no_export_at_load_when_turned_off() -> None:
    config = ForwardConfig(export_on_load=False)
    forwards = forward_backends.prepare_forwards(tiny_served(), config)
    assert forwards.session is None
    assert forwards.onnx_status == "no model.onnx in the model directory and export at load is off"


def test_torch_default_backend_keeps_onnxruntime_on_request() -> None:
    engine = Engine({"tiny": tiny_served()}, EngineLimits(), ForwardConfig(backend="torch"))
    (info,) = engine.list_models()
    assert (info.forward_backend, info.onnx_status) == ("torch", "")
    assert "forward.torch" in explain(engine, "tiny")[0]
    assert "forward.onnxruntime" in explain(engine, "tiny", "onnxruntime")[0]


@pytest.mark.parametrize(
    "changes",
    [
        {"backend": "tensorrt"},
        {"onnx_threads": -1},
        {"onnx_providers": ()},
        {"memory_mb": 0},
        {"onnx_tolerance": 0.0},
        {"onnx_device_id": -1},
    ],
)
def test_bad_forward_config_is_refused(changes: dict) -> None:
    with pytest.raises(ValueError):
        ForwardConfig(**changes)


def test_export_of_a_module_in_training_mode_restores_it() -> None:
    module = tiny_served().module.train()
    export_onnx(module, (3, 16, 16))
    assert module.training
    with pytest.raises(OnnxUnavailable, match=r"^export failed: "):
        export_onnx(PixelSpaceModel(MedianNet(), (0.5,) * 3, (0.25,) * 3), (3, 16, 16))
    assert onnx_export.ONNX_FILE == "model.onnx"


# ------------------------------------------------------------------ execution providers

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def test_provider_list_keeps_what_onnxruntime_has_and_gives_gpus_their_device() -> None:
    wanted = ("TensorrtExecutionProvider", CUDA, CPU)
    assert onnx_export.provider_list(wanted, [CPU], 2) == [CPU]
    assert onnx_export.provider_list(wanted, [CPU, CUDA], 2) == [(CUDA, {"device_id": "2"}), CPU]
    assert onnx_export.provider_list((CPU, CUDA), [CUDA, CPU]) == [CPU, (CUDA, {"device_id": "0"})]


def test_the_default_providers_run_on_the_cpu_where_onnxruntime_has_no_cuda() -> None:
    assert ForwardConfig().onnx_providers == (CUDA, CPU)
    engine = Engine({"tiny": tiny_served()}, EngineLimits())
    (info,) = engine.list_models()
    assert (info.forward_backend, info.onnx_status) == ("onnxruntime", "")
    assert info.onnx_providers == (CPU,)
    no_onnx = ForwardConfig(export_on_load=False)
    torch_only = Engine({"tiny": tiny_served()}, EngineLimits(), no_onnx)
    assert torch_only.list_models()[0].onnx_providers == ()


class FakeSession:
    def __init__(self, providers: list[str]) -> None:
        self.running = providers

    def get_providers(self) -> list[str]:
        return self.running


def test_a_gpu_provider_that_cannot_start_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """onnxruntime-gpu on a node without a usable GPU: it falls back to the CPU itself; the
    session asked for CUDA on the configured GPU, and the fallback is logged."""
    import onnxruntime

    asked = []

    class GpuBuild:
        SessionOptions = onnxruntime.SessionOptions
        ExecutionMode = onnxruntime.ExecutionMode
        GraphOptimizationLevel = onnxruntime.GraphOptimizationLevel

        @staticmethod
        def get_available_providers() -> list[str]:
            return [CUDA, CPU]

        @staticmethod
        def InferenceSession(source: Any, options: Any, providers: list) -> FakeSession:
            asked.append(providers)
            return FakeSession([CPU])

    monkeypatch.setattr(onnx_export, "onnxruntime_module", lambda: GpuBuild)
    with caplog.at_level(logging.WARNING, logger=onnx_export.__name__):
        session = new_session(b"graph", (CUDA, CPU), threads=1, device_id=3)
    assert session.get_providers() == [CPU]
    assert asked == [[(CUDA, {"device_id": "3"}), CPU]]
    assert "could not start CUDAExecutionProvider; the session runs on CPUExecutionProvider" in (
        caplog.text
    )


def test_a_session_on_a_gpu_runs_occlusion_as_full_passes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    forwards = forward_backends.prepare_forwards(tiny_served())
    forwards.session = FakeSession([CUDA, CPU])
    assert forwards.providers == (CUDA, CPU)
    starts = [[0, 4, 8, 12]] * 2
    with caplog.at_level(logging.INFO, logger=forward_backends.__name__):
        assert forwards.occluder("onnxruntime", 4, starts) is None
    assert "runs full forward passes: the session runs on CUDAExecutionProvider" in caplog.text
    assert forwards.occluder("torch", 4, starts) is not None
