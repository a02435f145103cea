"""TorchServe's token authorization, the gateway's key handling, and TorchServe's failures
as gRPC codes through the gateway."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2

from support.demo_images import demo_png
from xaiserve.api import worker_protocol
from xaiserve.api.torchserve import inference_pb2, inference_pb2_grpc
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.api.v1 import explain_pb2_grpc
from xaiserve.gateway.client import XaiClient

pytestmark = pytest.mark.torchserve


def _error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def _key(torchserve) -> str:
    return json.loads(torchserve.config.key_file.read_text())["inference"]["key"]


def test_torchserve_refuses_calls_without_the_right_key(torchserve) -> None:
    request = inference_pb2.PredictionsRequest(
        model_name="demo", input=worker_protocol.list_models_inputs()
    )
    with grpc.insecure_channel(torchserve.config.grpc_target) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        for metadata in (None, (("authorization", "Bearer wrong-key"),)):
            error = _error(lambda md=metadata: stub.Predictions(request, timeout=10, metadata=md))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            error = _error(
                lambda md=metadata: stub.Ping(empty_pb2.Empty(), timeout=10, metadata=md)
            )
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        right = (("authorization", f"Bearer {_key(torchserve)}"),)
        assert stub.Predictions(request, timeout=30, metadata=right).prediction


def test_gateway_uses_the_key_and_never_logs_it(
    torchserve, start_gateway: Callable, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = start_gateway(torchserve.backend())
    with caplog.at_level(logging.DEBUG), XaiClient(gateway.target, timeout=60) as client:
        response = client.explain(demo_png(2), methods=("saliency",))
        assert response.model_name == "demo" and len(response.explanations) == 1
    assert _key(torchserve) not in caplog.text


def test_gateway_reads_the_key_file_again_when_it_changes(
    torchserve, start_gateway: Callable, tmp_path: Path
) -> None:
    key_file = tmp_path / "key_file.json"
    document = json.loads(torchserve.config.key_file.read_text())
    right = document["inference"]["key"]
    document["inference"]["key"] = "stale-key"
    key_file.write_text(json.dumps(document))
    gateway = start_gateway(torchserve.backend(key_file))
    with XaiClient(gateway.target, timeout=60) as client:
        error = _error(lambda: client.explain(demo_png(0)))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "refused the gateway's key" in error.details()
        assert right not in error.details()
        document["inference"]["key"] = right
        key_file.write_text(json.dumps(document) + "\n")  # a rotated key
        assert client.explain(demo_png(0)).model_name == "demo"


def test_torchserve_failures_become_grpc_codes(torchserve, start_gateway: Callable) -> None:
    gateway = start_gateway(torchserve.backend())
    with grpc.insecure_channel(gateway.target) as channel:
        stub = explain_pb2_grpc.ExplanationServiceStub(channel)

        def explain(request: pb.ExplainRequest, timeout: float = 60) -> grpc.RpcError:
            return _error(lambda: stub.Explain(request, timeout=timeout))

        image = pb.Image(encoded=demo_png(0))
        error = explain(pb.ExplainRequest(model_name="nope", image=image))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == "model_name: model 'nope' is not served"
        error = explain(pb.ExplainRequest(model_name="demo", model_version="9", image=image))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "version '9' is not served" in error.details()
        error = explain(pb.ExplainRequest(model_name="demo", image=image, top_k=99))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("top_k: must be between 1 and 4")
        slow = pb.ExplainRequest(
            model_name="demo",
            image=image,
            methods=[
                pb.MethodRequest(
                    method=pb.OCCLUSION, occlusion=pb.OcclusionParams(window=4, stride=1)
                )
            ],
        )
        started = time.monotonic()
        error = explain(slow, timeout=0.3)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2
        assert stub.Explain(pb.ExplainRequest(model_name="demo", image=image), timeout=120)


def test_a_full_torchserve_queue_is_unavailable_not_a_hang(
    torchserve, start_gateway: Callable
) -> None:
    """``tiny`` has one worker, no batching and a job queue of one: of eight simultaneous
    calls TorchServe takes two and refuses the rest at once."""
    gateway = start_gateway(torchserve.backend())
    request = pb.ExplainRequest(
        model_name="tiny",
        image=pb.Image(tensor=pb.Tensor(shape=[3, 16, 16], data=bytes(3 * 16 * 16 * 4))),
        methods=[
            pb.MethodRequest(method=pb.SMOOTHGRAD, smoothgrad=pb.SmoothGradParams(samples=1024))
        ]
        * 2,
    )
    with grpc.insecure_channel(gateway.target) as channel:
        stub = explain_pb2_grpc.ExplanationServiceStub(channel)

        def call(_: int) -> tuple[grpc.StatusCode, str, float]:
            started = time.monotonic()
            try:
                stub.Explain(request, timeout=120)
                return grpc.StatusCode.OK, "", time.monotonic() - started
            except grpc.RpcError as error:
                return error.code(), error.details(), time.monotonic() - started

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(call, range(8)))
    refused = [o for o in outcomes if o[0] == grpc.StatusCode.UNAVAILABLE]
    assert refused, outcomes
    assert all("no free capacity for model 'tiny'" in o[1] for o in refused)
    assert all(o[2] < 5 for o in refused)
    assert {o[0] for o in outcomes} == {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
