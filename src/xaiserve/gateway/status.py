"""The one place that maps errors to gRPC status codes.

Domain errors (:class:`~xaiserve.api.errors.XaiError` subclasses) carry the name of
their gRPC code in ``.code`` and a client-safe message ``"field: message"``; they are sent
as they are, cut to ``MAX_MESSAGE_CHARS`` characters (a longer message would overflow the
gRPC trailer that carries it). Anything else is a bug: the client gets ``INTERNAL`` with a
generic message and an error id, and the stack trace is logged here, on the server, under
that id.
"""

from __future__ import annotations

import logging
import uuid

import grpc

from xaiserve.api.errors import XaiError, clip

logger = logging.getLogger(__name__)

#: gRPC code of each domain error code name (``XaiError.code``).
CODES: dict[str, grpc.StatusCode] = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "UNIMPLEMENTED": grpc.StatusCode.UNIMPLEMENTED,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}


def to_status(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and client-facing message for ``error``.

    Domain errors keep their message (it names the field), cut to ``MAX_MESSAGE_CHARS``.
    Other exceptions are logged with their traceback and answered with ``"internal error
    (id <id>)"``; the id lets an operator find the log line, and nothing of the exception
    reaches the client.
    """
    if isinstance(error, XaiError):
        code = CODES.get(error.code)
        if code is None:
            logger.error("domain error with unknown code %r: %s", error.code, error)
            code = grpc.StatusCode.INTERNAL
        return code, clip(str(error))
    error_id = uuid.uuid4().hex[:12]
    logger.error("internal error (id %s): %s", error_id, type(error).__name__, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error (id {error_id})"
