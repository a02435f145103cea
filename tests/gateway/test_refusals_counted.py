"""Calls refused before the servicer (bearer token, in-flight limit, gRPC's message size
limit) are counted in ``xaiserve_request_errors_total``, once each, under the code the
client sees."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from support.service_fakes import FakeEngine, Gate, LoopThread
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.api.v1 import explain_pb2_grpc
from xaiserve.gateway.backends import LocalBackend
from xaiserve.gateway.metrics import Metrics
from xaiserve.gateway.server import RunningServer, start
from xaiserve.gateway.settings import Settings

TOKEN = "token-of-the-refusal-tests"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
LIMIT = 64 * 1024


@dataclass
class Server:
    running: RunningServer
    engine: FakeEngine
    stub: explain_pb2_grpc.ExplanationServiceStub

    def errors(self) -> dict[tuple[str, str], float]:
        """``xaiserve_request_errors_total`` of a scrape (the text format), by (rpc, code)."""
        text = generate_latest(self.running.metrics.registry).decode("utf-8")
        return {
            (s.labels["rpc"], s.labels["code"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "xaiserve_request_errors_total"
        }


@pytest.fixture
def serve(aio_loop: LoopThread) -> Iterator[Callable[..., Server]]:
    """``serve(engine=None, **settings)``: a server over the fake engine with its metrics."""
    started: list[tuple[RunningServer, LocalBackend, grpc.Channel]] = []

    def make(engine: FakeEngine | None = None, **overrides: Any) -> Server:
        engine = engine or FakeEngine()
        settings = Settings(**{"port": 0, "max_message_bytes": LIMIT, **overrides})
        backend = LocalBackend(engine, workers=settings.workers)
        running = aio_loop.run(start(settings, backend, Metrics(CollectorRegistry())))
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        started.append((running, backend, channel))
        return Server(running, engine, explain_pb2_grpc.ExplanationServiceStub(channel))

    yield make
    for running, backend, channel in started:
        channel.close()
        aio_loop.run(running.server.stop(0))
        aio_loop.run(backend.close())


def _request(size: int = 16) -> pb.ExplainRequest:
    return pb.ExplainRequest(model_name="demo", image=pb.Image(encoded=b"x" * size))


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def test_oversized_messages_are_counted(serve: Callable[..., Server]) -> None:
    server = serve()
    assert server.errors() == {}
    assert _code(lambda: server.stub.Explain(_request(2 * LIMIT), timeout=10)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert server.errors() == {("Explain", "RESOURCE_EXHAUSTED"): 1.0}
    assert server.engine.calls == []
    assert server.stub.Explain(_request(LIMIT // 2), timeout=10).model_name == "demo"
    assert server.errors() == {("Explain", "RESOURCE_EXHAUSTED"): 1.0}  # OK is no error
    # a ListModelsRequest carrying an unknown field 15 of 128 KiB (length as a varint)
    big_list = pb.ListModelsRequest.FromString(b"\x7a\x80\x80\x08" + b"y" * (2 * LIMIT))
    assert _code(lambda: server.stub.ListModels(big_list, timeout=10)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert server.errors() == {
        ("Explain", "RESOURCE_EXHAUSTED"): 1.0,
        ("ListModels", "RESOURCE_EXHAUSTED"): 1.0,
    }


def test_calls_without_a_token_are_counted_once(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    server = serve(auth_token_file=str(tokens))
    assert _code(lambda: server.stub.Explain(_request(), timeout=10)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert _code(lambda: server.stub.ListModels(pb.ListModelsRequest(), timeout=10)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert server.errors() == {
        ("Explain", "UNAUTHENTICATED"): 1.0,
        ("ListModels", "UNAUTHENTICATED"): 1.0,
    }
    # too big and without a token: the client sees the size refusal, counted as that alone
    assert _code(lambda: server.stub.Explain(_request(2 * LIMIT), timeout=10)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert server.errors() == {
        ("Explain", "UNAUTHENTICATED"): 1.0,
        ("ListModels", "UNAUTHENTICATED"): 1.0,
        ("Explain", "RESOURCE_EXHAUSTED"): 1.0,
    }
    assert server.stub.Explain(_request(), timeout=10, metadata=AUTH).model_name == "demo"
    assert len(server.engine.calls) == 1


def test_calls_over_the_in_flight_limit_are_counted(serve: Callable[..., Server]) -> None:
    gate = Gate()
    server = serve(FakeEngine(behaviour=gate), workers=1, max_in_flight=1)
    first = server.stub.Explain.future(_request(), timeout=30)
    try:
        assert gate.entered(timeout=10)
        for _ in range(3):
            assert _code(lambda: server.stub.Explain(_request(), timeout=10)) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED
            )
        assert server.errors() == {("Explain", "RESOURCE_EXHAUSTED"): 3.0}
    finally:
        gate.open()
    assert first.result(20).model_name == "demo"
    assert server.errors() == {("Explain", "RESOURCE_EXHAUSTED"): 3.0}
