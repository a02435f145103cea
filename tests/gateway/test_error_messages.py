"""Error messages fit in a gRPC trailer: at most ``MAX_MESSAGE_CHARS`` characters, with
client-supplied values quoted short; a 16 KB model name is NOT_FOUND, not a trailer overflow."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from support.gateway import Gateway, running_gateway, tiny_png
from xaiserve.api import worker_protocol
from xaiserve.api.errors import (
    MAX_MESSAGE_CHARS,
    MAX_QUOTED_CHARS,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    XaiError,
    clip,
    listing,
    quote,
)
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.api.v1 import explain_pb2_grpc
from xaiserve.gateway.status import to_status

TIMEOUT = 60
MAX_MESSAGE_BYTES = 1024 * 1024
LONG = "m" * 16_500  # over gRPC's 16 KiB hard limit on metadata, once in a message


def test_quote_cuts_long_values_with_an_ellipsis_and_says_how_long() -> None:
    assert quote("demo") == "'demo'"
    assert quote("a\nb") == "'a\\nb'"  # control characters escaped
    long = quote(LONG)
    assert long.startswith("'" + "m" * MAX_QUOTED_CHARS + "'...")
    assert "16500 characters" in long and len(long) < MAX_QUOTED_CHARS + 40


def test_clip_keeps_short_messages_and_cuts_long_ones() -> None:
    assert clip("short") == "short"
    assert clip("x" * MAX_MESSAGE_CHARS) == "x" * MAX_MESSAGE_CHARS
    cut = clip("x" * (MAX_MESSAGE_CHARS + 1))
    assert len(cut) == MAX_MESSAGE_CHARS and cut.endswith("...")


def test_listing_names_a_few_and_counts_the_rest() -> None:
    assert listing(["b", "a"]) == "a, b"
    names = [f"model-{i:03d}" for i in range(50)]
    text = listing(names)
    assert text.startswith("model-000, model-001") and text.endswith("(and 42 more)")
    assert listing([]) == "none"


#: Every kind of error a client can get, with a message far over the cap.
CASES = [
    InvalidArgument("methods[0].method", "x" * 5000),
    NotFound("model_name", f"model {LONG!r} is not served"),
    ResourceExhausted("image.encoded", "y" * 20_000),
    DeadlineExceeded(None, "z" * 1000),
    Unavailable(None, "TorchServe says " + "w" * 3000),
    XaiError("f" * 2000, "generic"),
    worker_protocol.WorkerError("INTERNAL", "v" * 4000),
]


@pytest.mark.parametrize("error", CASES, ids=lambda e: type(e).__name__)
def test_every_domain_error_reaches_the_client_clipped(error: XaiError) -> None:
    code, message = to_status(error)
    assert code.name == error.code
    assert len(message) <= MAX_MESSAGE_CHARS
    assert message.endswith("...")
    if error.field and len(error.field) < 100:
        assert message.startswith(error.field + ": ")  # still names the field


def test_status_clips_a_message_that_bypasses_the_constructor() -> None:
    class Verbose(XaiError):
        code = "INVALID_ARGUMENT"

        def __str__(self) -> str:
            return "field: " + "q" * 10_000

    code, message = to_status(Verbose("field", "short"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(message) == MAX_MESSAGE_CHARS


def test_worker_error_answers_are_clipped_both_ways() -> None:
    answer = worker_protocol.encode_error("NOT_FOUND", "n" * 10_000)
    assert len(answer) < MAX_MESSAGE_CHARS + 64
    forged = b"\x00" + b'{"code": "INVALID_ARGUMENT", "message": "' + b"p" * 9000 + b'"}'
    with pytest.raises(InvalidArgument) as caught:
        worker_protocol.decode_answer(forged)
    assert len(str(caught.value)) <= MAX_MESSAGE_CHARS


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    args = ("--max-message-bytes", str(MAX_MESSAGE_BYTES))
    with running_gateway(tmp_path_factory.mktemp("models"), args) as running:
        yield running


def _explain(gateway: Gateway, request: pb.ExplainRequest) -> pb.ExplainResponse:
    with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        return explain_pb2_grpc.ExplanationServiceStub(channel).Explain(request, timeout=TIMEOUT)


def _refusal(gateway: Gateway, request: pb.ExplainRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _explain(gateway, request)
    return caught.value


@pytest.mark.parametrize(
    ("fields", "code", "start"),
    [
        ({"model_name": LONG}, grpc.StatusCode.NOT_FOUND, "model_name: model 'mmm"),
        (
            {"model_name": "tiny", "model_version": LONG},
            grpc.StatusCode.NOT_FOUND,
            "model_version: model 'tiny' version 'mmm",
        ),
        ({"model_name": "é" * 9000}, grpc.StatusCode.NOT_FOUND, "model_name: model 'ééé"),
    ],
    ids=["model_name", "model_version", "non_ascii_name"],
)
def test_a_huge_name_is_not_found_in_a_short_message_through_the_real_server(
    gateway: Gateway, fields: dict[str, str], code: grpc.StatusCode, start: str
) -> None:
    request = pb.ExplainRequest(
        image=pb.Image(encoded=tiny_png()),
        methods=[pb.MethodRequest(method=pb.SALIENCY)],
        **fields,
    )
    error = _refusal(gateway, request)
    assert error.code() == code, error.details()
    details = error.details()
    assert len(details) <= MAX_MESSAGE_CHARS
    assert details.startswith(start) and "characters)" in details
    assert "served: tiny" in details or "serving version" in details
    # the server still answers a valid call
    answer = _explain(
        gateway,
        pb.ExplainRequest(
            model_name="tiny",
            image=pb.Image(encoded=tiny_png()),
            methods=[pb.MethodRequest(method=pb.SALIENCY)],
        ),
    )
    assert answer.model_name == "tiny" and len(answer.explanations) == 1


def _errors(gateway: Gateway) -> dict[tuple[str, str], float]:
    """``xaiserve_request_errors_total`` of a scrape, by (rpc, code)."""
    return {
        (s.labels["rpc"], s.labels["code"]): s.value
        for s in gateway.samples()
        if s.name == "xaiserve_request_errors_total"
    }


def test_a_message_over_the_size_limit_is_refused_and_counted(gateway: Gateway) -> None:
    before = _errors(gateway)
    image = pb.Image(encoded=b"x" * (2 * MAX_MESSAGE_BYTES))
    big = pb.ExplainRequest(model_name="tiny", image=image)
    error = _refusal(gateway, big)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = _errors(gateway)
    key = ("Explain", "RESOURCE_EXHAUSTED")
    assert after.get(key, 0) == before.get(key, 0) + 1
    assert sum(after.values()) == sum(before.values()) + 1  # counted once, under that code
