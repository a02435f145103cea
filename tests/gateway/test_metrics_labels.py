"""``service.metrics``: label vocabularies and what one result records."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from xaiserve.api.types import (
    ClassScore,
    ExplainResult,
    Explanation,
    Prediction,
    ReliabilityRecord,
)
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.gateway.metrics import CODES, METHODS, RPCS, Metrics


def test_vocabularies_are_the_api_catalog_and_grpc_codes() -> None:
    assert {n.lower() for n in pb.Method.keys()} - {"method_unspecified"} == METHODS
    assert len(CODES) == 17 and {"OK", "NOT_FOUND", "RESOURCE_EXHAUSTED"} <= CODES
    assert {"Explain", "ListModels"} == RPCS


@pytest.mark.parametrize(
    ("names", "counted"),
    [
        ([], {}),
        (["saliency"], {"saliency": 1}),
        (["saliency", "saliency"], {"saliency": 1}),  # once per call
        (["saliency", "grad_cam", "occlusion"], {"saliency": 1, "grad_cam": 1, "occlusion": 1}),
        (["saliency", "quantum_cam", "other"], {"saliency": 1, "other": 1}),
    ],
)
def test_each_method_of_a_call_is_counted_once(names: list[str], counted: dict[str, int]) -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.add_models(["demo"])
    metrics.observe_explain("demo", names, "OK", 0.1)
    r = metrics.registry
    seen = {
        s.labels["method"]: s.value
        for family in r.collect()
        if family.name == "xaiserve_method_requests"
        for s in family.samples
        if s.name == "xaiserve_method_requests_total"
    }
    assert seen == counted
    assert _value(r, "xaiserve_request_duration_seconds_count", model="demo", code="OK") == 1


def test_codes_and_rpcs_outside_the_vocabulary_are_other() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.observe_rpc_error("NoSuchRpc", "NOT_A_CODE")
    metrics.observe_explain("demo", ["saliency"], "NOT_A_CODE", 0.1)
    r = metrics.registry
    assert _value(r, "xaiserve_request_errors_total", rpc="other", code="other") == 1
    assert _value(r, "xaiserve_request_errors_total", rpc="Explain", code="other") == 1
    assert _value(r, "xaiserve_request_duration_seconds_count", model="other", code="other") == 1


def _record(apem: float, norm: float | None = None, undefined: str = "") -> ReliabilityRecord:
    return ReliabilityRecord(
        eps_minus=1.0,
        eps_plus=1.0 + apem,
        apem=apem,
        resolution=0.01,
        eps_minus_censored=False,
        eps_plus_censored=False,
        forward_passes=9,
        apem_norm=norm,
        undefined_reason=undefined,
    )


def _result(*explanations: Explanation) -> ExplainResult:
    score = ClassScore(0, "a", 0.9, 2.0)
    return ExplainResult(
        model="demo",
        version="1",
        prediction=Prediction((score,), score),
        explanations=explanations,
        timings={"decode": 0.001, "predict": 0.002, "total": 0.5, "made_up_stage": 1.0},
        forward_passes={"predict": 1, "attribute": 20, "apem": 40, "apem_filter": 5, "x": 2},
        device_calls=2.75,
    )


def _explanation(method: str, **fields) -> Explanation:
    return Explanation(
        method=method,
        stage="one_channel",
        map=np.zeros((1, 2, 2), np.float32),
        forward_passes=0,
        timings=fields.pop("timings", {"attribute": 0.1}),
        **fields,
    )


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_a_result_records_stages_passes_and_apem() -> None:
    metrics = Metrics(CollectorRegistry())
    result = _result(
        _explanation(
            "saliency",
            timings={"attribute": 0.1, "postprocess": 0.01, "apem": 0.2, "apem_filter": 0.3},
            reliability=_record(12.5, norm=0.7),
        ),
        _explanation("grad_cam", reliability=_record(-3.0)),
        _explanation("occlusion", reliability=_record(float("nan"), undefined="constant map")),
    )
    metrics.observe_explain("demo", ["saliency", "grad_cam", "occlusion"], "OK", 0.6, result, 0.55)
    r = metrics.registry

    assert _value(r, "xaiserve_request_duration_seconds_count", model="demo", code="OK") == 1
    for method in ("saliency", "grad_cam", "occlusion"):
        assert _value(r, "xaiserve_method_requests_total", model="demo", method=method) == 1
    assert _value(r, "xaiserve_request_errors_total", rpc="Explain", code="OK") == 0
    for stage, seconds in (
        ("decode", 0.001),
        ("predict", 0.002),
        ("engine", 0.5),
        ("backend", 0.55),
    ):
        assert _value(
            r, "xaiserve_stage_duration_seconds_sum", model="demo", stage=stage
        ) == pytest.approx(seconds)
    assert (
        _value(r, "xaiserve_stage_duration_seconds_count", model="demo", stage="made_up_stage") == 0
    )
    for stage in ("attribute", "postprocess", "apem", "filter"):
        assert (
            _value(
                r,
                "xaiserve_method_stage_duration_seconds_count",
                model="demo",
                method="saliency",
                stage=stage,
            )
            == 1
        )
    passes = {
        s: _value(r, "xaiserve_forward_passes_total", model="demo", stage=s)
        for s in ("predict", "attribute", "apem", "apem_filter", "other")
    }
    assert passes == {"predict": 1, "attribute": 20, "apem": 40, "apem_filter": 5, "other": 2}
    assert _value(r, "xaiserve_device_calls_total", model="demo") == 2.75

    # negative buckets: the client exposes no _sum (it would not be a counter)
    assert (
        r.get_sample_value("xaiserve_apem_score_sum", {"model": "demo", "method": "saliency"})
        is None
    )
    assert _value(r, "xaiserve_apem_score_count", model="demo", method="saliency") == 1
    assert _value(r, "xaiserve_apem_score_bucket", model="demo", method="saliency", le="10.0") == 0
    assert _value(r, "xaiserve_apem_score_bucket", model="demo", method="saliency", le="20.0") == 1
    assert _value(r, "xaiserve_apem_score_bucket", model="demo", method="grad_cam", le="-1.0") == 1
    assert _value(r, "xaiserve_apem_norm_score_count", model="demo", method="saliency") == 1
    assert _value(r, "xaiserve_apem_norm_score_count", model="demo", method="grad_cam") == 0
    # an undefined record is not a score
    assert _value(r, "xaiserve_apem_score_count", model="demo", method="occlusion") == 0


def test_model_names_outside_the_vocabulary_are_other() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.observe_explain("probe-1", ["saliency"], "NOT_FOUND", 0.01)
    metrics.observe_explain("probe-2", ["saliency"], "NOT_FOUND", 0.01)
    metrics.add_models(["demo"])
    metrics.observe_explain("demo", ["saliency"], "INVALID_ARGUMENT", 0.01)
    r = metrics.registry
    count = "xaiserve_request_duration_seconds_count"
    assert _value(r, count, model="other", code="NOT_FOUND") == 2
    assert _value(r, count, model="probe-1", code="NOT_FOUND") == 0
    assert _value(r, count, model="demo", code="INVALID_ARGUMENT") == 1
    assert _value(r, "xaiserve_method_requests_total", model="other", method="saliency") == 2
    assert _value(r, "xaiserve_request_errors_total", rpc="Explain", code="NOT_FOUND") == 2
    # an answered call teaches the model's name
    metrics.observe_explain("fresh", ["saliency"], "OK", 0.1, _result())
    assert metrics.model_label("fresh") == "other"  # the result's name ("demo") is used
    assert _value(r, count, model="demo", code="OK") == 1


def test_rpc_errors_and_default_registry_has_process_metrics() -> None:
    metrics = Metrics()
    metrics.observe_rpc_error("ListModels", "UNAVAILABLE")
    r = metrics.registry
    assert _value(r, "xaiserve_request_errors_total", rpc="ListModels", code="UNAVAILABLE") == 1
    assert r.get_sample_value("process_cpu_seconds_total") is not None
    assert (
        r.get_sample_value(
            "python_info",
            {
                k: v
                for s in r.collect()
                if s.name == "python_info"
                for k, v in s.samples[0].labels.items()
            },
        )
        == 1
    )
