"""Protobuf <-> plain types (xaiserve.api.convert), no server."""

from __future__ import annotations

import numpy as np
import pytest

from support.service_fakes import FAKE_PNG, MODELS
from xaiserve.api import convert
from xaiserve.api.errors import InvalidArgument
from xaiserve.api.types import (
    ClassScore,
    EncodedImage,
    ExplainResult,
    Explanation,
    FilteredRecord,
    FilterRequest,
    Prediction,
    RawTensor,
    ReliabilityRecord,
    ReliabilityRequest,
)
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.gateway.client import build_request


def _request(*methods: pb.MethodRequest, **fields: object) -> pb.ExplainRequest:
    return pb.ExplainRequest(
        model_name="demo", image=pb.Image(encoded=b"png"), methods=list(methods), **fields
    )


def _invalid(request: pb.ExplainRequest) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        convert.request_from_proto(request)
    return caught.value


def test_full_request_converts_every_field() -> None:
    smooth = pb.MethodRequest(
        method=pb.SMOOTHGRAD,
        stage=pb.RAW,
        smoothgrad=pb.SmoothGradParams(samples=7, seed=3),
        reliability=pb.ReliabilityOptions(enabled=True, eps_max=2.0, shuffles=0, clamp=True),
        filter=pb.FilterOptions(enabled=True, mode=pb.EXACT, forward_budget=100),
    )
    saliency = pb.MethodRequest(method=pb.SALIENCY)
    request = _request(
        smooth, saliency, model_version="3", target=0, top_k=2, map_encoding=pb.FLOAT32_AND_PNG
    )

    plain = convert.request_from_proto(request)

    assert (plain.model, plain.version, plain.target, plain.top_k) == ("demo", "3", 0, 2)
    assert plain.image == EncodedImage(b"png")
    assert (plain.want_array, plain.want_png) == (True, True)
    first, second = plain.methods
    assert first.name == "smoothgrad" and first.stage == "raw"
    assert first.params == {"samples": 7, "seed": 3}  # noise_level unset: not sent
    assert first.field == "methods[0]" and first.params_field == "smoothgrad"
    assert first.reliability == ReliabilityRequest(
        eps_max=2.0, resolution=None, shuffles=0, clamp=True
    )
    assert first.filter == FilterRequest(mode="exact", forward_budget=100)
    assert second.name == "saliency" and second.stage == "one_channel"
    assert second.params == {} and second.params_field == "saliency"
    assert second.field == "methods[1]"
    assert second.reliability is None and second.filter is None


def test_unset_optionals_are_none_and_explicit_zeros_are_kept() -> None:
    plain = convert.request_from_proto(
        _request(
            pb.MethodRequest(
                method=pb.INTEGRATED_GRADIENTS,
                integrated_gradients=pb.IntegratedGradientsParams(steps=0, baseline=0.0),
            )
        )
    )
    assert plain.target is None and plain.top_k is None
    assert plain.methods[0].params == {"steps": 0, "baseline": 0.0}

    explicit = convert.request_from_proto(_request(target=0, top_k=0))
    assert explicit.target == 0 and explicit.top_k == 0


def test_empty_params_message_means_defaults() -> None:
    method = pb.MethodRequest(method=pb.GRAD_CAM, grad_cam=pb.GradCamParams())
    plain = convert.request_from_proto(_request(method))
    assert plain.methods[0].params == {} and plain.methods[0].params_field == "grad_cam"


def test_disabled_options_are_none_even_with_fields_set() -> None:
    method = pb.MethodRequest(
        method=pb.SALIENCY,
        reliability=pb.ReliabilityOptions(enabled=False, eps_max=3.0),
        filter=pb.FilterOptions(enabled=False, mode=pb.EXACT),
    )
    plain = convert.request_from_proto(_request(method))
    assert plain.methods[0].reliability is None and plain.methods[0].filter is None


@pytest.mark.parametrize(
    ("mode", "name"), [(pb.FILTER_MODE_UNSPECIFIED, "fast"), (pb.FAST, "fast"), (pb.EXACT, "exact")]
)
def test_filter_modes(mode: int, name: str) -> None:
    method = pb.MethodRequest(method=pb.SALIENCY, filter=pb.FilterOptions(enabled=True, mode=mode))
    plain = convert.request_from_proto(_request(method))
    assert plain.methods[0].filter == FilterRequest(mode=name)


