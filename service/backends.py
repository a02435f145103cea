"""Backends: where the gateway sends a converted request.

The servicer only knows the small :class:`Backend` protocol. :class:`LocalBackend` runs the
engine in-process (the embedded default); a TorchServe backend will implement the same four
methods over TorchServe's gRPC inference API.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

from xaiserve.handlers.errors import ResourceExhausted, Unavailable
from xaiserve.handlers.types import ExplainRequest, ExplainResult, ModelInfo

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
    """The two methods of ``xaiserve.handlers.engine.Engine`` the local backend uses."""

    def explain(self, request: ExplainRequest, deadline: float | None = None) -> ExplainResult:
        """Blocking; raises ``XaiError`` subclasses."""
        ...

    def list_models(self) -> list[ModelInfo]:
        """The loaded models."""
        ...


class LocalBackend:
    """The engine in this process, called from a bounded thread pool.

    ``workers`` requests run at once; up to ``max_queue`` more wait for a worker, and a
    request beyond that is refused with RESOURCE_EXHAUSTED rather than queued without bound.
    When a caller gives up (deadline, cancellation) the engine call keeps its thread until
    the engine itself notices the deadline it was given.
    """

    def __init__(self, engine: EngineLike, workers: int = 2, max_queue: int = 64) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self._engine = engine
        self._capacity = workers + max_queue
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xaiserve-engine")
        self._lock = threading.Lock()
        self._in_flight = 0  # submitted to the pool and not finished, abandoned ones included
        self._closed = False

    async def explain(self, request: ExplainRequest, deadline: float | None) -> ExplainResult:
        """Runs ``engine.explain(request, deadline)`` on a pool thread."""
        if self._closed:
            raise Unavailable(None, "server is shutting down")
        with self._lock:
            if self._in_flight >= self._capacity:
                raise ResourceExhausted(
                    None, f"server at capacity ({self._in_flight} requests in progress)"
                )
            self._in_flight += 1
        call = functools.partial(self._engine.explain, request, deadline)
        try:
            future = self._pool.submit(call)
        except RuntimeError:  # pool shut down between the check and the submit
            self._release()
            raise Unavailable(None, "server is shutting down") from None
        future.add_done_callback(lambda _: self._release())
        return await asyncio.wrap_future(future)

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

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
