"""What travels between the gateway's TorchServe backend and the TorchServe handler.

Both sides import this module; it imports neither TorchServe, gRPC nor torch.

A request is one ``PredictionsRequest.input`` map (names to bytes)::

    "command"   b"explain" (also when absent) or b"list_models"
    "body"      a serialized ``xaiserve.v1.ExplainRequest`` (explain)
    "deadline"  the caller's deadline as Unix time in seconds, ASCII ("1767225600.125");
                absent when the caller has none

The answer is one ``PredictionResponse.prediction``:

- success: the serialized ``xaiserve.v1.ExplainResponse`` (explain) or
  ``xaiserve.v1.ListModelsResponse`` (list_models), exactly as the public API defines them;
- error: a zero byte, then UTF-8 JSON ``{"code": "NOT_FOUND", "message": "model_name: ..."}``
  with the name of the gRPC code and the client-facing message. No serialized protobuf
  message starts with a zero byte (it would be the tag of field number 0, which is
  invalid), so the first byte tells the two apart.

The deadline is wall-clock time because the gateway and the worker are different processes
(possibly different hosts, with synchronized clocks); the worker turns it back into its own
``time.monotonic()`` deadline on arrival, so time spent queued in TorchServe counts.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping

from xaiserve.api.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    XaiError,
    clip,
)

COMMAND = "command"
BODY = "body"
DEADLINE = "deadline"
EXPLAIN = "explain"
LIST_MODELS = "list_models"
COMMANDS = (EXPLAIN, LIST_MODELS)

ERROR_MARKER = b"\x00"

#: Domain error classes by the gRPC code name they carry; other codes decode to XaiError.
_ERRORS: dict[str, type[XaiError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        DeadlineExceeded,
        Unavailable,
        FailedPrecondition,
    )
}


class WorkerError(XaiError):
    """An error answered by the handler, with the code it sent (e.g. ``"INTERNAL"``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(None, message)
        self.code = code


def explain_inputs(request: bytes, deadline_unix: float | None) -> dict[str, bytes]:
    """The input map of one Explain: the serialized request and the caller's deadline."""
    inputs = {COMMAND: EXPLAIN.encode(), BODY: request}
    if deadline_unix is not None:
        inputs[DEADLINE] = repr(float(deadline_unix)).encode("ascii")
    return inputs


def list_models_inputs() -> dict[str, bytes]:
    """The input map that asks the handler for its model's ``ListModelsResponse``."""
    return {COMMAND: LIST_MODELS.encode()}


def encode_error(code: str, message: str) -> bytes:
    """The error answer: the zero byte, then ``{"code": ..., "message": ...}`` as JSON (the
    message cut to ``MAX_MESSAGE_CHARS``)."""
    body = {"code": clip(code, 40), "message": clip(message)}
    return ERROR_MARKER + json.dumps(body).encode("utf-8")


def decode_answer(answer: bytes) -> bytes:
    """The serialized success message of an answer.

    Raises:
        XaiError: the handler answered an error; the subclass carries its code
            (NotFound, InvalidArgument, ...; :class:`WorkerError` for other codes).
    """
    if not answer.startswith(ERROR_MARKER):
        return answer
    try:
        error = json.loads(answer[1:].decode("utf-8"))
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        raise WorkerError("INTERNAL", "malformed error answer from the TorchServe worker") from None
    cls = _ERRORS.get(code)
    if cls is None:
        raise WorkerError(code, message)
    raise cls(None, message)


def _text(value: bytes | bytearray | str) -> str:
    if isinstance(value, str):
        return value
    return bytes(value).decode("ascii", errors="replace")


def command_of(inputs: Mapping[str, bytes | bytearray | str]) -> str:
    """The request's command (``explain`` when absent).

    Raises:
        InvalidArgument: an unknown command.
    """
    if COMMAND not in inputs:
        return EXPLAIN
    command = _text(inputs[COMMAND]).strip()
    if command not in COMMANDS:
        raise InvalidArgument(COMMAND, f"unknown command {command[:40]!r}")
    return command


def body_of(inputs: Mapping[str, bytes | bytearray | str]) -> bytes:
    """The serialized ``ExplainRequest``.

    Raises:
        InvalidArgument: no body.
    """
    body = inputs.get(BODY)
    if body is None or isinstance(body, str):
        raise InvalidArgument(BODY, "required: a serialized xaiserve.v1.ExplainRequest")
    return bytes(body)


def deadline_of(
    inputs: Mapping[str, bytes | bytearray | str], now_unix: float | None = None
) -> float | None:
    """The caller's deadline as a ``time.monotonic()`` time of this process, or None.

    Raises:
        InvalidArgument: the deadline is not a finite number.
    """
    if DEADLINE not in inputs:
        return None
    try:
        deadline_unix = float(_text(inputs[DEADLINE]))
    except ValueError:
        deadline_unix = math.nan
    if not math.isfinite(deadline_unix):
        raise InvalidArgument(DEADLINE, "must be Unix time in seconds")
    now_unix = time.time() if now_unix is None else now_unix
    return time.monotonic() + (deadline_unix - now_unix)
