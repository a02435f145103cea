"""Fixtures of the gateway tests: servers over a fake engine on ephemeral ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from support.servers import start_server
from support.service_fakes import FakeEngine, LoopThread, Served
from xaiserve.gateway.backends import LocalBackend
from xaiserve.gateway.settings import Settings


@pytest.fixture
def serve_fake(aio_loop: LoopThread) -> Iterator[Callable[..., Served]]:
    """``serve_fake(engine=None, **settings)`` starts a server on port 0 over a LocalBackend."""
    started: list[tuple[grpc.aio.Server, LocalBackend, grpc.Channel]] = []

    def start(engine: FakeEngine | None = None, **overrides: Any) -> Served:
        engine = engine or FakeEngine()
        settings = Settings(**{"port": 0, **overrides})
        backend = LocalBackend(engine, workers=settings.workers)
        server, port = aio_loop.run(start_server(settings, backend))
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((server, backend, channel))
        return Served(engine=engine, port=port, channel=channel)

    yield start
    for server, backend, channel in started:
        channel.close()
        aio_loop.run(server.stop(0))
        aio_loop.run(backend.close())