@pytest.mark.parametrize(
    ("stage", "name"),
    [
        (pb.MAP_STAGE_UNSPECIFIED, "one_channel"),
        (pb.RAW, "raw"),
        (pb.ONE_CHANNEL, "one_channel"),
        (pb.TIMES_IMAGE, "times_image"),
        (pb.THREE_CHANNEL, "three_channel"),
    ],
)
def test_stages(stage: int, name: str) -> None:
    method = pb.MethodRequest(method=pb.SALIENCY, stage=stage)
    assert convert.request_from_proto(_request(method)).methods[0].stage == name


@pytest.mark.parametrize(
    ("encoding", "wanted"),
    [
        (pb.MAP_ENCODING_UNSPECIFIED, (True, False)),
        (pb.FLOAT32, (True, False)),
        (pb.PNG_OVERLAY, (False, True)),
        (pb.FLOAT32_AND_PNG, (True, True)),
    ],
)
def test_map_encodings(encoding: int, wanted: tuple[bool, bool]) -> None:
    plain = convert.request_from_proto(_request(map_encoding=encoding))
    assert (plain.want_array, plain.want_png) == wanted


def test_every_method_enum_maps_to_its_registry_name() -> None:
    names = {
        "SALIENCY": "saliency",
        "INPUT_X_GRADIENT": "input_x_gradient",
        "SMOOTHGRAD": "smoothgrad",
        "INTEGRATED_GRADIENTS": "integrated_gradients",
        "GRAD_CAM": "grad_cam",
        "OCCLUSION": "occlusion",
    }
    for enum_name, registry_name in names.items():
        method = pb.MethodRequest(method=pb.Method.Value(enum_name))
        assert convert.request_from_proto(_request(method)).methods[0].name == registry_name


def test_nested_enum_and_repeated_params() -> None:
    occlusion = pb.MethodRequest(
        method=pb.OCCLUSION,
        occlusion=pb.OcclusionParams(
            window=4, adaptive=pb.AdaptiveOcclusion(enabled=True, refine_fraction=0.0)
        ),
    )
    lrp = pb.MethodRequest(method=pb.LRP, lrp=pb.LrpParams(rule=pb.ALPHA_BETA, alpha=2.0))
    lrp_default = pb.MethodRequest(method=pb.LRP, lrp=pb.LrpParams(epsilon=0.0))
    auto = pb.MethodRequest(
        method=pb.AUTO, auto=pb.AutoParams(candidates=[pb.SALIENCY, pb.GRAD_CAM_PLUS_PLUS])
    )
    vargrad = pb.MethodRequest(method=pb.VARGRAD, vargrad=pb.SmoothGradParams(samples=3))
    empty_adaptive = pb.MethodRequest(
        method=pb.OCCLUSION, occlusion=pb.OcclusionParams(adaptive=pb.AdaptiveOcclusion())
    )
    plain = convert.request_from_proto(
        _request(occlusion, lrp, lrp_default, auto, vargrad, empty_adaptive)
    )
    assert [m.params for m in plain.methods] == [
        {"window": 4, "adaptive": {"enabled": True, "refine_fraction": 0.0}},
        {"rule": "alpha_beta", "alpha": 2.0},
        {"epsilon": 0.0},  # rule UNSPECIFIED: the default, not sent
        {"candidates": ["saliency", "grad_cam_plus_plus"]},
        {"samples": 3},
        {"adaptive": {}},  # set, with defaults
    ]
    assert [m.name for m in plain.methods] == [
        "occlusion",
        "lrp",
        "lrp",
        "auto",
        "vargrad",
        "occlusion",
    ]


@pytest.mark.parametrize("candidate", [99, pb.METHOD_UNSPECIFIED])
def test_bad_enum_values_in_params_name_the_element(candidate: int) -> None:
    auto = pb.MethodRequest(method=pb.AUTO, auto=pb.AutoParams(candidates=[pb.SALIENCY, candidate]))
    assert _invalid(_request(auto)).field == "methods[0].auto.candidates[1]"
    lrp = pb.MethodRequest(method=pb.LRP, lrp=pb.LrpParams(rule=7))
    assert _invalid(_request(lrp)).field == "methods[0].lrp.rule"


