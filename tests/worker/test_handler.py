"""The TorchServe handler in-process (no TorchServe server): mixed batches, errors, limits,
the wire format. tests/torchserve/ runs it inside a real TorchServe."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from support.tiny_models import write_tiny_model_dir
from xaiserve.api import convert, worker_protocol
from xaiserve.api.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ModelLoadError,
    NotFound,
    ResourceExhausted,
)
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.runtime.model import load_model_dir

ts_context = pytest.importorskip("ts.context")
handler_module = pytest.importorskip("xaiserve.worker.torchserve_handler")


class RecordingMetrics:
    """Stands in for TorchServe's metrics cache."""

    def __init__(self) -> None:
        self.counters: list[tuple[str, float, dict[str, str]]] = []

    def add_counter(self, name: str, value: float, idx: Any = None, dimensions: Any = ()) -> None:
        self.counters.append((name, value, {d.name: d.value for d in dimensions}))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def _context(
    model_dir: Path, yaml_config: dict[str, Any] | None = None, gpu: int | None = None
) -> Any:
    context = ts_context.Context(
        "tiny",
        str(model_dir),
        {"model": {"modelName": "tiny"}},
        8,
        gpu,
        "0.12.0",
        model_yaml_config=yaml_config or {},
    )
    context.metrics = RecordingMetrics()
    return context


@pytest.fixture(scope="module")
def handler(model_dir: Path) -> Any:
    instance = handler_module.XaiHandler()
    instance.initialize(_context(model_dir, {"xaiserve": {"limits": {"max_methods": 3}}}))
    return instance


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _tensor(seed: int) -> pb.Image:
    data = np.random.default_rng(seed).random((3, 16, 16), dtype=np.float32)
    return pb.Image(tensor=pb.Tensor(shape=[3, 16, 16], data=data.astype("<f4").tobytes()))


def _inputs(request: pb.ExplainRequest, deadline: float | None = None) -> dict[str, Any]:
    # TorchServe hands the values over as bytearrays
    raw = worker_protocol.explain_inputs(request.SerializeToString(), deadline)
    return {k: bytearray(v) for k, v in raw.items()}


def _mixed_batch() -> list[pb.ExplainRequest]:
    return [
        pb.ExplainRequest(
            model_name="tiny",
            image=pb.Image(encoded=_png(16, 16, 1)),
            target=0,
            methods=[pb.MethodRequest(method=pb.SALIENCY), pb.MethodRequest(method=pb.GRAD_CAM)],
        ),
        pb.ExplainRequest(
            model_name="tiny",
            image=pb.Image(encoded=_png(40, 24, 2)),
            target=2,
            top_k=2,
            methods=[
                pb.MethodRequest(
                    method=pb.OCCLUSION,
                    stage=pb.RAW,
                    occlusion=pb.OcclusionParams(window=4, stride=4),
                )
            ],
            map_encoding=pb.FLOAT32_AND_PNG,
        ),
        pb.ExplainRequest(model_name="tiny", image=_tensor(3), top_k=5),  # bad: 3 labels
        pb.ExplainRequest(
            model_name="tiny",
            image=_tensor(4),
            methods=[
                pb.MethodRequest(
                    method=pb.INTEGRATED_GRADIENTS,
                    integrated_gradients=pb.IntegratedGradientsParams(steps=8),
                )
            ],
            map_encoding=pb.PNG_OVERLAY,
        ),
    ]


def test_a_mixed_batch_answers_each_request_with_its_own_result(
    handler: Any, model_dir: Path
) -> None:
    requests = _mixed_batch()
    context = _context(model_dir)
    answers = handler.handle([_inputs(r, time.time() + 60) for r in requests], context)

    assert len(answers) == len(requests)
    reference = Engine({"tiny": load_model_dir(model_dir)}, EngineLimits(max_methods=3))
    for index, (request, answer) in enumerate(zip(requests, answers, strict=True)):
        if index == 2:
            with pytest.raises(InvalidArgument, match="top_k: must be between 1 and 3"):
                worker_protocol.decode_answer(answer)
            continue
        got = pb.ExplainResponse.FromString(worker_protocol.decode_answer(answer))
        plain = convert.request_from_proto(request)
        expected = convert.response_to_proto(
            reference.explain(plain), plain.want_array, plain.want_png
        )
        assert got.prediction == expected.prediction
        assert [e.method for e in got.explanations] == [m.method for m in request.methods]
        for mine, theirs in zip(got.explanations, expected.explanations, strict=True):
            assert mine.map.shape == theirs.map.shape
            # the batch's requests ran at once, their rows packed: the order of sums may move
            got_map = np.frombuffer(mine.map.data, "<f4")
            want_map = np.frombuffer(theirs.map.data, "<f4")
            np.testing.assert_allclose(got_map, want_map, rtol=1e-5, atol=1e-5)
            assert bool(mine.map.png_overlay) == plain.want_png
        assert got.forward_passes == expected.forward_passes
    assert answers[0] != answers[1]
    assert context.metrics.counters == [("XaiserveBatches", 1, {"BatchSize": "4"})]


