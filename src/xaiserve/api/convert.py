"""Protobuf <-> plain engine types.

Pure functions, no I/O and no tensor math: the public API messages of
``xaiserve.api.v1.explain_pb2`` become the dataclasses of :mod:`xaiserve.api.types` and
back. Malformed requests raise :class:`~xaiserve.api.errors.InvalidArgument` naming the
request field (``"methods[1].method"``); range checks of values are the engine's job.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from xaiserve.api.catalog import METHOD_NAMES, METHOD_VALUES
from xaiserve.api.errors import InvalidArgument
from xaiserve.api.types import (
    MODEL_AVAILABLE,
    MODEL_FAILED,
    STAGES,
    EncodedImage,
    ExplainRequest,
    ExplainResult,
    Explanation,
    FilteredRecord,
    FilterRequest,
    MethodRequest,
    ModelInfo,
    RawTensor,
    ReliabilityRecord,
    ReliabilityRequest,
)
from xaiserve.api.types import ClassScore as PlainClassScore
from xaiserve.api.v1 import explain_pb2 as pb

_STAGE_NAMES: dict[int, str] = {
    pb.MAP_STAGE_UNSPECIFIED: "one_channel",
    pb.RAW: "raw",
    pb.ONE_CHANNEL: "one_channel",
    pb.TIMES_IMAGE: "times_image",
    pb.THREE_CHANNEL: "three_channel",
}
_STAGE_VALUES: dict[str, pb.MapStage] = {name: pb.MapStage.Value(name.upper()) for name in STAGES}

# map_encoding -> (want_array, want_png)
_ENCODINGS: dict[int, tuple[bool, bool]] = {
    pb.MAP_ENCODING_UNSPECIFIED: (True, False),
    pb.FLOAT32: (True, False),
    pb.PNG_OVERLAY: (False, True),
    pb.FLOAT32_AND_PNG: (True, True),
}

_FILTER_MODES: dict[int, str] = {
    pb.FILTER_MODE_UNSPECIFIED: "fast",
    pb.FAST: "fast",
    pb.EXACT: "exact",
}


# ----------------------------------------------------------------------------- requests


_FORWARD_BACKENDS = {
    pb.FORWARD_BACKEND_UNSPECIFIED: "",
    pb.TORCH: "torch",
    pb.ONNXRUNTIME: "onnxruntime",
}


def request_from_proto(request: pb.ExplainRequest) -> ExplainRequest:
    """Converts an ``ExplainRequest`` message to the engine's :class:`ExplainRequest`.

    Only structure is checked here (enum values, the image's presence, which parameter
    message goes with which method); values are validated by the engine.

    Raises:
        InvalidArgument: naming the field, e.g. ``"methods[0].method"``.
    """
    if request.map_encoding not in _ENCODINGS:
        raise InvalidArgument("map_encoding", f"unknown MapEncoding value {request.map_encoding}")
    want_array, want_png = _ENCODINGS[request.map_encoding]
    backend = _FORWARD_BACKENDS.get(request.forward_backend)
    if backend is None:
        raise InvalidArgument(
            "forward_backend", f"unknown ForwardBackend value {request.forward_backend}"
        )
    return ExplainRequest(
        model=request.model_name,
        version=request.model_version,
        image=_image_from_proto(request),
        methods=tuple(_method_from_proto(m, i) for i, m in enumerate(request.methods)),
        target=request.target if request.HasField("target") else None,
        top_k=request.top_k if request.HasField("top_k") else None,
        want_array=want_array,
        want_png=want_png,
        forward_backend=backend,
    )


def _image_from_proto(request: pb.ExplainRequest) -> EncodedImage | RawTensor:
    if not request.HasField("image"):
        raise InvalidArgument("image", "required: give encoded bytes or a tensor")
    source = request.image.WhichOneof("source")
    if source == "encoded":
        if not request.image.encoded:
            raise InvalidArgument("image.encoded", "empty")
        return EncodedImage(data=request.image.encoded)
    if source == "tensor":
        tensor = request.image.tensor
        return RawTensor(shape=tuple(int(d) for d in tensor.shape), data=tensor.data)
    raise InvalidArgument("image", "required: give encoded bytes or a tensor")


def _method_from_proto(method: pb.MethodRequest, index: int) -> MethodRequest:
    field = f"methods[{index}]"
    name = METHOD_NAMES.get(method.method)
    if name is None:
        if method.method == pb.METHOD_UNSPECIFIED:
            raise InvalidArgument(f"{field}.method", "required: METHOD_UNSPECIFIED is not a method")
        raise InvalidArgument(f"{field}.method", f"unknown Method value {method.method}")
    stage = _STAGE_NAMES.get(method.stage)
    if stage is None:
        raise InvalidArgument(f"{field}.stage", f"unknown MapStage value {method.stage}")

    params_field = method.WhichOneof("params")
    params: dict[str, Any] = {}
    if params_field is not None:
        if params_field != name:
            raise InvalidArgument(
                f"{field}.{params_field}",
                f"parameters for {params_field.upper()} given to method {name.upper()}",
            )
        params = params_from_proto(getattr(method, params_field), f"{field}.{params_field}")

    reliability = method.reliability
    return MethodRequest(
        name=name,
        params=params,
        stage=stage,
        reliability=_reliability_from_proto(reliability) if reliability.enabled else None,
        filter=_filter_from_proto(method.filter, field) if method.filter.enabled else None,
        field=field,
        params_field=params_field or name,
        gad=method.gad.enabled,
    )


def _set_fields(message: Message) -> dict[str, Any]:
    """The fields of ``message`` that have presence and were set, by proto field name."""
    return {
        f.name: getattr(message, f.name)
        for f in message.DESCRIPTOR.fields
        if f.has_presence and message.HasField(f.name)
    }


def params_from_proto(message: Message, path: str) -> dict[str, Any]:
    """The parameters the client set in a parameter message, by proto field name.

    Optional scalars and sub-messages count when set (``HasField``, so an explicit 0 is
    kept); scalars without presence and repeated fields when they differ from their default
    (non-zero, non-empty). Sub-messages become dicts, enum values their lower-case names
    (``Method`` values are so the registry names, ``LrpRule.ALPHA_BETA`` is ``"alpha_beta"``)
    and repeated fields lists.

    Raises:
        InvalidArgument: an unknown or UNSPECIFIED enum value, named by ``path``.
    """
    params: dict[str, Any] = {}
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        where = f"{path}.{f.name}"
        if f.is_repeated:
            if len(value):
                params[f.name] = [_param(f, v, f"{where}[{j}]") for j, v in enumerate(value)]
        elif f.has_presence:
            if message.HasField(f.name):
                params[f.name] = _param(f, value, where)
        elif value != f.default_value:
            params[f.name] = _param(f, value, where)
    return params


def _param(f: FieldDescriptor, value: Any, where: str) -> Any:
    if f.message_type is not None:
        return params_from_proto(value, where)
    if f.enum_type is not None:
        enum_value = f.enum_type.values_by_number.get(value)
        if enum_value is None:
            raise InvalidArgument(where, f"unknown {f.enum_type.name} value {value}")
        if value == 0:
            raise InvalidArgument(where, f"{enum_value.name} is not a {f.enum_type.name}")
        return enum_value.name.lower()
    return value


def _reliability_from_proto(options: pb.ReliabilityOptions) -> ReliabilityRequest:
    given = _set_fields(options)
    return ReliabilityRequest(
        eps_max=given.get("eps_max"),
        resolution=given.get("resolution"),
        shuffles=given.get("shuffles"),
        clamp=options.clamp,
    )


def _filter_from_proto(options: pb.FilterOptions, field: str) -> FilterRequest:
    mode = _FILTER_MODES.get(options.mode)
    if mode is None:
        raise InvalidArgument(f"{field}.filter.mode", f"unknown FilterMode value {options.mode}")
    budget = options.forward_budget if options.HasField("forward_budget") else None
    return FilterRequest(mode=mode, forward_budget=budget)


# ---------------------------------------------------------------------------- responses


def response_to_proto(
    result: ExplainResult, want_array: bool, want_png: bool
) -> pb.ExplainResponse:
    """Converts the engine's :class:`ExplainResult` to an ``ExplainResponse`` message.

    Maps are float32 arrays (C x H x W or 1 x H x W); their data is sent as little-endian
    float32 bytes when ``want_array`` and their PNG overlay when ``want_png``. The shape is
    always sent.
    """
    return pb.ExplainResponse(
        model_name=result.model,
        model_version=result.version,
        prediction=pb.Prediction(
            top_k=[_class_score(s) for s in result.prediction.top_k],
            target=_class_score(result.prediction.target),
        ),
        explanations=[_explanation(e, want_array, want_png) for e in result.explanations],
        timings=timings_to_proto(result.timings),
        forward_passes={stage: int(n) for stage, n in result.forward_passes.items()},
        device_calls=float(result.device_calls),
    )


def timings_to_proto(timings: Mapping[str, float]) -> list[pb.StageTiming]:
    """``{"decode": 0.01, ...}`` -> repeated ``StageTiming``, in the dict's order."""
    return [pb.StageTiming(stage=stage, seconds=float(s)) for stage, s in timings.items()]


