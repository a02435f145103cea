"""Domain errors -> gRPC status codes (xaiserve.gateway.status)."""

from __future__ import annotations

import logging
import re

import grpc
import pytest

from xaiserve.api.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    XaiError,
)
from xaiserve.gateway.status import to_status


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (
            InvalidArgument("methods[1].occlusion.window", "must be >= 1, got 0"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (NotFound("model_name", "no model 'x'"), grpc.StatusCode.NOT_FOUND),
        (ResourceExhausted("image.encoded", "too big"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (DeadlineExceeded(None, "late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (Unavailable(None, "backend down"), grpc.StatusCode.UNAVAILABLE),
        (XaiError("x", "generic"), grpc.StatusCode.INTERNAL),
    ],
)
def test_domain_errors_keep_their_message(error: XaiError, code: grpc.StatusCode) -> None:
    assert to_status(error) == (code, str(error))
    if error.field:
        assert to_status(error)[1].startswith(error.field + ": ")


def test_unknown_code_name_is_internal() -> None:
    class Odd(XaiError):
        code = "NOT_A_CODE"

    assert to_status(Odd("f", "m"))[0] == grpc.StatusCode.INTERNAL


def test_unexpected_errors_are_internal_and_logged_not_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    error = KeyError("secret /etc/passwd")
    try:
        raise error
    except KeyError:
        with caplog.at_level(logging.ERROR, logger="xaiserve.gateway.status"):
            code, message = to_status(error)
    assert code == grpc.StatusCode.INTERNAL
    match = re.fullmatch(r"internal error \(id ([0-9a-f]{12})\)", message)
    assert match, message
    assert "secret" not in message
    record = caplog.records[-1]
    assert match.group(1) in record.getMessage()
    assert record.exc_info is not None and record.exc_info[1] is error  # traceback server-side