def test_forward_backend_and_gad_are_carried() -> None:
    assert convert.request_from_proto(_request(forward_backend=pb.ONNXRUNTIME)).forward_backend == (
        "onnxruntime"
    )
    assert convert.request_from_proto(_request()).forward_backend == ""
    assert "unknown" in _invalid(_request(forward_backend=9)).message
    gad = pb.MethodRequest(method=pb.SALIENCY, gad=pb.GadOptions(enabled=True))
    converted = convert.request_from_proto(_request(pb.MethodRequest(method=pb.SALIENCY), gad))
    assert [m.gad for m in converted.methods] == [False, True]


def test_params_for_another_method_name_the_field() -> None:
    wrong = pb.MethodRequest(method=pb.SALIENCY, occlusion=pb.OcclusionParams(window=4))
    error = _invalid(_request(pb.MethodRequest(method=pb.GRAD_CAM), wrong))
    assert error.field == "methods[1].occlusion"
    assert str(error) == "methods[1].occlusion: parameters for OCCLUSION given to method SALIENCY"


@pytest.mark.parametrize("value", [99, pb.METHOD_UNSPECIFIED])
def test_unknown_or_unspecified_method(value: int) -> None:
    error = _invalid(_request(pb.MethodRequest(method=value)))
    assert error.field == "methods[0].method"


def test_unknown_stage_encoding_and_filter_mode() -> None:
    bad_stage = pb.MethodRequest(method=pb.SALIENCY, stage=42)
    assert _invalid(_request(bad_stage)).field == "methods[0].stage"
    assert _invalid(_request(map_encoding=9)).field == "map_encoding"
    bad_mode = pb.MethodRequest(method=pb.SALIENCY, filter=pb.FilterOptions(enabled=True, mode=7))
    assert _invalid(_request(bad_mode)).field == "methods[0].filter.mode"


def test_image_errors_and_tensor_passthrough() -> None:
    assert _invalid(pb.ExplainRequest(model_name="demo")).field == "image"
    assert _invalid(pb.ExplainRequest(model_name="demo", image=pb.Image())).field == "image"
    error = _invalid(pb.ExplainRequest(model_name="demo", image=pb.Image(encoded=b"")))
    assert (error.field, error.message) == ("image.encoded", "empty")

    data = np.ones((3, 2, 2), np.float32).tobytes()[:-4]  # wrong length: the engine's to judge
    request = pb.ExplainRequest(
        model_name="demo", image=pb.Image(tensor=pb.Tensor(shape=[3, 2, 2], data=data))
    )
    assert convert.request_from_proto(request).image == RawTensor(shape=(3, 2, 2), data=data)


def test_client_requests_convert_to_what_the_client_asked() -> None:
    request = build_request(
        b"png",
        methods=("occlusion", "saliency"),
        target=2,
        stage="times_image",
        png=True,
        params={"occlusion": {"window": 16, "baseline": 0.0}},
        reliability={"eps_max": 5.0},
        filter={"mode": "exact"},
    )
    plain = convert.request_from_proto(request)
    assert [m.name for m in plain.methods] == ["occlusion", "saliency"]
    assert plain.methods[0].params == {"window": 16, "baseline": 0.0}
    assert plain.methods[1].params == {}
    assert all(m.stage == "times_image" for m in plain.methods)
    assert plain.methods[0].reliability == ReliabilityRequest(eps_max=5.0)
    assert plain.methods[1].filter == FilterRequest(mode="exact")
    assert plain.target == 2 and plain.want_png and plain.want_array


def _result() -> ExplainResult:
    raw = np.arange(12, dtype=np.float32).reshape(3, 2, 2) - 5.5
    one = np.linspace(0, 1, 4, dtype=np.float32).reshape(1, 2, 2)
    score = ClassScore(index=2, label="triangle", probability=0.5, logit=1.25)
    return ExplainResult(
        model="demo",
        version="1",
        prediction=Prediction(top_k=(score, ClassScore(0, "circle", 0.25, 0.5)), target=score),
        explanations=(
            Explanation(
                method="integrated_gradients",
                stage="raw",
                map=raw,
                forward_passes=32,
                timings={"attribute": 0.5, "apem": 0.25},
                png=FAKE_PNG,
            ),
            Explanation(
                method="grad_cam",
                stage="one_channel",
                map=one.astype(np.float64),
                forward_passes=1,
                timings={},
                reliability=ReliabilityRecord(
                    eps_minus=1.0,
                    eps_plus=3.0,
                    apem=2.0,
                    resolution=0.01,
                    eps_minus_censored=False,
                    eps_plus_censored=True,
                    forward_passes=40,
                ),
                filtered=FilteredRecord(
                    map=one * 0,
                    kept_fraction=0.5,
                    apem_before=2.0,
                    apem_after=2.5,
                    forward_passes=9,
                    png=FAKE_PNG,
                ),
            ),
        ),
        timings={"decode": 0.125, "predict": 0.25, "total": 1.0},
        device_calls=0.75,
    )


