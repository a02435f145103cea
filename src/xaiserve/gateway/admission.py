"""Admission of calls: the in-flight limit, and the count of calls gRPC refuses itself.

A call of a limited service that arrives while ``limit`` calls are in flight is refused at
once with RESOURCE_EXHAUSTED ("retry later"), instead of waiting in an unbounded queue; the
calls already admitted are not affected. The count is kept on the server's event loop, so
it needs no lock.

A request message over the server's ``grpc.max_receive_message_length`` is refused by
gRPC's core (RESOURCE_EXHAUSTED, "Received message larger than max") before any unary
handler runs; :class:`ReceiveRefusals` makes those refusals visible, so they are counted.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
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


def unary_of(
    handler: grpc.RpcMethodHandler | None, full_method: str, services: frozenset[str]
) -> tuple[Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], str] | None:
    """(the unary behaviour, the rpc name) of ``handler`` when it serves a unary method of
    one of ``services``; None for every other handler (passed on unchanged)."""
    service, rpc = split_method(full_method)
    if handler is None or service not in services or handler.unary_unary is None:
        return None
    return handler.unary_unary, rpc


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
        unary = unary_of(handler, handler_call_details.method, self._services)
        if handler is None or unary is None:
            return handler
        inner, rpc = unary

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


class ReceiveRefusals(grpc.aio.ServerInterceptor):
    """Reports the unary calls of ``services`` whose request message gRPC refused to read.

    gRPC's core reads a unary call's message before the handler starts, and when it refuses
    the message (over the size limit) no handler, and so no interceptor's wrapper, ever
    runs. This interceptor serves those methods as request-streaming ones instead (the wire
    format is the same): the handler starts first and reads the one message itself. A call
    that yields no message and was not cancelled was refused by the core, and is reported
    to ``on_reject`` as RESOURCE_EXHAUSTED, the code the client got from the core. Other
    calls go on to the unary handler (and the interceptors inside this one) unchanged.

    It must be the outermost interceptor: the ones inside it then refuse a call only after
    its message was read, so a call is reported once, under the code the client sees.
    """

    def __init__(self, services: Collection[str], on_reject: RejectHook) -> None:
        self._services = frozenset(services)
        self._on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        unary = unary_of(handler, handler_call_details.method, self._services)
        if handler is None or unary is None:
            return handler
        inner, rpc = unary

        async def read_then_call(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> Any:
            # context.read(), not `async for` over ``requests``: returning from inside that
            # loop leaves gRPC's receiving async generator suspended at its yield, holding
            # the message and the call's context in a reference cycle that only a full
            # garbage collection frees (docs/operations.md#memory).
            request = await context.read()
            if request is not grpc.aio.EOF:
                return await inner(request, context)
            if not context.cancelled():
                self._on_reject(rpc, grpc.StatusCode.RESOURCE_EXHAUSTED.name)
                logger.info("refused %s: gRPC did not accept its request message", rpc)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "no request message within the size limit"
            )

        return grpc.stream_unary_rpc_method_handler(
            read_then_call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
