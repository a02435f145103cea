"""Metric series stay bounded whatever clients send: 1,000 calls with random method sets and
random model names create no more series than the label allow-lists permit."""

from __future__ import annotations

import random
import string
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from prometheus_client import CollectorRegistry

from support.service_fakes import MODELS, FakeEngine, LoopThread
from xaiserve.api.errors import NotFound
from xaiserve.api.types import ExplainRequest
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.api.v1 import explain_pb2_grpc
from xaiserve.gateway import metrics as metrics_module
from xaiserve.gateway.backends import LocalBackend
from xaiserve.gateway.metrics import METHODS, Metrics
from xaiserve.gateway.server import RunningServer, start
from xaiserve.gateway.settings import Settings

CALLS = 1000
#: Sample lines these calls can leave, whatever names and method sets they draw: request
#: latency 3 models x 3 codes x 18 lines (15 buckets, count, sum, created), method counts
#: 3 x 27 x 2 (total, created), errors 2 codes x 2, in flight 1, stages 2 served models x
#: 4 x 20, per-method stages 2 x 26 x 20 (the fake answers an "attribute" timing): 1,529,
#: rounded up. Any traffic stays under the product of the allow-lists (computed below).
LINES_BOUND = 2000
SERVED = tuple(m.name for m in MODELS)
#: Allow-list of each label: what any value a client sends must fall into.
VOCABULARY: dict[str, frozenset[str]] = {
    "model": frozenset(SERVED) | {metrics_module.OTHER},
    "code": frozenset(c.name for c in grpc.StatusCode),
    "method": METHODS | {metrics_module.OTHER},
    "rpc": frozenset({"Explain", "ListModels"}),
    "stage": frozenset(
        metrics_module.REQUEST_STAGES + metrics_module.METHOD_STAGES + metrics_module.FORWARD_STAGES
    )
    | {metrics_module.OTHER},
}


def _refuse_unserved(request: ExplainRequest, deadline: float | None) -> None:
    if request.model not in SERVED:
        raise NotFound("model_name", "not served")


@dataclass
class Server:
    running: RunningServer
    backend: LocalBackend
    stub: explain_pb2_grpc.ExplanationServiceStub


@pytest.fixture
def server(aio_loop: LoopThread) -> Iterator[Server]:
    backend = LocalBackend(FakeEngine(behaviour=_refuse_unserved), workers=2)
    metrics = Metrics(CollectorRegistry())  # only the gateway's own collectors
    running = aio_loop.run(start(Settings(port=0), backend, metrics))
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield Server(running, backend, explain_pb2_grpc.ExplanationServiceStub(channel))
    aio_loop.run(running.server.stop(0))
    aio_loop.run(backend.close())


def _random_request(rng: random.Random) -> pb.ExplainRequest:
    """A call a careless or hostile client might send: any methods, any model name."""
    values = list(pb.Method.values())
    methods = [
        rng.choice(values) if rng.random() < 0.9 else rng.randrange(100, 10_000)  # unknown
        for _ in range(rng.randrange(0, 7))
    ]
    roll = rng.random()
    if roll < 0.4:
        model = rng.choice(SERVED)
    elif roll < 0.9:
        model = "".join(rng.choices(string.printable, k=rng.randrange(1, 40)))
    else:
        model = "x" * rng.randrange(200, 2000)
    return pb.ExplainRequest(
        model_name=model,
        image=pb.Image(encoded=b"png"),
        methods=[pb.MethodRequest(method=m) for m in methods],
    )


def _series(registry: CollectorRegistry) -> tuple[dict[str, set[tuple]], int]:
    """Each family's distinct label sets (``le`` left out), and the number of sample lines."""
    series: dict[str, set[tuple]] = defaultdict(set)
    lines = 0
    for family in registry.collect():
        for sample in family.samples:
            lines += 1
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            series[family.name].add(labels)
    return series, lines


def _bound(labels: tuple[str, ...]) -> int:
    """Series a family with ``labels`` can have: the product of their allow-lists' sizes."""
    count = 1
    for label in labels:
        count *= len(VOCABULARY[label])
    return count


def test_random_calls_create_a_bounded_number_of_series(server: Server) -> None:
    rng = random.Random(20)
    codes: set[grpc.StatusCode] = set()
    for _ in range(CALLS):
        try:
            server.stub.Explain(_random_request(rng), timeout=10)
            codes.add(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.add(error.code())
    # the calls did reach every path: answered, unknown model, unknown method
    assert codes == {
        grpc.StatusCode.OK,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
    }

    series, lines = _series(server.running.metrics.registry)
    samples = {f.name: len(f.samples) for f in server.running.metrics.registry.collect()}
    bound_lines = 0
    for name, label_sets in series.items():
        label_names = {k for labels in label_sets for k, _ in labels}
        for label in label_names:  # every value is in its allow-list
            values = {dict(labels)[label] for labels in label_sets}
            assert values <= VOCABULARY[label], (name, label, values - VOCABULARY[label])
        bound = _bound(tuple(label_names))
        assert len(label_sets) <= bound, (name, sorted(label_names), len(label_sets), bound)
        bound_lines += bound * samples[name] // len(label_sets)  # lines per series: fixed
    # request latency carries model and code only: at most 3 x 3 series for these calls
    duration = series["xaiserve_request_duration_seconds"]
    assert {k for labels in duration for k, _ in labels} == {"model", "code"}
    assert len(duration) <= len(VOCABULARY["model"]) * len(codes)
    # and the whole registry stays under the allow-lists' product (before this bound
    # existed, request latency was also labelled by the call's method set, and these calls
    # made 174 series of it; 4,337 sample lines in all)
    assert lines <= bound_lines
    assert lines <= LINES_BOUND, (lines, bound_lines)
