"""The directions :mod:`xaiserve.api.convert` does not cover: plain request -> protobuf,
protobuf response -> plain result.

Only the TorchServe backend needs them: the servicer hands every backend a plain
:class:`~xaiserve.api.types.ExplainRequest` and expects an
:class:`~xaiserve.api.types.ExplainResult`, while TorchServe carries the API's
protobuf messages. Both directions are exact inverses on what the other module produces::

    request_from_proto(request_to_proto(plain)) == plain
    response_to_proto(result_from_proto(message), ...) == message

(float32 and float64 values survive the trip through Python floats unchanged, map data is
copied byte for byte). Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf.message import Message

from xaiserve.api.catalog import METHOD_NAMES, METHOD_VALUES
from xaiserve.api.types import (
    MODEL_AVAILABLE,
    MODEL_FAILED,
    ClassScore,
    EncodedImage,
    ExplainRequest,
    ExplainResult,
    Explanation,
    FilteredRecord,
    MethodRequest,
    ModelInfo,
    Prediction,
    ReliabilityRecord,
)
from xaiserve.api.v1 import explain_pb2 as pb

# (want_array, want_png) -> map_encoding
_ENCODINGS: dict[tuple[bool, bool], pb.MapEncoding] = {
    (True, False): pb.FLOAT32,
    (False, True): pb.PNG_OVERLAY,
    (True, True): pb.FLOAT32_AND_PNG,
}
_FORWARD_BACKENDS: dict[str, pb.ForwardBackend] = {
    "": pb.FORWARD_BACKEND_UNSPECIFIED,
    "torch": pb.TORCH,
    "onnxruntime": pb.ONNXRUNTIME,
}


def _enum_name(enum: Any, value: int) -> str:
    return str(enum.Name(value)).lower()


# ----------------------------------------------------------------------------- requests


def request_to_proto(request: ExplainRequest) -> pb.ExplainRequest:
    """The ``ExplainRequest`` message that ``request_from_proto`` turns into ``request``.

    Raises:
        ValueError: ``request`` holds something no message converts to (no map
            representation wanted, an unknown method, stage or backend name).
    """
    encoding = _ENCODINGS.get((request.want_array, request.want_png))
    if encoding is None:
        raise ValueError("a request wants the maps as float32 data, PNG overlays or both")
    message = pb.ExplainRequest(
        model_name=request.model,
        model_version=request.version,
        methods=[_method_to_proto(m) for m in request.methods],
        map_encoding=encoding,
        forward_backend=_FORWARD_BACKENDS[request.forward_backend],
    )
    if isinstance(request.image, EncodedImage):
        message.image.encoded = request.image.data
    else:
        message.image.tensor.shape.extend(request.image.shape)
        message.image.tensor.data = request.image.data
    if request.target is not None:
        message.target = request.target
    if request.top_k is not None:
        message.top_k = request.top_k
    return message


def _method_to_proto(method: MethodRequest) -> pb.MethodRequest:
    message = pb.MethodRequest(
        method=METHOD_VALUES[method.name], stage=pb.MapStage.Value(method.stage.upper())
    )
    if method.params:
        params_to_proto(method.params, getattr(message, method.params_field or method.name))
    if method.reliability is not None:
        options = message.reliability
        options.enabled = True
        options.clamp = method.reliability.clamp
        if method.reliability.eps_max is not None:
            options.eps_max = method.reliability.eps_max
        if method.reliability.resolution is not None:
            options.resolution = method.reliability.resolution
        if method.reliability.shuffles is not None:
            options.shuffles = method.reliability.shuffles
    if method.filter is not None:
        message.filter.enabled = True
        message.filter.mode = pb.FilterMode.Value(method.filter.mode.upper())
        if method.filter.forward_budget is not None:
            message.filter.forward_budget = method.filter.forward_budget
    if method.gad:
        message.gad.enabled = True
    return message


def params_to_proto(params: Mapping[str, Any], message: Message) -> None:
    """Sets ``message``'s fields from a dict made by ``convert.params_from_proto``.

    Sub-messages come as dicts, repeated fields as lists, enum values as their lower-case
    names.
    """
    message.SetInParent()
    for name, value in params.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if field.is_repeated:
            for item in value:
                if field.message_type is not None:
                    params_to_proto(item, target.add())
                else:
                    target.append(_scalar(field, item))
        elif field.message_type is not None:
            params_to_proto(value, target)
        else:
            setattr(message, name, _scalar(field, value))


def _scalar(field: Any, value: Any) -> Any:
    if field.enum_type is not None:
        return field.enum_type.values_by_name[str(value).upper()].number
    return value


# ---------------------------------------------------------------------------- responses


def result_from_proto(message: pb.ExplainResponse) -> ExplainResult:
    """The :class:`ExplainResult` that ``response_to_proto`` turns into ``message``.

    A map sent without float data (PNG only) becomes a read-only array of zeros of its
    shape, which is all ``response_to_proto`` reads of it then.
    """
    return ExplainResult(
        model=message.model_name,
        version=message.model_version,
        prediction=Prediction(
            top_k=tuple(_class_score(s) for s in message.prediction.top_k),
            target=_class_score(message.prediction.target),
        ),
        explanations=tuple(_explanation(e) for e in message.explanations),
        timings=_timings(message.timings),
        forward_passes=dict(message.forward_passes),
        device_calls=message.device_calls,
    )


def _class_score(score: pb.ClassScore) -> ClassScore:
    return ClassScore(
        index=score.index, label=score.label, probability=score.probability, logit=score.logit
    )


def _timings(timings: Any) -> dict[str, float]:
    return {t.stage: t.seconds for t in timings}


def map_from_proto(attribution: pb.AttributionMap) -> np.ndarray:
    """The float32 map of an ``AttributionMap`` (zeros when it carries no data)."""
    shape = tuple(int(d) for d in attribution.shape)
    if not attribution.data:
        return np.broadcast_to(np.float32(0.0), shape)
    return np.frombuffer(attribution.data, dtype="<f4").reshape(shape)


def _explanation(message: pb.Explanation) -> Explanation:
    reliability = None
    if message.HasField("reliability"):
        r = message.reliability
        reliability = ReliabilityRecord(
            eps_minus=r.eps_minus,
            eps_plus=r.eps_plus,
            apem=r.apem,
            resolution=r.resolution,
            eps_minus_censored=r.eps_minus_censored,
            eps_plus_censored=r.eps_plus_censored,
            forward_passes=r.forward_passes,
            apem_norm=r.apem_norm if r.HasField("apem_norm") else None,
            undefined_reason=r.undefined_reason,
        )
    filtered = None
    if message.HasField("filtered"):
        f = message.filtered
        filtered = FilteredRecord(
            map=map_from_proto(f.map),
            kept_fraction=f.kept_fraction,
            apem_before=f.apem_before,
            apem_after=f.apem_after,
            forward_passes=f.forward_passes,
            png=f.map.png_overlay or None,
        )
    return Explanation(
        method=METHOD_NAMES[message.method],
        stage=_enum_name(pb.MapStage, message.stage),
        map=map_from_proto(message.map),
        forward_passes=message.forward_passes,
        timings=_timings(message.timings),
        png=message.map.png_overlay or None,
        reliability=reliability,
        filtered=filtered,
    )


def models_from_proto(message: pb.ListModelsResponse) -> list[ModelInfo]:
    """The plain models of a ``ListModelsResponse`` (inverse of ``models_to_proto``)."""
    return [
        ModelInfo(
            name=m.name,
            version=m.version,
            input_shape=tuple(int(d) for d in m.input_shape),
            labels=tuple(m.labels),
            methods=tuple(METHOD_NAMES[v] for v in m.methods if v in METHOD_NAMES),
            cam_layer=m.cam_layer,
            forward_backend=m.forward_backend,
            onnx_status=m.onnx_status,
            onnx_providers=tuple(m.onnx_providers),
            calibrated=m.calibrated,
            gad_class_pairs=tuple(m.gad_class_pairs),
            unsupported_methods=tuple(m.unsupported_methods),
            status=MODEL_FAILED if m.status == pb.MODEL_FAILED else MODEL_AVAILABLE,
            status_reason=m.status_reason,
            device=m.device,
        )
        for m in message.models
    ]
