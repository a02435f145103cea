"""A finished call leaves nothing behind for the garbage collector: gRPC's request receiver
of a call is freed when the call ends, not at the next full collection (issue 20, item 9:
the gateway's RSS grew by tens of MiB between full collections while every call's request
message waited in such a cycle)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client import CollectorRegistry

from support.service_fakes import FakeEngine, LoopThread
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.api.v1 import explain_pb2_grpc
from xaiserve.gateway.backends import LocalBackend
from xaiserve.gateway.metrics import Metrics
from xaiserve.gateway.server import start
from xaiserve.gateway.settings import Settings

CALLS = 20


def _receivers() -> int:
    """gRPC's per-call request receivers (grpc.aio's ``_MessageReceiver``) still alive."""
    return sum(1 for o in gc.get_objects() if type(o).__name__ == "_MessageReceiver")


@pytest.fixture
def stub(aio_loop: LoopThread) -> Iterator[explain_pb2_grpc.ExplanationServiceStub]:
    backend = LocalBackend(FakeEngine(), workers=2)
    running = aio_loop.run(start(Settings(port=0), backend, Metrics(CollectorRegistry())))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield explain_pb2_grpc.ExplanationServiceStub(channel)
    channel.close()
    aio_loop.run(running.server.stop(0))
    aio_loop.run(backend.close())


def test_finished_calls_leave_no_receiver_for_the_collector(
    stub: explain_pb2_grpc.ExplanationServiceStub, aio_loop: LoopThread
) -> None:
    request = pb.ExplainRequest(model_name="demo", image=pb.Image(encoded=b"x" * 1024))
    gc.collect()
    before = _receivers()
    gc.disable()  # only reference counting frees objects now
    try:
        for _ in range(CALLS):
            stub.Explain(request, timeout=10)
        aio_loop.run(asyncio.sleep(0.2))  # the server finishes the last call after answering
        left = _receivers() - before
    finally:
        gc.enable()
    assert left == 0
