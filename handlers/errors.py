"""Domain errors of the engine.

Each error names the request field it is about; the gateway maps the class to a gRPC status
code in one place (``xaiserve.service.status``) and the TorchServe handler to an error body.
Validation raises these, never ``assert``.
"""

from __future__ import annotations


class XaiError(Exception):
    """Base of all errors a client may see. ``str(err)`` is ``"field: message"``."""

    code = "INTERNAL"

    def __init__(self, field: str | None, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


class InvalidArgument(XaiError):
    """The request is malformed or a value is out of range."""

    code = "INVALID_ARGUMENT"


class NotFound(XaiError):
    """The named model (or version) is not served."""

    code = "NOT_FOUND"


class ResourceExhausted(XaiError):
    """A configured limit (size, pixels, methods, forward passes, capacity) was exceeded."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(XaiError):
    """The caller's deadline passed before the work finished."""

    code = "DEADLINE_EXCEEDED"


class Unavailable(XaiError):
    """A backend the request needs is not reachable right now."""

    code = "UNAVAILABLE"


class ModelLoadError(Exception):
    """A model directory could not be loaded (server start-up, not a client error)."""
