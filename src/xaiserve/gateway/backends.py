"""Backends: where the gateway sends a converted request.

The servicer only knows the small :class:`Backend` protocol. :class:`LocalBackend` runs the
engine in-process (the embedded default);
:class:`~xaiserve.gateway.torchserve_backend.TorchServeBackend` implements the same four
methods over TorchServe's gRPC inference API. How many calls reach a backend at once is
limited in front of both, by the gateway (``xaiserve.gateway.admission``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

from xaiserve.api.errors import Unavailable
from xaiserve.api.types import ExplainRequest, ExplainResult, ModelInfo

logger = logging.getLogger(__name__)


@runtime_checkable
class Backend(Protocol):
    """What the servicer calls. Implementations raise ``XaiError`` subclasses."""

    async def explain(self, request: ExplainRequest, deadline: float | None) -> ExplainResult:
        """Answers one request; ``deadline`` is a ``time.monotonic()`` time or ``None``."""
        ...

    async def list_models(self) -> list[ModelInfo]:
        """The models being served."""
        ...

    async def ready(self) -> bool:
        """Whether requests can be answered now (drives the health status)."""
        ...

    async def close(self) -> None:
        """Releases resources; no call is made afterwards."""
        ...


class EngineLike(Protocol):
    """The two methods of ``xaiserve.engine.engine.Engine`` the local backend uses."""

    def explain(self, request: ExplainRequest, deadline: float | None = None) -> ExplainResult:
        """Blocking; raises ``XaiError`` subclasses."""
        ...

    def list_models(self) -> list[ModelInfo]:
        """The loaded models."""
        ...


class LocalBackend:
    """The engine in this process, called from a thread pool of ``workers`` threads.

    Calls beyond ``workers`` wait for a thread; how many may wait is bounded by the
    gateway's in-flight limit, in front of every backend. A call abandoned while it waits
    (deadline, cancellation) is dropped from the pool's queue; one abandoned while it runs
    keeps its thread until the engine notices the deadline it was given.
    """

    def __init__(self, engine: EngineLike, workers: int = 32) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._engine = engine
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xaiserve-engine")
        self._closed = False

    async def explain(self, request: ExplainRequest, deadline: float | None) -> ExplainResult:
        """Runs ``engine.explain(request, deadline)`` on a pool thread."""
        if self._closed:
            raise Unavailable(None, "server is shutting down")
        call = functools.partial(self._engine.explain, request, deadline)
        try:
            future = self._pool.submit(call)
        except RuntimeError:  # the pool was shut down
            raise Unavailable(None, "server is shutting down") from None
        # cancelling the awaiting task cancels the pool's future while it is still queued
        return await asyncio.wrap_future(future)

    async def list_models(self) -> list[ModelInfo]:
        """The engine's models (in-memory metadata, answered without the pool)."""
        return list(self._engine.list_models())

    async def ready(self) -> bool:
        """True until :meth:`close`: the engine is loaded before the backend is built."""
        return not self._closed

    async def close(self) -> None:
        """Stops taking work; queued calls are cancelled, running ones finish on their own."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
