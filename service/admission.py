"""The gateway's in-flight limit: one bound on concurrent calls, in front of every backend.

A call of a limited service that arrives while ``limit`` calls are in flight is refused at
once with RESOURCE_EXHAUSTED ("retry later"), instead of waiting in an unbounded queue; the
calls already admitted are not affected. The count is kept on the server's event loop, so
it needs no lock.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import grpc

logger = logging.getLogger(__name__)

#: Called with (rpc name, status code name) for each refused call.
RejectHook = Callable[[str, str], None]


def split_method(full_method: str) -> tuple[str, str]:
    """``"/pkg.Service/Method"`` -> ``("pkg.Service", "Method")``."""
    _, _, rest = full_method.partition("/")
    service, _, method = rest.partition("/")
    return service, method


class InFlightLimit(grpc.aio.ServerInterceptor):
    """Admits at most ``limit`` unary calls of ``services`` at once.

    on_reject: told of each refused call (for metrics).
    """

    def __init__(
        self, limit: int, services: Collection[str], on_reject: RejectHook | None = None
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._services = frozenset(services)
        self._on_reject = on_reject
        self.in_flight = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service, rpc = split_method(handler_call_details.method)
        if handler is None or service not in self._services or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self.in_flight >= self.limit:
                if self._on_reject is not None:
                    self._on_reject(rpc, grpc.StatusCode.RESOURCE_EXHAUSTED.name)
                logger.info("refused %s: %d calls in flight", rpc, self.in_flight)
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server at capacity ({self.limit} calls in flight); retry later",
                )
            self.in_flight += 1
            try:
                return await inner(request, context)
            finally:
                self.in_flight -= 1

        return grpc.unary_unary_rpc_method_handler(
            admitted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
