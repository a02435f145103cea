"""Plain request -> protobuf and protobuf response -> plain (xaiserve.api.reverse_convert):
exact inverses of xaiserve.api.convert, so the TorchServe path drops nothing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor

from xaiserve.api import convert, reverse_convert
from xaiserve.api.v1 import explain_pb2 as pb

# Every field of the request messages, as set by _full_requests. A field added to the API
# fails test_every_request_field_is_covered until reverse_convert (and this list) handle it.
COVERED_FIELDS = {
    "ExplainRequest": {
        "model_name",
        "model_version",
        "image",
        "target",
        "methods",
        "top_k",
        "map_encoding",
        "forward_backend",
    },
    "Image": {"encoded", "tensor"},
    "Tensor": {"shape", "data"},
    "MethodRequest": {
        "method",
        "stage",
        "reliability",
        "filter",
        "gad",
        *(f.name for f in pb.MethodRequest.DESCRIPTOR.oneofs_by_name["params"].fields),
    },
    "ReliabilityOptions": {"enabled", "eps_max", "resolution", "shuffles", "clamp"},
    "FilterOptions": {"enabled", "mode", "forward_budget"},
    "GadOptions": {"enabled"},
}


def _fields(descriptor: Descriptor) -> set[str]:
    return {f.name for f in descriptor.fields}


def test_every_request_field_is_covered() -> None:
    for name, covered in COVERED_FIELDS.items():
        descriptor = pb.DESCRIPTOR.message_types_by_name[name]
        assert _fields(descriptor) == covered, f"{name}: handle new fields in reverse_convert"


def _full_requests() -> list[pb.ExplainRequest]:
    methods = [
        pb.MethodRequest(
            method=pb.SMOOTHGRAD,
            stage=pb.RAW,
            smoothgrad=pb.SmoothGradParams(samples=7, noise_level=0.0, seed=3),
            reliability=pb.ReliabilityOptions(
                enabled=True, eps_max=2.5, resolution=0.125, shuffles=0, clamp=True
            ),
            filter=pb.FilterOptions(enabled=True, mode=pb.EXACT, forward_budget=100),
            gad=pb.GadOptions(enabled=True),
        ),
        pb.MethodRequest(
            method=pb.OCCLUSION,
            stage=pb.TIMES_IMAGE,
            occlusion=pb.OcclusionParams(
                window=4, adaptive=pb.AdaptiveOcclusion(enabled=True, refine_fraction=0.5)
            ),
            reliability=pb.ReliabilityOptions(enabled=True),
            filter=pb.FilterOptions(enabled=True),
        ),
        pb.MethodRequest(method=pb.OCCLUSION, occlusion=pb.OcclusionParams(adaptive={})),
        pb.MethodRequest(method=pb.LRP, lrp=pb.LrpParams(rule=pb.ALPHA_BETA, alpha=2.0)),
        pb.MethodRequest(method=pb.AUTO, auto=pb.AutoParams(candidates=[pb.SALIENCY, pb.LIME])),
        pb.MethodRequest(method=pb.GRAD_CAM, grad_cam=pb.GradCamParams()),
        pb.MethodRequest(method=pb.SALIENCY),
    ]
    tensor = pb.Tensor(shape=[3, 2, 2], data=np.arange(12, dtype="<f4").tobytes())
    return [
        pb.ExplainRequest(
            model_name="demo",
            model_version="3",
            image=pb.Image(encoded=b"png-bytes"),
            target=0,
            methods=methods,
            top_k=2,
            map_encoding=pb.FLOAT32_AND_PNG,
            forward_backend=pb.ONNXRUNTIME,
        ),
        pb.ExplainRequest(
            model_name="demo", image=pb.Image(tensor=tensor), map_encoding=pb.PNG_OVERLAY
        ),
        pb.ExplainRequest(model_name="m", image=pb.Image(encoded=b"x"), forward_backend=pb.TORCH),
    ]


@pytest.mark.parametrize("index", range(3))
def test_plain_request_survives_the_trip_through_protobuf(index: int) -> None:
    plain = convert.request_from_proto(_full_requests()[index])
    again = convert.request_from_proto(reverse_convert.request_to_proto(plain))
    assert again == plain


def _full_response() -> pb.ExplainResponse:
    data = np.linspace(-1, 1, 12, dtype="<f4").reshape(3, 2, 2)
    reliability = pb.Reliability(
        eps_minus=0.1,
        eps_plus=3.3,
        apem=3.2,
        resolution=0.01,
        eps_minus_censored=False,
        eps_plus_censored=True,
        forward_passes=40,
        undefined_reason="",
    )
    reliability.apem_norm = 0.7
    return pb.ExplainResponse(
        model_name="demo",
        model_version="1",
        prediction=pb.Prediction(
            top_k=[pb.ClassScore(index=1, label="b", probability=0.7, logit=2.0)],
            target=pb.ClassScore(index=2, label="c", probability=0.1, logit=-0.3),
        ),
        explanations=[
            pb.Explanation(
                method=pb.SMOOTHGRAD,
                stage=pb.RAW,
                map=pb.AttributionMap(shape=[3, 2, 2], data=data.tobytes(), png_overlay=b"png1"),
                reliability=reliability,
                filtered=pb.FilteredMap(
                    map=pb.AttributionMap(shape=[3, 2, 2], data=(data * 0).tobytes()),
                    kept_fraction=0.25,
                    apem_before=3.2,
                    apem_after=3.5,
                    forward_passes=9,
                ),
                forward_passes=25,
                timings=[pb.StageTiming(stage="attribute", seconds=0.123456789)],
            ),
            pb.Explanation(
                method=pb.GRAD_CAM,
                stage=pb.ONE_CHANNEL,
                map=pb.AttributionMap(shape=[1, 2, 2], data=data[:1].tobytes()),
                reliability=pb.Reliability(undefined_reason="constant map"),
                forward_passes=1,
            ),
        ],
        timings=[
            pb.StageTiming(stage="decode", seconds=0.01),
            pb.StageTiming(stage="total", seconds=1.5),
        ],
        forward_passes={"predict": 1, "attribute": 26, "apem_filter": 9},
        device_calls=2.5,
    )


def _without(message: pb.ExplainResponse, want_array: bool, want_png: bool) -> pb.ExplainResponse:
    """``message`` as the engine's converter sends it for that encoding."""
    copy = pb.ExplainResponse()
    copy.CopyFrom(message)
    for explanation in copy.explanations:
        for attribution in (explanation.map, explanation.filtered.map):
            if not want_array:
                attribution.data = b""
            if not want_png:
                attribution.png_overlay = b""
        if not explanation.filtered.map.shape:
            explanation.ClearField("filtered")
    return copy