def _class_score(score: PlainClassScore) -> pb.ClassScore:
    return pb.ClassScore(
        index=score.index, label=score.label, probability=score.probability, logit=score.logit
    )


def map_to_proto(
    array: np.ndarray, png: bytes | None, want_array: bool, want_png: bool
) -> pb.AttributionMap:
    """One map (float32, C x H x W or 1 x H x W) as an ``AttributionMap``."""
    return pb.AttributionMap(
        shape=[int(d) for d in array.shape],
        data=np.asarray(array).astype("<f4", copy=False).tobytes() if want_array else b"",
        png_overlay=(png or b"") if want_png else b"",
    )


def _explanation(explanation: Explanation, want_array: bool, want_png: bool) -> pb.Explanation:
    message = pb.Explanation(
        method=METHOD_VALUES[explanation.method],
        stage=_STAGE_VALUES[explanation.stage],
        map=map_to_proto(explanation.map, explanation.png, want_array, want_png),
        forward_passes=explanation.forward_passes,
        timings=timings_to_proto(explanation.timings),
    )
    if explanation.reliability is not None:
        message.reliability.CopyFrom(_reliability(explanation.reliability))
    if explanation.filtered is not None:
        message.filtered.CopyFrom(_filtered(explanation.filtered, want_array, want_png))
    return message


