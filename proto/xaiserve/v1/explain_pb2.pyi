from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    SALIENCY: _ClassVar[Method]
    INPUT_X_GRADIENT: _ClassVar[Method]
    SMOOTHGRAD: _ClassVar[Method]
    INTEGRATED_GRADIENTS: _ClassVar[Method]
    GRAD_CAM: _ClassVar[Method]
    OCCLUSION: _ClassVar[Method]

class MapStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MAP_STAGE_UNSPECIFIED: _ClassVar[MapStage]
    RAW: _ClassVar[MapStage]
    ONE_CHANNEL: _ClassVar[MapStage]
    TIMES_IMAGE: _ClassVar[MapStage]

class MapEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MAP_ENCODING_UNSPECIFIED: _ClassVar[MapEncoding]
    FLOAT32: _ClassVar[MapEncoding]
    PNG_OVERLAY: _ClassVar[MapEncoding]
    FLOAT32_AND_PNG: _ClassVar[MapEncoding]

class FilterMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FILTER_MODE_UNSPECIFIED: _ClassVar[FilterMode]
    FAST: _ClassVar[FilterMode]
    EXACT: _ClassVar[FilterMode]
METHOD_UNSPECIFIED: Method
SALIENCY: Method
INPUT_X_GRADIENT: Method
SMOOTHGRAD: Method
INTEGRATED_GRADIENTS: Method
GRAD_CAM: Method
OCCLUSION: Method
MAP_STAGE_UNSPECIFIED: MapStage
RAW: MapStage
ONE_CHANNEL: MapStage
TIMES_IMAGE: MapStage
MAP_ENCODING_UNSPECIFIED: MapEncoding
FLOAT32: MapEncoding
PNG_OVERLAY: MapEncoding
FLOAT32_AND_PNG: MapEncoding
FILTER_MODE_UNSPECIFIED: FilterMode
FAST: FilterMode
EXACT: FilterMode

class Tensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "tensor")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    tensor: Tensor
    def __init__(self, encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SmoothGradParams(_message.Message):
    __slots__ = ("samples", "noise_level", "seed")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NOISE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    samples: int
    noise_level: float
    seed: int
    def __init__(self, samples: _Optional[int] = ..., noise_level: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class IntegratedGradientsParams(_message.Message):
    __slots__ = ("steps", "baseline")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    steps: int
    baseline: float
    def __init__(self, steps: _Optional[int] = ..., baseline: _Optional[float] = ...) -> None: ...

class OcclusionParams(_message.Message):
    __slots__ = ("window", "stride", "baseline")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    window: int
    stride: int
    baseline: float
    def __init__(self, window: _Optional[int] = ..., stride: _Optional[int] = ..., baseline: _Optional[float] = ...) -> None: ...

class GradCamParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReliabilityOptions(_message.Message):
    __slots__ = ("enabled", "eps_max", "resolution", "shuffles", "clamp")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    EPS_MAX_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    SHUFFLES_FIELD_NUMBER: _ClassVar[int]
    CLAMP_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    eps_max: float
    resolution: float
    shuffles: int
    clamp: bool
    def __init__(self, enabled: _Optional[bool] = ..., eps_max: _Optional[float] = ..., resolution: _Optional[float] = ..., shuffles: _Optional[int] = ..., clamp: _Optional[bool] = ...) -> None: ...

class FilterOptions(_message.Message):
    __slots__ = ("enabled", "mode", "forward_budget")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    FORWARD_BUDGET_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    mode: FilterMode
    forward_budget: int
    def __init__(self, enabled: _Optional[bool] = ..., mode: _Optional[_Union[FilterMode, str]] = ..., forward_budget: _Optional[int] = ...) -> None: ...

class MethodRequest(_message.Message):
    __slots__ = ("method", "stage", "smoothgrad", "integrated_gradients", "occlusion", "grad_cam", "reliability", "filter")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SMOOTHGRAD_FIELD_NUMBER: _ClassVar[int]
    INTEGRATED_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_FIELD_NUMBER: _ClassVar[int]
    GRAD_CAM_FIELD_NUMBER: _ClassVar[int]
    RELIABILITY_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    method: Method
    stage: MapStage
    smoothgrad: SmoothGradParams
    integrated_gradients: IntegratedGradientsParams
    occlusion: OcclusionParams
    grad_cam: GradCamParams
    reliability: ReliabilityOptions
    filter: FilterOptions
    def __init__(self, method: _Optional[_Union[Method, str]] = ..., stage: _Optional[_Union[MapStage, str]] = ..., smoothgrad: _Optional[_Union[SmoothGradParams, _Mapping]] = ..., integrated_gradients: _Optional[_Union[IntegratedGradientsParams, _Mapping]] = ..., occlusion: _Optional[_Union[OcclusionParams, _Mapping]] = ..., grad_cam: _Optional[_Union[GradCamParams, _Mapping]] = ..., reliability: _Optional[_Union[ReliabilityOptions, _Mapping]] = ..., filter: _Optional[_Union[FilterOptions, _Mapping]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "image", "target", "methods", "top_k", "map_encoding")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAP_ENCODING_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    image: Image
    target: int
    methods: _containers.RepeatedCompositeFieldContainer[MethodRequest]
    top_k: int
    map_encoding: MapEncoding
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., target: _Optional[int] = ..., methods: _Optional[_Iterable[_Union[MethodRequest, _Mapping]]] = ..., top_k: _Optional[int] = ..., map_encoding: _Optional[_Union[MapEncoding, str]] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "label", "probability", "logit")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    probability: float
    logit: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ..., logit: _Optional[float] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("top_k", "target")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    top_k: _containers.RepeatedCompositeFieldContainer[ClassScore]
    target: ClassScore
    def __init__(self, top_k: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., target: _Optional[_Union[ClassScore, _Mapping]] = ...) -> None: ...

class AttributionMap(_message.Message):
    __slots__ = ("shape", "data", "png_overlay")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PNG_OVERLAY_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    png_overlay: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., png_overlay: _Optional[bytes] = ...) -> None: ...

class Reliability(_message.Message):
    __slots__ = ("eps_minus", "eps_plus", "apem", "apem_norm", "resolution", "eps_minus_censored", "eps_plus_censored", "forward_passes", "undefined_reason")
    EPS_MINUS_FIELD_NUMBER: _ClassVar[int]
    EPS_PLUS_FIELD_NUMBER: _ClassVar[int]
    APEM_FIELD_NUMBER: _ClassVar[int]
    APEM_NORM_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    EPS_MINUS_CENSORED_FIELD_NUMBER: _ClassVar[int]
    EPS_PLUS_CENSORED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    UNDEFINED_REASON_FIELD_NUMBER: _ClassVar[int]
    eps_minus: float
    eps_plus: float
    apem: float
    apem_norm: float
    resolution: float
    eps_minus_censored: bool
    eps_plus_censored: bool
    forward_passes: int
    undefined_reason: str
    def __init__(self, eps_minus: _Optional[float] = ..., eps_plus: _Optional[float] = ..., apem: _Optional[float] = ..., apem_norm: _Optional[float] = ..., resolution: _Optional[float] = ..., eps_minus_censored: _Optional[bool] = ..., eps_plus_censored: _Optional[bool] = ..., forward_passes: _Optional[int] = ..., undefined_reason: _Optional[str] = ...) -> None: ...

class FilteredMap(_message.Message):
    __slots__ = ("map", "kept_fraction", "apem_before", "apem_after", "forward_passes")
    MAP_FIELD_NUMBER: _ClassVar[int]
    KEPT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    APEM_BEFORE_FIELD_NUMBER: _ClassVar[int]
    APEM_AFTER_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    map: AttributionMap
    kept_fraction: float
    apem_before: float
    apem_after: float
    forward_passes: int
    def __init__(self, map: _Optional[_Union[AttributionMap, _Mapping]] = ..., kept_fraction: _Optional[float] = ..., apem_before: _Optional[float] = ..., apem_after: _Optional[float] = ..., forward_passes: _Optional[int] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    seconds: float
    def __init__(self, stage: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("method", "stage", "map", "reliability", "filtered", "forward_passes", "timings")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    RELIABILITY_FIELD_NUMBER: _ClassVar[int]
    FILTERED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    method: Method
    stage: MapStage
    map: AttributionMap
    reliability: Reliability
    filtered: FilteredMap
    forward_passes: int
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    def __init__(self, method: _Optional[_Union[Method, str]] = ..., stage: _Optional[_Union[MapStage, str]] = ..., map: _Optional[_Union[AttributionMap, _Mapping]] = ..., reliability: _Optional[_Union[Reliability, _Mapping]] = ..., filtered: _Optional[_Union[FilteredMap, _Mapping]] = ..., forward_passes: _Optional[int] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "prediction", "explanations", "timings")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    prediction: Prediction
    explanations: _containers.RepeatedCompositeFieldContainer[Explanation]
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., prediction: _Optional[_Union[Prediction, _Mapping]] = ..., explanations: _Optional[_Iterable[_Union[Explanation, _Mapping]]] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "input_shape", "labels", "methods", "cam_layer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    CAM_LAYER_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    methods: _containers.RepeatedScalarFieldContainer[Method]
    cam_layer: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., labels: _Optional[_Iterable[str]] = ..., methods: _Optional[_Iterable[_Union[Method, str]]] = ..., cam_layer: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
