"""The gateway's gRPC server started in-process, for tests over a chosen backend."""

from __future__ import annotations

import grpc

from xaiserve.gateway.backends import Backend
from xaiserve.gateway.server import start
from xaiserve.gateway.settings import Settings


async def start_server(settings: Settings, backend: Backend) -> tuple[grpc.aio.Server, int]:
    """Starts a server over ``backend`` (``xaiserve.gateway.server.start``); returns it and
    its bound port (``settings.port`` 0: a free one)."""
    running = await start(settings, backend)
    return running.server, running.port