def _reliability(record: ReliabilityRecord) -> pb.Reliability:
    message = pb.Reliability(
        eps_minus=record.eps_minus,
        eps_plus=record.eps_plus,
        apem=record.apem,
        resolution=record.resolution,
        eps_minus_censored=record.eps_minus_censored,
        eps_plus_censored=record.eps_plus_censored,
        forward_passes=record.forward_passes,
        undefined_reason=record.undefined_reason,
    )
    if record.apem_norm is not None:
        message.apem_norm = record.apem_norm
    return message


def _filtered(record: FilteredRecord, want_array: bool, want_png: bool) -> pb.FilteredMap:
    return pb.FilteredMap(
        map=map_to_proto(record.map, record.png, want_array, want_png),
        kept_fraction=record.kept_fraction,
        apem_before=record.apem_before,
        apem_after=record.apem_after,
        forward_passes=record.forward_passes,
    )


# ------------------------------------------------------------------------------- models


#: ``ModelStatus`` value of each ``ModelInfo.status``.
MODEL_STATUS_VALUES: dict[str, pb.ModelStatus] = {
    MODEL_AVAILABLE: pb.MODEL_AVAILABLE,
    MODEL_FAILED: pb.MODEL_FAILED,
}


def models_to_proto(models: Iterable[ModelInfo]) -> pb.ListModelsResponse:
    """The served models as a ``ListModelsResponse``, sorted by name.

    Methods the proto does not know (an engine ahead of the API) are left out.
    """
    return pb.ListModelsResponse(
        models=[
            pb.ModelInfo(
                name=m.name,
                version=m.version,
                input_shape=list(m.input_shape),
                labels=list(m.labels),
                methods=[METHOD_VALUES[n] for n in m.methods if n in METHOD_VALUES],
                cam_layer=m.cam_layer,
                forward_backend=m.forward_backend,
                onnx_status=m.onnx_status,
                onnx_providers=list(m.onnx_providers),
                calibrated=m.calibrated,
                gad_class_pairs=list(m.gad_class_pairs),
                unsupported_methods=list(m.unsupported_methods),
                status=MODEL_STATUS_VALUES[m.status],
                status_reason=m.status_reason,
                device=m.device,
            )
            for m in sorted(models, key=lambda m: (m.name, m.version))
        ]
    )
