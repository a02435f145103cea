"""The gRPC server over a fake engine: conversion, status codes, health, reflection,
deadlines and limits, through real channels on ephemeral ports."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from support.service_fakes import (
    FAKE_PNG,
    FakeEngine,
    Gate,
    Served,
    fake_map,
    raise_error,
    sleep_for,
)
from xaiserve.api.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    XaiError,
)
from xaiserve.api.types import ExplainRequest
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.gateway.client import XaiClient, map_to_array

ServeFake = Callable[..., Served]


def _request(*methods: pb.MethodRequest) -> pb.ExplainRequest:
    return pb.ExplainRequest(model_name="demo", image=pb.Image(encoded=b"png"), methods=methods)


def _rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_explain_round_trip(serve_fake: ServeFake) -> None:
    served = serve_fake()
    with XaiClient(served.target, timeout=10) as client:
        response = client.explain(
            b"png-bytes",
            model="demo",
            methods=("saliency", "occlusion"),
            target=2,
            top_k=1,
            stage="raw",
            png=True,
            params={"occlusion": {"window": 3, "baseline": 0.0}},
            reliability={"eps_max": 4.0},
        )

    ((request, deadline),) = served.engine.calls
    assert request.image.data == b"png-bytes" and request.target == 2 and request.top_k == 1
    assert [m.name for m in request.methods] == ["saliency", "occlusion"]
    assert request.methods[1].params == {"window": 3, "baseline": 0.0}
    assert request.methods[1].params_field == "occlusion"
    assert request.methods[1].field == "methods[1]"
    reliability = request.methods[0].reliability
    assert reliability is not None and reliability.eps_max == 4.0
    assert request.want_png and request.want_array
    # the client's 10 s arrived (not the server's 60-s default); grpc measures the time
    # remaining on the wall clock, which the host may adjust by a fraction of a second
    # (CI once saw 10.1 s), so the bound allows one second
    assert deadline is not None and 0 < deadline - time.monotonic() < 11

    assert response.model_name == "demo"
    assert response.prediction.target.index == 2 and response.prediction.target.label == "triangle"
    assert [e.method for e in response.explanations] == [pb.SALIENCY, pb.OCCLUSION]
    for index, explanation in enumerate(response.explanations):
        np.testing.assert_array_equal(map_to_array(explanation.map), fake_map(index, "raw"))
        assert explanation.map.png_overlay == FAKE_PNG
        assert explanation.forward_passes == index + 1
    assert [t.stage for t in response.timings] == ["decode", "predict", "total"]
    assert response.device_calls == 1.5


def test_list_models(serve_fake: ServeFake) -> None:
    served = serve_fake()
    with XaiClient(served.target, timeout=10) as client:
        models = client.list_models().models
    assert [m.name for m in models] == ["demo", "zeta"]
    assert list(models[0].methods) == [pb.SALIENCY, pb.GRAD_CAM, pb.OCCLUSION]
    assert [m.device for m in models] == ["cuda:1", ""]


def test_params_for_the_wrong_method_are_invalid(serve_fake: ServeFake) -> None:
    served = serve_fake()
    request = _request(
        pb.MethodRequest(method=pb.GRAD_CAM),
        pb.MethodRequest(method=pb.SALIENCY, occlusion=pb.OcclusionParams(window=4)),
    )
    error = _rpc_error(lambda: served.stub.Explain(request, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "methods[1].occlusion: parameters for OCCLUSION given to method SALIENCY"
    )
    assert served.engine.calls == []  # refused before the engine


def test_unknown_method_value_is_invalid(serve_fake: ServeFake) -> None:
    served = serve_fake()
    request = _request(pb.MethodRequest(method=99))
    error = _rpc_error(lambda: served.stub.Explain(request, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("methods[0].method: ")


def test_missing_image_is_invalid(serve_fake: ServeFake) -> None:
    served = serve_fake()
    request = pb.ExplainRequest(model_name="demo")
    error = _rpc_error(lambda: served.stub.Explain(request, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("image: ")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (
            InvalidArgument("methods[0].smoothgrad.samples", "must be between 1 and 1024, got 0"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (NotFound("model_name", "no model 'nope'"), grpc.StatusCode.NOT_FOUND),
        (
            ResourceExhausted("image.encoded", "9000000 bytes, limit 8388608"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (DeadlineExceeded("methods[2]", "deadline passed"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (Unavailable("model_name", "worker down"), grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_domain_errors_become_status_codes(
    serve_fake: ServeFake, error: XaiError, code: grpc.StatusCode
) -> None:
    served = serve_fake(FakeEngine(behaviour=raise_error(error)))
    with XaiClient(served.target, timeout=10) as client:
        rpc_error = _rpc_error(lambda: client.explain(b"png"))
    assert rpc_error.code() == code
    assert rpc_error.details() == str(error)
    assert rpc_error.details().startswith(f"{error.field}: ")


def test_unexpected_error_is_internal_without_traceback_and_server_keeps_serving(
    serve_fake: ServeFake, caplog: pytest.LogCaptureFixture
) -> None:
    fail = threading.Event()
    fail.set()

    def behaviour(request: ExplainRequest, deadline: float | None) -> None:
        if fail.is_set():
            raise ZeroDivisionError("secret detail in /work/main/handlers/engine.py")

    served = serve_fake(FakeEngine(behaviour=behaviour))
    with caplog.at_level(logging.ERROR), XaiClient(served.target, timeout=10) as client:
        error = _rpc_error(lambda: client.explain(b"png"))
        assert error.code() == grpc.StatusCode.INTERNAL
        details = error.details()
        assert details.startswith("internal error (id ")
        for leak in ("Traceback", ".py", "/work", "secret", "ZeroDivisionError", "line "):
            assert leak not in details

        fail.clear()
        assert client.explain(b"png").model_name == "demo"  # the next call is answered
    assert any("Traceback" in r for r in caplog.text.splitlines())  # logged server-side


def test_health_reports_serving(serve_fake: ServeFake) -> None:
    served = serve_fake()
    health = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", "xaiserve.v1.ExplanationService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    error = _rpc_error(
        lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(serve_fake: ServeFake) -> None:
    served = serve_fake()
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="xaiserve.v1.ExplanationService"
        ),
    ]
    listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "xaiserve.v1.ExplanationService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    assert described.file_descriptor_response.file_descriptor_proto  # the .proto is served


def test_client_deadline_is_honoured(serve_fake: ServeFake) -> None:
    served = serve_fake(FakeEngine(behaviour=sleep_for(2.0)))
    with XaiClient(served.target, timeout=0.3) as client:
        start = time.monotonic()
        error = _rpc_error(lambda: client.explain(b"png"))
        elapsed = time.monotonic() - start
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.5
    ((_, deadline),) = served.engine.calls
    # the engine got the client's 0.3 s, not the 60-s default (one second allowed for wall
    # clock adjustments, as in test_explain_round_trip)
    assert deadline is not None and deadline - start < 1.3


def test_default_deadline_applies_when_the_client_sends_none(serve_fake: ServeFake) -> None:
    served = serve_fake(FakeEngine(behaviour=sleep_for(2.0)), default_deadline_seconds=0.3)
    start = time.monotonic()
    error = _rpc_error(lambda: served.stub.Explain(_request(), timeout=None))
    elapsed = time.monotonic() - start
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline" in error.details()
    assert elapsed < 1.5


def test_message_size_limit(serve_fake: ServeFake) -> None:
    served = serve_fake(max_message_bytes=64 * 1024)
    big = pb.ExplainRequest(model_name="demo", image=pb.Image(encoded=b"x" * (100 * 1024)))
    error = _rpc_error(lambda: served.stub.Explain(big, timeout=10))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served.engine.calls == []
    small = pb.ExplainRequest(model_name="demo", image=pb.Image(encoded=b"x" * 1024))
    assert served.stub.Explain(small, timeout=10).model_name == "demo"


def test_over_capacity_is_resource_exhausted(serve_fake: ServeFake) -> None:
    gate = Gate(hold_seconds=10)
    served = serve_fake(FakeEngine(behaviour=gate), workers=1, max_in_flight=1)
    first = served.stub.Explain.future(_request(), timeout=10)
    try:
        assert gate.entered(timeout=5)
        error = _rpc_error(lambda: served.stub.Explain(_request(), timeout=10))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "capacity" in error.details()
    finally:
        gate.open()
    assert first.result(10).model_name == "demo"
    assert served.stub.Explain(_request(), timeout=10).model_name == "demo"


def test_one_log_line_per_call_without_the_image(
    serve_fake: ServeFake, caplog: pytest.LogCaptureFixture
) -> None:
    served = serve_fake()
    secret_image = b"IMAGE-BYTES-NOT-FOR-LOGS"
    with caplog.at_level(logging.INFO, logger="xaiserve.gateway.servicer"):
        served.stub.Explain(
            pb.ExplainRequest(
                model_name="demo",
                image=pb.Image(encoded=secret_image),
                methods=[
                    pb.MethodRequest(method=pb.SALIENCY),
                    pb.MethodRequest(method=pb.GRAD_CAM),
                ],
            ),
            timeout=10,
        )
        _rpc_error(lambda: served.stub.Explain(_request(pb.MethodRequest(method=99)), timeout=10))
    lines = [r.getMessage() for r in caplog.records if r.name == "xaiserve.gateway.servicer"]
    assert len(lines) == 2
    assert "model=demo" in lines[0] and "methods=SALIENCY,GRAD_CAM" in lines[0]
    assert "status=OK" in lines[0] and "seconds=" in lines[0]
    assert "methods=99" in lines[1] and "status=INVALID_ARGUMENT" in lines[1]
    assert "IMAGE-BYTES" not in caplog.text
