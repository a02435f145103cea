"""Plain request and result objects of the engine.

The gateway converts protobuf messages to these and back; the engine, the TorchServe
handler, offline evaluation and benchmarks all speak them. Arrays are numpy float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

STAGES = ("raw", "three_channel", "one_channel", "times_image")
"""Map stages: the method's signed output, then the seed's three visualization stages
(seed 004, sections 4.2 and 4.4; see ``engine.postprocess``)."""


@dataclass(frozen=True)
class EncodedImage:
    """An encoded PNG, JPEG or WebP file."""

    data: bytes


@dataclass(frozen=True)
class RawTensor:
    """A float32 tensor in pixel space [0, 1]: C x H x W, 1 x C x H x W or H x W."""

    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class ReliabilityRequest:
    """APEM record options (seed 004); ``None`` fields take the engine defaults."""

    eps_max: float | None = None
    resolution: float | None = None
    shuffles: int | None = None
    clamp: bool = False


@dataclass(frozen=True)
class FilterRequest:
    """APEM filter options (seed 004, Algorithm 2)."""

    mode: str = "fast"  # "fast" or "exact"
    forward_budget: int | None = None


@dataclass(frozen=True)
class MethodRequest:
    """One requested method.

    ``field`` is the request path used in error messages, e.g. ``"methods[2]"``; parameter
    errors read ``"methods[2].<params_field>.<param>: ..."``.
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    stage: str = "one_channel"
    reliability: ReliabilityRequest | None = None
    filter: FilterRequest | None = None
    field: str = "methods[0]"
    params_field: str = ""
    gad: bool = False


@dataclass(frozen=True)
class ExplainRequest:
    """One image, one call."""

    model: str
    image: EncodedImage | RawTensor
    methods: tuple[MethodRequest, ...] = ()
    version: str = ""
    target: int | None = None
    top_k: int | None = None
    want_array: bool = True
    want_png: bool = False
    forward_backend: str = ""  # "" (the model's default), "torch" or "onnxruntime"


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    probability: float
    logit: float


@dataclass(frozen=True)
class Prediction:
    top_k: tuple[ClassScore, ...]
    target: ClassScore


@dataclass(frozen=True)
class ReliabilityRecord:
    """APEM of one map; eps values are L1 sizes of the perturbation in pixel space."""

    eps_minus: float
    eps_plus: float
    apem: float
    resolution: float
    eps_minus_censored: bool
    eps_plus_censored: bool
    forward_passes: int
    apem_norm: float | None = None
    undefined_reason: str = ""


@dataclass(frozen=True)
class FilteredRecord:
    """The APEM-filtered map (same stage and shape as the original)."""

    map: np.ndarray
    kept_fraction: float
    apem_before: float
    apem_after: float
    forward_passes: int
    png: bytes | None = None


@dataclass(frozen=True)
class Explanation:
    """One method's map. ``map`` is C x H x W (``raw``) or 1 x H x W, float32."""

    method: str
    stage: str
    map: np.ndarray
    forward_passes: int
    timings: dict[str, float]
    png: bytes | None = None
    reliability: ReliabilityRecord | None = None
    filtered: FilteredRecord | None = None


@dataclass(frozen=True)
class ExplainResult:
    """The answer to one request.

    forward_passes: images the model evaluated for the request, by stage.
    device_calls: this request's share of the device calls that ran its work: each call
        counts 1/k for each of the k requests packed into it.
    """

    model: str
    version: str
    prediction: Prediction
    explanations: tuple[Explanation, ...]
    timings: dict[str, float]
    forward_passes: dict[str, int] = field(default_factory=dict)  # by stage
    device_calls: float = 0.0


#: ModelInfo.status of a model that answers requests.
MODEL_AVAILABLE = "AVAILABLE"
#: ModelInfo.status of a model whose directory failed to load (reason in status_reason).
MODEL_FAILED = "FAILED"


@dataclass(frozen=True)
class ModelInfo:
    """A model as ListModels describes it; a failed one has only its name, version (when
    its config was read), status MODEL_FAILED and the reason."""

    name: str
    version: str
    input_shape: tuple[int, ...]
    labels: tuple[str, ...]
    methods: tuple[str, ...]
    cam_layer: str = ""
    forward_backend: str = "torch"
    onnx_status: str = ""
    onnx_providers: tuple[str, ...] = ()  # what the ONNX Runtime session runs on, in order
    calibrated: bool = False
    gad_class_pairs: tuple[str, ...] = ()
    unsupported_methods: tuple[str, ...] = ()  # "method: reason"
    status: str = MODEL_AVAILABLE
    status_reason: str = ""
    device: str = ""  # the torch device of its weights ("cpu", "cuda:0"); "" when failed
