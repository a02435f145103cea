"""The gRPC server over a real engine whose model store has directories that failed to load:
ListModels lists them with their reason, Explain on them is FAILED_PRECONDITION, the good
model answers and health is SERVING."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support.broken_models import BROKEN, GOOD, write_store
from support.gateway import tiny_png
from support.service_fakes import Served
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.runtime.forward.config import ForwardConfig


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    store = write_store(tmp_path_factory.mktemp("store"))
    return Engine.from_model_store(store, EngineLimits(), ForwardConfig(export_on_load=False))


def _explain(served: Served, model: str) -> pb.ExplainResponse:
    request = pb.ExplainRequest(
        model_name=model,
        image=pb.Image(encoded=tiny_png()),
        methods=[pb.MethodRequest(method=pb.SALIENCY)],
    )
    return served.stub.Explain(request, timeout=30)


def test_list_models_shows_each_status_and_reason(
    serve_fake: Callable[..., Served], engine: Engine
) -> None:
    served = serve_fake(engine)
    models = {m.name: m for m in served.stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert set(models) == {GOOD, *BROKEN}
    assert models[GOOD].status == pb.MODEL_AVAILABLE and models[GOOD].status_reason == ""
    assert pb.SALIENCY in models[GOOD].methods
    assert models[GOOD].device == "cpu"  # this machine has no GPU: auto is the CPU
    for name, (_, reason) in BROKEN.items():
        assert models[name].status == pb.MODEL_FAILED, name
        assert models[name].device == ""
        assert reason in models[name].status_reason, (name, models[name].status_reason)
        assert not models[name].methods


def test_explain_on_failed_models_and_the_good_one(
    serve_fake: Callable[..., Served], engine: Engine
) -> None:
    served = serve_fake(engine)
    for name, (_, reason) in BROKEN.items():
        with pytest.raises(grpc.RpcError) as caught:
            _explain(served, name)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, name
        assert caught.value.details().startswith(f"model_name: model {name!r} failed to load: ")
        assert reason in caught.value.details()
    response = _explain(served, GOOD)
    assert response.model_name == GOOD and len(response.explanations) == 1
    health = health_pb2_grpc.HealthStub(served.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_server_starts_on_a_store_with_one_good_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from xaiserve.gateway.server import build_backend
    from xaiserve.gateway.settings import Settings

    write_store(tmp_path)
    settings = Settings(
        model_store=str(tmp_path),
        forward_call_batch=16,
        incremental_occlusion=False,
        concurrency="serial",
    )
    backend = build_backend(settings)
    try:
        assert backend._engine.serial  # --concurrency serial reached the engine
        assert asyncio.run(backend.ready())
        models = asyncio.run(backend.list_models())
        assert [m.name for m in models if m.status == "AVAILABLE"] == [GOOD]
    finally:
        asyncio.run(backend.close())
    for name, (_, reason) in BROKEN.items():
        assert f"model {name} failed to load: " in caplog.text and reason in caplog.text


def test_the_models_command_prints_why_a_model_failed(
    serve_fake: Callable[..., Served], engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    from xaiserve import cli

    served = serve_fake(engine)
    assert cli.main(["models", "--server", served.target]) == 0
    printed = capsys.readouterr().out
    assert "no-weights (version 1)\n  FAILED to load: no-weights/weights.pt: weights" in printed
    assert "tiny (version 1)\n  input      3x16x16" in printed
    assert cli.main(["models", "--server", served.target, "--json"]) == 0
    models = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert models["pickled"]["status"] == "failed"
    assert BROKEN["pickled"][1] in models["pickled"]["status_reason"]
    assert (models[GOOD]["status"], models[GOOD]["status_reason"]) == ("available", "")
