"""16 concurrent clients x 25 requests with mixed methods, targets and images through the
torchserve backend: every answer is the right one, and TorchServe formed batches > 1
(read back from the handler's XaiserveBatches metric on TorchServe's Prometheus endpoint,
and from its log lines)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from support.demo_images import demo_png, demo_tensor
from support.gateway import open_channel
from xaiserve.api import convert
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.api.v1 import explain_pb2_grpc
from xaiserve.engine.engine import Engine
from xaiserve.gateway.client import map_to_array

pytestmark = pytest.mark.torchserve

CLIENTS = 16
PER_CLIENT = 25
METHOD_SETS = (
    (pb.MethodRequest(method=pb.SALIENCY),),
    (pb.MethodRequest(method=pb.GRAD_CAM),),
    (pb.MethodRequest(method=pb.OCCLUSION, occlusion=pb.OcclusionParams(window=32, stride=32)),),
    (
        pb.MethodRequest(method=pb.INPUT_X_GRADIENT, stage=pb.RAW),
        pb.MethodRequest(method=pb.GRAD_CAM),
    ),
)


def _distinct_requests() -> list[pb.ExplainRequest]:
    """4 images (PNGs of 3 sizes, one tensor) x 4 method sets = 16 requests, with targets
    (the predicted class, 0, 1 or 2) mixed among them."""
    images = [
        pb.Image(encoded=demo_png(0)),
        pb.Image(encoded=demo_png(1, size=48)),
        pb.Image(encoded=demo_png(2, size=96)),
        demo_tensor(3),
    ]
    requests = []
    for number, (image, methods) in enumerate(itertools.product(images, METHOD_SETS)):
        request = pb.ExplainRequest(model_name="demo", image=image, methods=list(methods))
        target = (None, 0, 1, 2)[(number // 4 + number % 4) % 4]  # each set gets each
        if target is not None:
            request.target = target
        requests.append(request)
    return requests


def test_concurrent_mixed_requests_are_answered_correctly_in_batches(
    torchserve, start_gateway: Callable, demo_engine: Engine
) -> None:
    requests = _distinct_requests()
    expected = []
    for request in requests:  # the engine's own answer to each, computed here
        plain = convert.request_from_proto(request)
        expected.append(convert.response_to_proto(demo_engine.explain(plain), True, False))
    gateway = start_gateway(torchserve.backend())  # asks the handlers for ListModels
    before = torchserve.batch_sizes()

    def client(number: int) -> list[tuple[int, pb.ExplainResponse]]:
        with open_channel(gateway.target) as channel:
            stub = explain_pb2_grpc.ExplanationServiceStub(channel)
            answers = []
            for i in range(PER_CLIENT):
                index = (number * PER_CLIENT + i * 7) % len(requests)
                answers.append((index, stub.Explain(requests[index], timeout=120)))
            return answers

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [a for answers in pool.map(client, range(CLIENTS)) for a in answers]

    assert len(results) == CLIENTS * PER_CLIENT
    for index, answer in results:
        want = expected[index]
        assert answer.prediction == want.prediction, f"request {index}"
        if requests[index].HasField("target"):
            assert answer.prediction.target.index == requests[index].target
        assert [e.method for e in answer.explanations] == [
            m.method for m in requests[index].methods
        ]
        for got, ref in zip(answer.explanations, want.explanations, strict=True):
            assert np.abs(map_to_array(got.map) - map_to_array(ref.map)).max() <= 1e-5

    after = torchserve.batch_sizes()
    served = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert sum(size * n for size, n in served.items()) == CLIENTS * PER_CLIENT
    batched = {size: n for size, n in served.items() if size > 1 and n > 0}
    assert batched, f"no batch larger than 1: {served}"
    logged = [int(s) for s in re.findall(r"xaiserve batch size=(\d+)", torchserve.model_log())]
    assert max(logged) > 1
    counts = {size: int(n) for size, n in sorted(served.items()) if n}
    print(f"\n{CLIENTS * PER_CLIENT} requests; batches by size: {counts}")
