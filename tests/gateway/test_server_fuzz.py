"""Fuzzed calls through a real in-process gateway over the real engine (tiny model).

Each example sends 1-3 ExplainRequests with arbitrary field values (model names from
"tiny" to 20,000-character unicode strings, valid, random and mutated images, tensors whose
shape and data disagree, methods with arbitrary parameters, reliability and filter options)
and then a valid call. Every fuzzed call gets the status the engine itself gives the same
request (OK or the code of its domain error: never UNKNOWN or INTERNAL, and never another
code made on the way, such as gRPC's own limit on the size of an error message), and the
valid call after them is answered OK. Deterministic: derandomized, bounded example counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from support.fuzz import fuzz_settings, image_bytes, messages, method_requests, strings, tensors
from support.gateway import tiny_png
from support.servers import start_server
from support.service_fakes import LoopThread
from support.tiny_models import write_tiny_model_dir
from xaiserve.api import convert
from xaiserve.api.errors import XaiError
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.api.v1 import explain_pb2_grpc
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.gateway.backends import LocalBackend
from xaiserve.gateway.settings import Settings
from xaiserve.runtime.model import load_model_dir

# A small forward-pass limit keeps every accepted call short on the tiny model.
LIMITS = EngineLimits(max_forward_passes=4096)
CALL_TIMEOUT_S = 120
#: Codes a client may be answered with here; a domain error has one of the first four.
CLIENT_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@dataclass
class Served:
    engine: Engine
    stub: explain_pb2_grpc.ExplanationServiceStub


@pytest.fixture(scope="module")
def served(aio_loop: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The gateway (local backend, port 0) over the engine of the tiny model."""
    model_dir = write_tiny_model_dir(tmp_path_factory.mktemp("fuzz") / "tiny")
    engine = Engine({"tiny": load_model_dir(model_dir)}, LIMITS)
    backend = LocalBackend(engine, workers=1)
    server, port = aio_loop.run(start_server(Settings(port=0, metrics_port=0), backend))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield Served(engine, explain_pb2_grpc.ExplanationServiceStub(channel))
    channel.close()
    aio_loop.run(server.stop(0))
    aio_loop.run(backend.close())


def _tensor_image() -> pb.Image:
    pixels = np.linspace(0.0, 1.0, 3 * 16 * 16, dtype="<f4").reshape(3, 16, 16)
    return pb.Image(tensor=pb.Tensor(shape=[3, 16, 16], data=pixels.tobytes()))


def _pick(*strategies: st.SearchStrategy) -> st.SearchStrategy:
    """One of ``strategies``, each as likely (``a | b`` favours some branches)."""
    return st.sampled_from(strategies).flatmap(lambda strategy: strategy)


def _named(message: pb.ExplainRequest, model: str) -> pb.ExplainRequest:
    message.model_name = model
    return message


VALID_IMAGES = st.sampled_from([pb.Image(encoded=tiny_png(1)), _tensor_image()])
IMAGES = _pick(
    VALID_IMAGES,
    VALID_IMAGES,
    st.builds(pb.Image, encoded=image_bytes()),
    st.builds(pb.Image, tensor=tensors()),
)
#: Methods the tiny model runs (the S-CAM methods need a calibration it does not have).
TINY_METHODS = tuple(
    n for n in pb.Method.keys() if n != "METHOD_UNSPECIFIED" and not n.startswith("S_")
)
#: Anything in any field.
ARBITRARY = messages(
    pb.ExplainRequest.DESCRIPTOR,
    huge_chars=20_000,
    overrides={
        "model_name": _pick(st.just("tiny"), strings(20_000)),
        "model_version": _pick(st.just(""), st.just("1"), strings(20_000)),
        "image": IMAGES,
        "methods": st.lists(method_requests(), max_size=3),
    },
    always=("model_name", "image"),
)
#: The served model, a valid image, defined enums and targets in range, so the calls get
#: to the methods (whose parameters and options are still arbitrary).
PLAUSIBLE = messages(
    pb.ExplainRequest.DESCRIPTOR,
    overrides={
        "model_version": st.sampled_from(("", "1")),
        "image": VALID_IMAGES,
        "target": st.integers(0, 2),
        "top_k": st.integers(1, 3),
        "map_encoding": st.sampled_from(list(pb.MapEncoding.values())),
        "forward_backend": st.sampled_from(list(pb.ForwardBackend.values())),
        "methods": st.lists(method_requests(TINY_METHODS), min_size=1, max_size=3),
    },
    always=("model_name", "image", "methods"),
).map(lambda message: _named(message, "tiny"))
REQUESTS = _pick(ARBITRARY, PLAUSIBLE)
VALID = pb.ExplainRequest(
    model_name="tiny",
    image=pb.Image(encoded=tiny_png(2)),
    methods=[pb.MethodRequest(method=pb.SALIENCY), pb.MethodRequest(method=pb.GRAD_CAM)],
)


def _engine_code(engine: Engine, request: pb.ExplainRequest) -> grpc.StatusCode:
    """What the engine itself makes of ``request``: OK or its domain error's code."""
    try:
        engine.explain(convert.request_from_proto(request))
    except XaiError as error:
        return grpc.StatusCode[error.code]
    return grpc.StatusCode.OK


def _gateway_code(served: Served, request: pb.ExplainRequest) -> tuple[grpc.StatusCode, str]:
    try:
        served.stub.Explain(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@fuzz_settings(max_examples=60)
@given(batch=st.lists(REQUESTS, min_size=1, max_size=3))
def test_fuzzed_calls_get_the_engines_code_and_a_valid_call_after_them_is_ok(
    served: Served, batch: list[pb.ExplainRequest]
) -> None:
    for request in batch:
        code, details = _gateway_code(served, request)
        assert code in CLIENT_CODES, (code, details[:200])
        assert code == _engine_code(served.engine, request), (code, details[:200])
        if code != grpc.StatusCode.OK:
            assert details and not details.startswith("internal error"), details[:200]
    answer = served.stub.Explain(VALID, timeout=CALL_TIMEOUT_S)
    assert [e.method for e in answer.explanations] == [pb.SALIENCY, pb.GRAD_CAM]
    assert answer.prediction.target.label in ("a", "b", "c")
