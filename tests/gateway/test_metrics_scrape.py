"""The real gateway's ``/metrics`` after real calls: every count moves by exactly the calls made."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator

import grpc
import pytest

from support.gateway import Gateway, running_gateway, tiny_png
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.api.v1 import explain_pb2_grpc

TIMEOUT = 60


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("models")) as running:
        yield running


def _request(*methods: int, model: str = "tiny", **fields) -> pb.ExplainRequest:
    return pb.ExplainRequest(
        model_name=model,
        image=fields.pop("image", pb.Image(encoded=tiny_png())),
        methods=[pb.MethodRequest(method=m) for m in methods],
        **fields,
    )


def _values(gateway: Gateway) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> sorted label items -> value."""
    values: dict[str, dict] = defaultdict(dict)
    for sample in gateway.samples():
        values[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return values


def _select(series: dict, **labels: str) -> dict:
    """The series of a sample name whose labels include ``labels``."""
    return {k: v for k, v in series.items() if labels.items() <= dict(k).items()}


def test_counts_move_by_exactly_the_calls_made(gateway: Gateway) -> None:
    before = _values(gateway)
    assert not _select(before.get("xaiserve_request_duration_seconds_count", {}))

    answers: list[pb.ExplainResponse] = []
    codes: list[grpc.StatusCode] = []
    with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = explain_pb2_grpc.ExplanationServiceStub(channel)
        good = [
            _request(pb.SALIENCY),
            _request(pb.SALIENCY, top_k=2),
            _request(pb.GRAD_CAM, pb.SALIENCY),
            _request(pb.SALIENCY, pb.GRAD_CAM, pb.OCCLUSION),
            pb.ExplainRequest(  # with its APEM record (2 shuffles) and filtered map
                model_name="tiny",
                image=pb.Image(encoded=tiny_png(1)),
                methods=[
                    pb.MethodRequest(
                        method=pb.SALIENCY,
                        reliability=pb.ReliabilityOptions(enabled=True, shuffles=2),
                        filter=pb.FilterOptions(enabled=True, forward_budget=400),
                    )
                ],
            ),
        ]
        for request in good:
            answers.append(stub.Explain(request, timeout=TIMEOUT))
        bad = [
            _request(pb.SALIENCY, model="no-such-model"),  # NOT_FOUND
            _request(pb.SALIENCY, top_k=99),  # INVALID_ARGUMENT
            _request(pb.SALIENCY, image=pb.Image(encoded=b"not an image")),  # INVALID_ARGUMENT
        ]
        for request in bad:
            with pytest.raises(grpc.RpcError) as caught:
                stub.Explain(request, timeout=TIMEOUT)
            codes.append(caught.value.code())
        stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT)
    assert codes == [
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT,
    ]

    after = _values(gateway)
    count = after["xaiserve_request_duration_seconds_count"]
    assert _select(count, model="tiny", code="OK") == {
        (("code", "OK"), ("model", "tiny")): float(len(good))
    }
    # each method of a call counted once: saliency in every call, grad_cam in two
    methods = after["xaiserve_method_requests_total"]
    assert methods == {
        (("method", "saliency"), ("model", "tiny")): 7.0,
        (("method", "grad_cam"), ("model", "tiny")): 2.0,
        (("method", "occlusion"), ("model", "tiny")): 1.0,
        (("method", "saliency"), ("model", "other")): 1.0,
    }
    # an unknown model name is not a label value: it is counted as "other"
    assert sum(_select(count, model="other", code="NOT_FOUND").values()) == 1
    assert sum(_select(count, model="tiny", code="INVALID_ARGUMENT").values()) == 2
    assert sum(count.values()) == len(good) + len(bad)
    # the +Inf bucket holds every call, and the sum is positive
    buckets = after["xaiserve_request_duration_seconds_bucket"]
    assert sum(_select(buckets, le="+Inf").values()) == len(good) + len(bad)
    assert sum(after["xaiserve_request_duration_seconds_sum"].values()) > 0

    errors = after["xaiserve_request_errors_total"]
    assert errors == {
        (("code", "INVALID_ARGUMENT"), ("rpc", "Explain")): 2.0,
        (("code", "NOT_FOUND"), ("rpc", "Explain")): 1.0,
    }
    assert after["xaiserve_requests_in_flight"] == {(): 0.0}

    stages = after["xaiserve_stage_duration_seconds_count"]
    for stage in ("decode", "predict", "engine", "backend"):
        assert _select(stages, model="tiny", stage=stage) == {
            (("model", "tiny"), ("stage", stage)): float(len(good))
        }, stage
    method_stages = after["xaiserve_method_stage_duration_seconds_count"]
    for method, calls in (("saliency", 5), ("grad_cam", 2), ("occlusion", 1)):
        for stage in ("attribute", "postprocess"):
            assert sum(_select(method_stages, method=method, stage=stage).values()) == calls
    for stage in ("apem", "filter"):  # only the last call asked for them
        assert _select(method_stages, method="saliency", stage=stage) == {
            (("method", "saliency"), ("model", "tiny"), ("stage", stage)): 1.0
        }

    # the APEM histograms hold the record of the one scored map, in the right bucket
    (scored,) = answers[-1].explanations
    assert scored.HasField("reliability")
    apem_buckets = {
        float(dict(k)["le"]): v
        for k, v in _select(
            after["xaiserve_apem_score_bucket"], model="tiny", method="saliency"
        ).items()
    }
    assert all(
        v == (1.0 if le >= scored.reliability.apem else 0.0) for le, v in apem_buckets.items()
    ), (scored.reliability.apem, apem_buckets)
    norm_count = after.get("xaiserve_apem_norm_score_count", {})
    expected = 1.0 if scored.reliability.HasField("apem_norm") else 0.0
    assert sum(_select(norm_count, model="tiny", method="saliency").values()) == expected

    passes = {dict(k)["stage"]: v for k, v in after["xaiserve_forward_passes_total"].items()}
    by_stage: Counter[str] = Counter()
    for answer in answers:
        by_stage.update(dict(answer.forward_passes))
    assert passes == {stage: float(n) for stage, n in by_stage.items()}
    assert passes["predict"] == len(good)  # one image per answered call
    # every other image is accounted for by a map: its attribution, APEM record and filter
    per_map = sum(
        e.forward_passes + e.reliability.forward_passes + e.filtered.forward_passes
        for a in answers
        for e in a.explanations
    )
    assert sum(passes.values()) - passes["predict"] == per_map
    assert passes["attribute"] > len(good)  # occlusion evaluates many occluded images
    assert passes["apem"] > 0 and passes["apem_filter"] > 0


def test_metrics_endpoint_serves_text_format(gateway: Gateway) -> None:
    text = gateway.scrape()
    assert "# TYPE xaiserve_request_duration_seconds histogram" in text
    assert "# TYPE xaiserve_forward_passes_total counter" in text
    assert "_created" not in text  # main() turns the *_created series off
    assert any("metrics on http://127.0.0.1:" in line for line in gateway.log)
