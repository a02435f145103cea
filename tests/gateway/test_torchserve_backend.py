"""The torchserve backend against a fake TorchServe inference API (no Java): the key it
sends, key refresh, deadlines, error mapping, ListModels, readiness."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from support.service_fakes import LoopThread
from xaiserve.api import convert, worker_protocol
from xaiserve.api.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable, XaiError
from xaiserve.api.torchserve import inference_pb2, inference_pb2_grpc
from xaiserve.api.types import EncodedImage, ExplainRequest, MethodRequest
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.gateway.torchserve_backend import TorchServeBackend

KEY = "right-key"


def _answer_for(request: pb.ExplainRequest) -> bytes:
    return pb.ExplainResponse(
        model_name=request.model_name,
        model_version="1",
        prediction=pb.Prediction(target=pb.ClassScore(index=request.target, label="x")),
        explanations=[
            pb.Explanation(
                method=m.method,
                stage=pb.ONE_CHANNEL,
                map=pb.AttributionMap(shape=[1, 1, 1], data=b"\x00\x00\x80\x3f"),
            )
            for m in request.methods
        ],
        forward_passes={"predict": 1},
        device_calls=0.5,
    ).SerializeToString()


@dataclass
class FakeTorchServe(inference_pb2_grpc.InferenceAPIsServiceServicer):
    """Answers like TorchServe: checks the key, knows model ``demo``, echoes requests."""

    key: str = KEY
    health: str = '{"status": "Healthy"}'
    failure: tuple[grpc.StatusCode, str] | None = None
    seen: list[tuple[str, dict[str, bytes], float | None]] = field(default_factory=list)

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata())
        if metadata.get("authorization") != f"Bearer {self.key}":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "Token Authorization failed.")

    async def Ping(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._check(context)
        return inference_pb2.TorchServeHealthResponse(health=self.health)

    async def Predictions(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._check(context)
        self.seen.append((request.model_name, dict(request.input), context.time_remaining()))
        if self.failure is not None:
            await context.abort(*self.failure)
        if request.model_name != "demo":
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"Model not found: {request.model_name}\norg.pytorch.serve.archive.model."
                "ModelNotFoundException",
            )
        inputs = dict(request.input)
        if worker_protocol.command_of(inputs) == worker_protocol.LIST_MODELS:
            body = pb.ListModelsResponse(
                models=[pb.ModelInfo(name="demo", version="1", device="cuda:0")]
            )
            return inference_pb2.PredictionResponse(prediction=body.SerializeToString())
        explain = pb.ExplainRequest.FromString(inputs["body"])
        if explain.top_k == 99:
            answer = worker_protocol.encode_error("INVALID_ARGUMENT", "top_k: too many")
        else:
            answer = _answer_for(explain)
        return inference_pb2.PredictionResponse(prediction=answer)


@dataclass
class Setup:
    fake: FakeTorchServe
    backend: TorchServeBackend
    key_file: Path
    loop: LoopThread

    def run(self, coroutine: Any) -> Any:
        return self.loop.run(coroutine)

    def write_key(self, key: str) -> None:
        self.key_file.write_text(json.dumps({"inference": {"key": key}, "API": {"key": "x"}}))


@pytest.fixture
def setup(aio_loop: LoopThread, tmp_path: Path) -> Iterator[Setup]:
    fake = FakeTorchServe()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = aio_loop.run(start())
    key_file = tmp_path / "key_file.json"
    backend = TorchServeBackend(f"127.0.0.1:{port}", key_file, ["demo"])
    setup = Setup(fake, backend, key_file, aio_loop)
    setup.write_key(KEY)
    yield setup
    aio_loop.run(backend.close())
    aio_loop.run(server.stop(0))


def _plain(**changes: Any) -> ExplainRequest:
    base = {
        "model": "demo",
        "image": EncodedImage(b"png"),
        "target": 1,
        "methods": (
            MethodRequest(name="saliency", params_field="saliency"),
            MethodRequest(name="grad_cam", field="methods[1]", params_field="grad_cam"),
        ),
    }
    base.update(changes)
    return ExplainRequest(**base)


def _raises(setup: Setup, coroutine: Any, error: type[XaiError]) -> XaiError:
    with pytest.raises(error) as caught:
        setup.run(coroutine)
    return caught.value


def test_explain_sends_the_request_the_key_and_the_deadline(setup: Setup) -> None:
    deadline = time.monotonic() + 7.0
    result = setup.run(setup.backend.explain(_plain(), deadline))
    assert [e.method for e in result.explanations] == ["saliency", "grad_cam"]
    assert result.prediction.target.index == 1 and result.forward_passes == {"predict": 1}
    assert result.device_calls == 0.5
    model, inputs, remaining = setup.fake.seen[-1]
    assert model == "demo"
    assert convert.request_from_proto(pb.ExplainRequest.FromString(inputs["body"])) == _plain()
    # the gRPC deadline of the call (7 s); grpc measures what remains on the wall clock,
    # which the host may adjust a little, so up to one second more is allowed
    assert 5.0 < remaining <= 8.0
    assert abs(float(inputs["deadline"]) - (time.time() + 7.0)) < 1.0  # for the worker


def test_handler_errors_and_missing_models_keep_their_codes(setup: Setup) -> None:
    error = _raises(
        setup, setup.backend.explain(_plain(top_k=99), time.monotonic() + 5), InvalidArgument
    )
    assert str(error) == "top_k: too many"
    error = _raises(
        setup, setup.backend.explain(_plain(model="nope"), time.monotonic() + 5), NotFound
    )
    assert str(error) == "model_name: model 'nope' is not served"


@pytest.mark.parametrize(
    ("failure", "error", "message"),
    [
        (
            (
                grpc.StatusCode.INTERNAL,
                'Model "demo" has no worker to serve inference request. '
                "Please use scale workers API",
            ),
            Unavailable,
            "no free capacity for model 'demo'",
        ),
        (
            (
                grpc.StatusCode.INTERNAL,
                "Model version: 3 does not exist for model: demo\n"
                "org.pytorch.serve.archive.model.ModelVersionNotFoundException",
            ),
            NotFound,
            "version '' is not served",
        ),
        ((grpc.StatusCode.UNAVAILABLE, "worker restarting"), Unavailable, "unavailable"),
        (
            (grpc.StatusCode.INTERNAL, "java.lang.NullPointerException at org.pytorch..."),
            XaiError,
            "TorchServe error (id ",
        ),
    ],
)
def test_torchserve_failures_are_mapped(
    setup: Setup, failure: tuple[grpc.StatusCode, str], error: type[XaiError], message: str
) -> None:
    setup.fake.failure = failure
    caught = _raises(setup, setup.backend.explain(_plain(), time.monotonic() + 5), error)
    assert message in str(caught)
    assert "NullPointer" not in str(caught) and "org.pytorch" not in str(caught)


def test_a_passed_deadline_is_not_sent(setup: Setup) -> None:
    _raises(setup, setup.backend.explain(_plain(), time.monotonic() - 1), DeadlineExceeded)
    assert setup.fake.seen == []


def test_a_rotated_key_is_picked_up_and_a_wrong_one_is_unavailable(setup: Setup) -> None:
    setup.fake.key = "new-key"  # TorchServe restarted: new keys, the file not yet read
    caught = _raises(setup, setup.backend.explain(_plain(), time.monotonic() + 5), Unavailable)
    assert "refused the gateway's key" in str(caught)
    setup.write_key("new-key")
    assert setup.run(setup.backend.explain(_plain(), time.monotonic() + 5)).model == "demo"
    setup.key_file.unlink()
    caught = _raises(setup, setup.backend.explain(_plain(), time.monotonic() + 5), Unavailable)
    assert "no key file" in str(caught)


def test_list_models_and_readiness(setup: Setup) -> None:
    models = setup.run(setup.backend.list_models())
    assert [(m.name, m.device) for m in models] == [("demo", "cuda:0")]
    assert setup.run(setup.backend.ready())
    setup.fake.health = '{"status": "Unhealthy"}'
    assert not setup.run(setup.backend.ready())
    setup.fake.health = '{"status": "Healthy"}'
    setup.write_key("wrong")
    assert not setup.run(setup.backend.ready())


def test_torchserve_down_is_unavailable_at_once(aio_loop: LoopThread, tmp_path: Path) -> None:
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": KEY}}))
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = TorchServeBackend(f"127.0.0.1:{port}", key_file, ["demo"])
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            aio_loop.run(backend.explain(_plain(), time.monotonic() + 30))
        assert time.monotonic() - started < 3
        assert not aio_loop.run(backend.ready())
    finally:
        aio_loop.run(backend.close())


def test_a_huge_model_name_is_not_found_without_asking_torchserve(setup: Setup) -> None:
    name = "m" * 16_500
    explain = setup.backend.explain(_plain(model=name), time.monotonic() + 5)
    error = _raises(setup, explain, NotFound)
    assert str(error).startswith("model_name: model 'mmm") and len(str(error)) <= 512
    assert "16500 characters" in str(error)
    assert setup.fake.seen == []  # TorchServe would echo the name back in its trailer


def test_a_huge_version_torchserve_echoes_is_still_not_found(setup: Setup) -> None:
    version = "9" * 16_500
    setup.fake.failure = (
        grpc.StatusCode.INTERNAL,
        f"Model version: {version} does not exist for model: demo\n"
        "org.pytorch.serve.archive.model.ModelVersionNotFoundException",
    )
    plain = _plain(version=version)
    error = _raises(setup, setup.backend.explain(plain, time.monotonic() + 5), NotFound)
    assert str(error).startswith("model_version: model 'demo' version '999")
    assert len(str(error)) <= 512