@pytest.mark.parametrize(
    ("inputs", "error", "message"),
    [
        ({"body": bytearray(b"\x0a\xff\xff")}, InvalidArgument, "body: not a serialized"),
        ({"command": bytearray(b"reboot")}, InvalidArgument, "command: unknown command"),
        ({"command": bytearray(b"explain")}, InvalidArgument, "body: required"),
        (
            {
                "body": bytearray(
                    pb.ExplainRequest(model_name="other", image=_tensor(0)).SerializeToString()
                )
            },
            NotFound,
            "model 'other' is not served",
        ),
        (
            {
                "body": bytearray(
                    pb.ExplainRequest(
                        model_name="tiny",
                        image=_tensor(0),
                        methods=[pb.MethodRequest(method=pb.SALIENCY)] * 4,
                    ).SerializeToString()
                )
            },
            ResourceExhausted,
            "at most 3 per call",
        ),
        (
            {
                "body": bytearray(
                    pb.ExplainRequest(model_name="tiny", image=_tensor(0)).SerializeToString()
                ),
                "deadline": bytearray(b"soon"),
            },
            InvalidArgument,
            "deadline: must be Unix time",
        ),
        (
            {
                "body": bytearray(
                    pb.ExplainRequest(model_name="tiny", image=_tensor(0)).SerializeToString()
                ),
                "deadline": bytearray(repr(time.time() - 1).encode()),
            },
            DeadlineExceeded,
            "deadline passed while the request was queued",
        ),
    ],
)
def test_bad_requests_get_error_answers(
    handler: Any, model_dir: Path, inputs: dict[str, Any], error: type, message: str
) -> None:
    good = _inputs(pb.ExplainRequest(model_name="tiny", image=_tensor(9)))
    answers = handler.handle([good, inputs, good], _context(model_dir))
    with pytest.raises(error, match=message):
        worker_protocol.decode_answer(answers[1])
    first, last = (pb.ExplainResponse.FromString(answers[i]) for i in (0, 2))
    assert first.prediction == last.prediction and first.model_name == "tiny"


def test_list_models_command_describes_the_archive_model(handler: Any, model_dir: Path) -> None:
    answer = handler.handle([worker_protocol.list_models_inputs()], _context(model_dir))[0]
    models = pb.ListModelsResponse.FromString(worker_protocol.decode_answer(answer)).models
    assert [m.name for m in models] == ["tiny"]
    assert list(models[0].input_shape) == [3, 16, 16]
    assert pb.GRAD_CAM in models[0].methods
    assert models[0].device == "cpu"  # no GPU on this machine