def test_response_carries_maps_records_and_timings() -> None:
    result = _result()
    response = convert.response_to_proto(result, want_array=True, want_png=False)

    assert (response.model_name, response.model_version) == ("demo", "1")
    assert response.device_calls == 0.75
    assert [s.index for s in response.prediction.top_k] == [2, 0]
    target = response.prediction.target
    scores = (target.index, target.label, target.probability, target.logit)
    assert scores == (2, "triangle", 0.5, 1.25)
    assert [(t.stage, t.seconds) for t in response.timings] == [
        ("decode", 0.125),
        ("predict", 0.25),
        ("total", 1.0),
    ]

    ig, cam = response.explanations
    assert (ig.method, ig.stage, ig.forward_passes) == (pb.INTEGRATED_GRADIENTS, pb.RAW, 32)
    assert list(ig.map.shape) == [3, 2, 2]
    assert ig.map.data == result.explanations[0].map.astype("<f4").tobytes()
    assert ig.map.png_overlay == b""  # not asked for
    assert [(t.stage, t.seconds) for t in ig.timings] == [("attribute", 0.5), ("apem", 0.25)]
    assert not ig.HasField("reliability") and not ig.HasField("filtered")

    assert (cam.method, cam.stage) == (pb.GRAD_CAM, pb.ONE_CHANNEL)
    decoded = np.frombuffer(cam.map.data, "<f4").reshape(tuple(cam.map.shape))
    np.testing.assert_array_equal(decoded, result.explanations[1].map)  # float64 sent as f4
    assert cam.HasField("reliability")
    rel = cam.reliability
    assert (rel.eps_minus, rel.eps_plus, rel.apem, rel.forward_passes) == (1.0, 3.0, 2.0, 40)
    assert rel.eps_plus_censored and not rel.eps_minus_censored
    assert not rel.HasField("apem_norm")
    assert cam.filtered.kept_fraction == 0.5 and cam.filtered.forward_passes == 9
    assert list(cam.filtered.map.shape) == [1, 2, 2] and len(cam.filtered.map.data) == 16


def test_png_only_response_has_shapes_but_no_data() -> None:
    response = convert.response_to_proto(_result(), want_array=False, want_png=True)
    ig, cam = response.explanations
    assert ig.map.data == b"" and ig.map.png_overlay == FAKE_PNG and list(ig.map.shape) == [3, 2, 2]
    assert cam.map.png_overlay == b""  # the engine made none
    assert cam.filtered.map.png_overlay == FAKE_PNG and cam.filtered.map.data == b""


def test_apem_norm_is_set_when_computed() -> None:
    record = ReliabilityRecord(
        eps_minus=1,
        eps_plus=2,
        apem=1,
        resolution=0.1,
        eps_minus_censored=False,
        eps_plus_censored=False,
        forward_passes=3,
        apem_norm=0.0,
        undefined_reason="",
    )
    result = _result()
    explanation = Explanation(
        method="saliency",
        stage="one_channel",
        map=np.zeros((1, 2, 2)),
        forward_passes=1,
        timings={},
        reliability=record,
    )
    response = convert.response_to_proto(
        ExplainResult(result.model, result.version, result.prediction, (explanation,), {}),
        want_array=True,
        want_png=False,
    )
    assert response.explanations[0].reliability.HasField("apem_norm")
    assert response.explanations[0].reliability.apem_norm == 0.0


def test_models_are_sorted_and_unknown_methods_dropped() -> None:
    response = convert.models_to_proto(MODELS)
    assert [m.name for m in response.models] == ["demo", "zeta"]
    demo, zeta = response.models
    assert list(demo.input_shape) == [3, 4, 4] and demo.cam_layer == "features.3"
    assert (demo.device, zeta.device) == ("cuda:1", "")
    assert list(demo.methods) == [pb.SALIENCY, pb.GRAD_CAM, pb.OCCLUSION]
    assert list(zeta.methods) == [pb.SALIENCY, pb.OCCLUSION]  # "quantum_cam" is not in the API
    assert list(zeta.labels) == ["a", "b"]
