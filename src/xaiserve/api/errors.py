"""Domain errors of the engine.

Each error names the request field it is about; the gateway maps the class to a gRPC status
code in one place (``xaiserve.gateway.status``) and the TorchServe handler to an error body.
Validation raises these, never ``assert``.

A message travels to the client in a gRPC trailer (``grpc-message``), whose size gRPC caps
(a trailer over the limit turns the answer into RESOURCE_EXHAUSTED "metadata size exceeds
hard limit"). So every message is at most :data:`MAX_MESSAGE_CHARS` characters (the
constructor cuts it), and a value the client sent (a model name, a version, a label) is
quoted with :func:`quote`, which keeps :data:`MAX_QUOTED_CHARS` of it.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Longest message a client is sent; longer ones are cut, ending in :data:`ELLIPSIS`.
MAX_MESSAGE_CHARS = 512
#: Characters of a client-supplied value that :func:`quote` keeps.
MAX_QUOTED_CHARS = 64
#: Names :func:`listing` spells out before counting the rest.
MAX_LISTED = 8
ELLIPSIS = "..."


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` if it has at most ``limit`` characters, else its start and an ellipsis
    (``limit`` characters in all)."""
    if len(text) <= limit:
        return text
    return text[: limit - len(ELLIPSIS)] + ELLIPSIS


def quote(value: object, limit: int = MAX_QUOTED_CHARS) -> str:
    """``value`` quoted for a message, as ``repr`` does (control characters escaped); past
    ``limit`` characters, its start, an ellipsis and its length: ``'mmm...'... (16500
    characters)``."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}{ELLIPSIS} ({len(text)} characters)"


def listing(names: Iterable[str], limit: int = MAX_LISTED) -> str:
    """Sorted ``names``, comma-separated: the first ``limit`` (each cut by :func:`clip` to
    :data:`MAX_QUOTED_CHARS`), then ``(and N more)``; ``none`` when there are none."""
    ordered = sorted(names)
    if not ordered:
        return "none"
    shown = ", ".join(clip(name, MAX_QUOTED_CHARS) for name in ordered[:limit])
    rest = len(ordered) - limit
    return f"{shown} (and {rest} more)" if rest > 0 else shown


class XaiError(Exception):
    """Base of all errors a client may see. ``str(err)`` is ``"field: message"``, cut to
    :data:`MAX_MESSAGE_CHARS` characters."""

    code = "INTERNAL"

    def __init__(self, field: str | None, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(clip(f"{field}: {message}" if field else message))


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


class FailedPrecondition(XaiError):
    """The request is well formed but the server is not in a state to answer it (the
    named model's directory failed to load; the message says why)."""

    code = "FAILED_PRECONDITION"


class Unavailable(XaiError):
    """A backend the request needs is not reachable right now."""

    code = "UNAVAILABLE"


class ModelLoadError(Exception):
    """A model directory could not be loaded (server start-up, not a client error)."""