def test_a_bug_becomes_an_internal_error_answer_with_an_id(
    handler: Any, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(handler.engine, "explain", broken)
    answer = handler.handle(
        [_inputs(pb.ExplainRequest(model_name="tiny", image=_tensor(0)))], _context(model_dir)
    )[0]
    with pytest.raises(worker_protocol.WorkerError) as caught:
        worker_protocol.decode_answer(answer)
    assert caught.value.code == "INTERNAL"
    assert "internal error in the TorchServe worker (id " in str(caught.value)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"xaiserve": {"limits": {"max_widgets": 3}}}, "unknown xaiserve.limits"),
        ({"xaiserve": {"limits": {"max_methods": 0}}}, "max_methods must be >= 1"),
        ({"xaiserve": {"limits": {"max_methods": "many"}}}, "max_methods must be >= 1"),
    ],
)
def test_bad_limits_in_model_config_fail_the_load(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        handler_module.engine_limits(config)


def test_limits_default_to_the_engine_defaults() -> None:
    assert handler_module.engine_limits(None) == EngineLimits()
    assert handler_module.engine_limits({"batchSize": 4}) == EngineLimits()


def test_forward_section_of_the_model_config() -> None:
    config = handler_module.forward_config(
        {
            "xaiserve": {
                "forward": {
                    "backend": "torch",
                    "onnx_providers": ["CPUExecutionProvider"],
                    "incremental_occlusion": False,
                }
            }
        }
    )
    assert config.backend == "torch" and not config.incremental_occlusion
    assert config.onnx_providers == ("CPUExecutionProvider",)
    assert handler_module.forward_config(None).incremental_occlusion
    with pytest.raises(ModelLoadError, match=r"unknown xaiserve\.forward"):
        handler_module.forward_config({"xaiserve": {"forward": {"incremental": False}}})
    with pytest.raises(ModelLoadError, match="incremental_occlusion"):
        handler_module.forward_config({"xaiserve": {"forward": {"incremental_occlusion": "on"}}})


def test_onnx_runtime_runs_on_the_gpu_torchserve_gives_the_worker(model_dir: Path) -> None:
    on_gpu = handler_module.XaiHandler()
    on_gpu.initialize(_context(model_dir, gpu=1))
    assert on_gpu.engine.forwards["tiny"].config.onnx_device_id == 1
    on_cpu = handler_module.XaiHandler()
    on_cpu.initialize(_context(model_dir))
    assert on_cpu.engine.forwards["tiny"].config.onnx_device_id == 0
    chosen = handler_module.XaiHandler()
    chosen.initialize(_context(model_dir, {"xaiserve": {"forward": {"onnx_device_id": 0}}}, 1))
    assert chosen.engine.forwards["tiny"].config.onnx_device_id == 0  # the archive's wins


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_a_worker_given_a_gpu_keeps_its_model_on_the_cpu(model_dir: Path) -> None:
    handler = handler_module.XaiHandler()
    handler.initialize(_context(model_dir, gpu=1))
    assert handler.engine.models["tiny"].device == torch.device("cpu")
    (info,) = handler.engine.list_models()
    assert info.device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_an_archive_asking_for_a_gpu_torch_does_not_see_fails_its_model(model_dir: Path) -> None:
    handler = handler_module.XaiHandler()
    handler.initialize(_context(model_dir, {"xaiserve": {"forward": {"device": "cuda"}}}, 0))
    (info,) = handler.engine.list_models()
    assert info.status == "FAILED"
    assert "xaiserve.forward.device 'cuda': torch sees no GPU" in info.status_reason


def test_torch_threads_of_the_worker(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> None:
    assert handler_module.torch_threads({}) == 0
    assert handler_module.torch_threads({"XAISERVE_TORCH_THREADS": " 3 "}) == 3
    with pytest.raises(ModelLoadError, match="XAISERVE_TORCH_THREADS='-1': must be a whole"):
        handler_module.torch_threads({"XAISERVE_TORCH_THREADS": "-1"})
    monkeypatch.setenv("XAISERVE_TORCH_THREADS", "2")
    handler_module.XaiHandler().initialize(_context(model_dir))
    assert torch.get_num_threads() == 2  # (the conftest restores the test process's)


def test_concurrency_from_the_archive_then_the_environment() -> None:
    serial = handler_module.serial
    assert not serial(None, {})  # batched by default
    assert serial(None, {"XAISERVE_CONCURRENCY": "serial"})
    assert not serial({"xaiserve": {"concurrency": "batched"}}, {"XAISERVE_CONCURRENCY": "serial"})
    assert serial({"xaiserve": {"concurrency": "serial"}}, {})
    with pytest.raises(ModelLoadError, match=r"xaiserve\.concurrency: 'parallel': choose from"):
        serial({"xaiserve": {"concurrency": "parallel"}}, {})
    with pytest.raises(ModelLoadError, match="XAISERVE_CONCURRENCY: 'one': choose from"):
        serial(None, {"XAISERVE_CONCURRENCY": "one"})


def test_the_engine_of_a_serial_archive_is_serial(model_dir: Path) -> None:
    handler = handler_module.XaiHandler()
    handler.initialize(_context(model_dir, {"xaiserve": {"concurrency": "serial"}}))
    assert handler.engine.serial


def test_an_archives_forward_section_reads_back() -> None:
    from xaiserve.model_store.archive import ArchiveSettings
    from xaiserve.runtime.forward.config import ForwardConfig

    forward = ForwardConfig(
        backend="torch",
        device="cpu",
        onnx_threads=2,
        memory_mb=64,
        max_batch=48,
        call_batch=8,
        incremental_occlusion=False,
    )
    settings = ArchiveSettings(forward=forward)
    assert handler_module.forward_config(settings.model_config()) == forward


@pytest.mark.parametrize(
    ("broken", "yaml_config", "reason"),
    [
        ("weights", None, "weights.pt: weights file not found"),
        ("", {"xaiserve": {"limits": {"max_widgets": 3}}}, "unknown xaiserve.limits"),
    ],
)
def test_a_model_that_fails_to_load_is_reported_not_restarted(
    tmp_path: Path, broken: str, yaml_config: dict[str, Any] | None, reason: str
) -> None:
    directory = write_tiny_model_dir(tmp_path / "archive")
    if broken == "weights":
        (directory / "weights.pt").unlink()
    handler = handler_module.XaiHandler()
    context = _context(directory, yaml_config)
    handler.initialize(context)  # does not raise: TorchServe would restart it forever
    listed = pb.ListModelsResponse.FromString(
        worker_protocol.decode_answer(
            handler.handle([worker_protocol.list_models_inputs()], context)[0]
        )
    )
    (model,) = listed.models
    assert (model.name, model.status) == ("tiny", pb.MODEL_FAILED)
    assert reason in model.status_reason and str(tmp_path) not in model.status_reason
    request = pb.ExplainRequest(model_name="tiny", image=_tensor(1))
    (answer,) = handler.handle([_inputs(request)], context)
    with pytest.raises(FailedPrecondition, match=f"model 'tiny' failed to load: .*{reason}"):
        worker_protocol.decode_answer(answer)
