"""The thin ``ExplanationService`` servicer: convert, call the backend, convert back."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from xaiserve.api import catalog, convert
from xaiserve.api.errors import DeadlineExceeded
from xaiserve.api.types import ExplainResult
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.api.v1 import explain_pb2_grpc
from xaiserve.gateway import status
from xaiserve.gateway.backends import Backend
from xaiserve.gateway.metrics import Metrics

logger = logging.getLogger(__name__)

_LOGGED_METHODS = 16  # method names logged per call; longer lists are counted


class ExplanationServicer(explain_pb2_grpc.ExplanationServiceServicer):
    """``xaiserve.v1.ExplanationService`` over a :class:`~xaiserve.gateway.backends.Backend`.

    Deadlines: the client's deadline (or ``default_deadline_seconds`` when it sent none) is
    handed to the backend as a ``time.monotonic()`` time, and the call is abandoned with
    DEADLINE_EXCEEDED when it passes even if the backend is still working.

    Every call is recorded in ``metrics`` (a private registry when none is given).
    """

    def __init__(
        self,
        backend: Backend,
        default_deadline_seconds: float = 60.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._backend = backend
        self._default_deadline = default_deadline_seconds
        self._metrics = metrics if metrics is not None else Metrics()

    async def Explain(
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExplainResponse:
        """Predicts and explains one image (see the .proto)."""
        self._metrics.requests_in_flight.inc()
        try:
            return await self._explain(request, context)
        finally:
            self._metrics.requests_in_flight.dec()

    async def _explain(
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExplainResponse:
        start = time.monotonic()
        remaining = context.time_remaining()
        if remaining is None:
            remaining = self._default_deadline
        deadline = start + remaining
        try:
            plain = convert.request_from_proto(request)
            sent = time.monotonic()
            try:
                result = await asyncio.wait_for(
                    self._backend.explain(plain, deadline), timeout=max(remaining, 0.0)
                )
                backend_seconds = time.monotonic() - sent
            except TimeoutError:
                if time.monotonic() < deadline:
                    raise  # not our timer: an error from the backend, reported as internal
                raise DeadlineExceeded(None, f"deadline of {remaining:.3f} s exceeded") from None
            response = convert.response_to_proto(result, plain.want_array, plain.want_png)
        except asyncio.CancelledError:  # the client went away or its deadline passed
            late = time.monotonic() >= deadline
            code = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
            self._done(request, code, start)
            raise
        except Exception as error:
            code, message = status.to_status(error)
            self._done(request, code, start)
            await context.abort(code, message)
        self._done(request, grpc.StatusCode.OK, start, result, backend_seconds)
        return response

    def _done(
        self,
        request: pb.ExplainRequest,
        code: grpc.StatusCode,
        start: float,
        result: ExplainResult | None = None,
        backend_seconds: float | None = None,
    ) -> None:
        """Logs and records a finished call."""
        seconds = time.monotonic() - start
        _log_call(request, code, seconds)
        methods = {catalog.METHOD_NAMES.get(m.method, "other") for m in request.methods}
        self._metrics.observe_explain(
            request.model_name, methods, code.name, seconds, result, backend_seconds
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """Lists the served models (see the .proto)."""
        start = time.monotonic()
        try:
            models = await self._backend.list_models()
            response = convert.models_to_proto(models)
        except Exception as error:
            code, message = status.to_status(error)
            logger.info("ListModels status=%s seconds=%.3f", code.name, time.monotonic() - start)
            self._metrics.observe_rpc_error("ListModels", code.name)
            await context.abort(code, message)
        self._metrics.add_models(m.name for m in models)
        logger.debug("ListModels status=OK seconds=%.3f", time.monotonic() - start)
        return response


def _log_call(request: pb.ExplainRequest, code: grpc.StatusCode, seconds: float) -> None:
    """One line per call: model, methods, status, seconds (never the image)."""
    names = [catalog.method_enum_name(m.method) for m in request.methods[:_LOGGED_METHODS]]
    if len(request.methods) > _LOGGED_METHODS:
        names.append(f"...({len(request.methods)} in all)")
    methods = ",".join(names) or "-"
    logger.info(
        "Explain model=%s methods=%s status=%s seconds=%.3f",
        _printable(request.model_name) or "-",
        methods,
        code.name,
        seconds,
    )


def _printable(text: str, limit: int = 100) -> str:
    """``text`` for a log line: at most ``limit`` characters, control characters escaped."""
    text = text[:limit]
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