@pytest.mark.parametrize("want_array, want_png", [(True, False), (False, True), (True, True)])
def test_response_survives_the_trip_through_plain_types(want_array: bool, want_png: bool) -> None:
    message = _without(_full_response(), want_array, want_png)
    result = reverse_convert.result_from_proto(message)
    assert convert.response_to_proto(result, want_array, want_png) == message
    assert result.forward_passes == {"predict": 1, "attribute": 26, "apem_filter": 9}
    assert result.device_calls == 2.5
    assert result.explanations[0].reliability.apem_norm == pytest.approx(0.7)
    assert result.explanations[1].reliability.apem_norm is None


def test_models_survive_the_trip() -> None:
    message = pb.ListModelsResponse(
        models=[
            pb.ModelInfo(
                name="broken",
                version="1",
                status=pb.MODEL_FAILED,
                status_reason="broken/weights.pt: weights file not found",
            ),
            pb.ModelInfo(
                name="demo",
                version="2",
                input_shape=[3, 64, 64],
                labels=["a", "b"],
                methods=[pb.SALIENCY, pb.GRAD_CAM],
                cam_layer="features.3",
                forward_backend="onnxruntime",
                onnx_status="",
                calibrated=True,
                gad_class_pairs=["a,b"],
                unsupported_methods=["lime: no"],
                onnx_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                status=pb.MODEL_AVAILABLE,
                device="cuda:1",
            ),
        ]
    )
    plain = reverse_convert.models_from_proto(message)
    assert [(m.status, m.status_reason) for m in plain] == [
        ("FAILED", "broken/weights.pt: weights file not found"),
        ("AVAILABLE", ""),
    ]
    assert [m.device for m in plain] == ["", "cuda:1"]
    assert convert.models_to_proto(plain) == message


def test_request_without_any_map_representation_is_refused() -> None:
    plain = convert.request_from_proto(_full_requests()[2])
    with pytest.raises(ValueError, match="float32 data, PNG"):
        reverse_convert.request_to_proto(replace(plain, want_array=False, want_png=False))
