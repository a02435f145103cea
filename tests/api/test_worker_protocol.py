"""The wire format between the gateway and the TorchServe handler."""

from __future__ import annotations

import time

import pytest

from xaiserve.api import worker_protocol as wp
from xaiserve.api.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from xaiserve.api.v1 import explain_pb2 as pb


def test_success_answers_are_the_api_messages_unchanged() -> None:
    message = pb.ExplainResponse(model_name="demo", model_version="1").SerializeToString()
    assert wp.decode_answer(message) == message
    assert not message.startswith(wp.ERROR_MARKER)


@pytest.mark.parametrize(
    "error", [InvalidArgument, NotFound, ResourceExhausted, DeadlineExceeded, Unavailable]
)
def test_error_answers_decode_to_the_same_domain_error(error: type) -> None:
    answer = wp.encode_error(error.code, "model_name: model 'x' is not served")
    with pytest.raises(error) as caught:
        wp.decode_answer(answer)
    assert str(caught.value) == "model_name: model 'x' is not served"


def test_other_codes_and_garbage_decode_to_worker_errors() -> None:
    with pytest.raises(wp.WorkerError) as caught:
        wp.decode_answer(wp.encode_error("INTERNAL", "internal error (id 1)"))
    assert caught.value.code == "INTERNAL" and str(caught.value) == "internal error (id 1)"
    with pytest.raises(wp.WorkerError, match="malformed error answer"):
        wp.decode_answer(b"\x00not json")


def test_inputs_carry_command_body_and_deadline() -> None:
    inputs = wp.explain_inputs(b"body", 1767225600.125)
    assert inputs == {"command": b"explain", "body": b"body", "deadline": b"1767225600.125"}
    assert wp.command_of(inputs) == "explain" and wp.body_of(inputs) == b"body"
    assert wp.command_of({}) == "explain"
    assert "deadline" not in wp.explain_inputs(b"body", None)
    assert wp.command_of(wp.list_models_inputs()) == "list_models"


def test_deadline_becomes_a_local_monotonic_time() -> None:
    now = time.time()
    before = time.monotonic()
    local = wp.deadline_of({"deadline": repr(now + 5.0).encode()}, now_unix=now)
    assert before + 5.0 <= local <= time.monotonic() + 5.0
    assert wp.deadline_of({}) is None
    for bad in (b"nan", b"inf", b"tomorrow"):
        with pytest.raises(InvalidArgument, match="deadline"):
            wp.deadline_of({"deadline": bad})
