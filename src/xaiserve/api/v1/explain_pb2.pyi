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
    GUIDED_BACKPROP: _ClassVar[Method]
    DECONVOLUTION: _ClassVar[Method]
    DEEPLIFT: _ClassVar[Method]
    LRP: _ClassVar[Method]
    GRAD_CAM_PLUS_PLUS: _ClassVar[Method]
    XGRAD_CAM: _ClassVar[Method]
    HIRES_CAM: _ClassVar[Method]
    LAYER_CAM: _ClassVar[Method]
    FULLGRAD: _ClassVar[Method]
    GUIDED_GRAD_CAM: _ClassVar[Method]
    VARGRAD: _ClassVar[Method]
    LIME: _ClassVar[Method]
    KERNEL_SHAP: _ClassVar[Method]
    SCORE_CAM: _ClassVar[Method]
    RISE: _ClassVar[Method]
    S_GRAD_CAM: _ClassVar[Method]
    S_XGRAD_CAM: _ClassVar[Method]
    S_GRAD_CAM_PLUS_PLUS: _ClassVar[Method]
    S_GRAD_CAM_PIXEL: _ClassVar[Method]
    ATTENTION_ROLLOUT: _ClassVar[Method]
    AUTO: _ClassVar[Method]

class MapStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MAP_STAGE_UNSPECIFIED: _ClassVar[MapStage]
    RAW: _ClassVar[MapStage]
    ONE_CHANNEL: _ClassVar[MapStage]
    TIMES_IMAGE: _ClassVar[MapStage]
    THREE_CHANNEL: _ClassVar[MapStage]

class ForwardBackend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FORWARD_BACKEND_UNSPECIFIED: _ClassVar[ForwardBackend]
    TORCH: _ClassVar[ForwardBackend]
    ONNXRUNTIME: _ClassVar[ForwardBackend]

class LrpRule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LRP_RULE_UNSPECIFIED: _ClassVar[LrpRule]
    EPSILON: _ClassVar[LrpRule]
    ALPHA_BETA: _ClassVar[LrpRule]

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

class ModelStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATUS_UNSPECIFIED: _ClassVar[ModelStatus]
    MODEL_AVAILABLE: _ClassVar[ModelStatus]
    MODEL_FAILED: _ClassVar[ModelStatus]
METHOD_UNSPECIFIED: Method
SALIENCY: Method
INPUT_X_GRADIENT: Method
SMOOTHGRAD: Method
INTEGRATED_GRADIENTS: Method
GRAD_CAM: Method
OCCLUSION: Method
GUIDED_BACKPROP: Method
DECONVOLUTION: Method
DEEPLIFT: Method
LRP: Method
GRAD_CAM_PLUS_PLUS: Method
XGRAD_CAM: Method
HIRES_CAM: Method
LAYER_CAM: Method
FULLGRAD: Method
GUIDED_GRAD_CAM: Method
VARGRAD: Method
LIME: Method
KERNEL_SHAP: Method
SCORE_CAM: Method
RISE: Method
S_GRAD_CAM: Method
S_XGRAD_CAM: Method
S_GRAD_CAM_PLUS_PLUS: Method
S_GRAD_CAM_PIXEL: Method
ATTENTION_ROLLOUT: Method
AUTO: Method
MAP_STAGE_UNSPECIFIED: MapStage
RAW: MapStage
ONE_CHANNEL: MapStage
TIMES_IMAGE: MapStage
THREE_CHANNEL: MapStage
FORWARD_BACKEND_UNSPECIFIED: ForwardBackend
TORCH: ForwardBackend
ONNXRUNTIME: ForwardBackend
LRP_RULE_UNSPECIFIED: LrpRule
EPSILON: LrpRule
ALPHA_BETA: LrpRule
MAP_ENCODING_UNSPECIFIED: MapEncoding
FLOAT32: MapEncoding
PNG_OVERLAY: MapEncoding
FLOAT32_AND_PNG: MapEncoding
FILTER_MODE_UNSPECIFIED: FilterMode
FAST: FilterMode
EXACT: FilterMode
MODEL_STATUS_UNSPECIFIED: ModelStatus
MODEL_AVAILABLE: ModelStatus
MODEL_FAILED: ModelStatus

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
    __slots__ = ("window", "stride", "baseline", "adaptive")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    window: int
    stride: int
    baseline: float
    adaptive: AdaptiveOcclusion
    def __init__(self, window: _Optional[int] = ..., stride: _Optional[int] = ..., baseline: _Optional[float] = ..., adaptive: _Optional[_Union[AdaptiveOcclusion, _Mapping]] = ...) -> None: ...

class GradCamParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdaptiveOcclusion(_message.Message):
    __slots__ = ("enabled", "coarse_window", "refine_fraction")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    COARSE_WINDOW_FIELD_NUMBER: _ClassVar[int]
    REFINE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    coarse_window: int
    refine_fraction: float
    def __init__(self, enabled: _Optional[bool] = ..., coarse_window: _Optional[int] = ..., refine_fraction: _Optional[float] = ...) -> None: ...

class DeepLiftParams(_message.Message):
    __slots__ = ("baseline",)
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    baseline: float
    def __init__(self, baseline: _Optional[float] = ...) -> None: ...

class LrpParams(_message.Message):
    __slots__ = ("rule", "epsilon", "alpha")
    RULE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    rule: LrpRule
    epsilon: float
    alpha: float
    def __init__(self, rule: _Optional[_Union[LrpRule, str]] = ..., epsilon: _Optional[float] = ..., alpha: _Optional[float] = ...) -> None: ...

class SurrogateParams(_message.Message):
    __slots__ = ("samples", "segments", "baseline", "seed")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    samples: int
    segments: int
    baseline: float
    seed: int
    def __init__(self, samples: _Optional[int] = ..., segments: _Optional[int] = ..., baseline: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class RiseParams(_message.Message):
    __slots__ = ("masks", "cells", "keep_probability", "seed")
    MASKS_FIELD_NUMBER: _ClassVar[int]
    CELLS_FIELD_NUMBER: _ClassVar[int]
    KEEP_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    masks: int
    cells: int
    keep_probability: float
    seed: int
    def __init__(self, masks: _Optional[int] = ..., cells: _Optional[int] = ..., keep_probability: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class ScamParams(_message.Message):
    __slots__ = ("principal_fraction",)
    PRINCIPAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    principal_fraction: float
    def __init__(self, principal_fraction: _Optional[float] = ...) -> None: ...

class AutoParams(_message.Message):
    __slots__ = ("candidates",)
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedScalarFieldContainer[Method]
    def __init__(self, candidates: _Optional[_Iterable[_Union[Method, str]]] = ...) -> None: ...

class GadOptions(_message.Message):
    __slots__ = ("enabled",)
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    def __init__(self, enabled: _Optional[bool] = ...) -> None: ...

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
    __slots__ = ("method", "stage", "smoothgrad", "integrated_gradients", "occlusion", "grad_cam", "deeplift", "lrp", "vargrad", "lime", "kernel_shap", "rise", "s_grad_cam", "s_xgrad_cam", "s_grad_cam_plus_plus", "s_grad_cam_pixel", "auto", "reliability", "filter", "gad")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SMOOTHGRAD_FIELD_NUMBER: _ClassVar[int]
    INTEGRATED_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_FIELD_NUMBER: _ClassVar[int]
    GRAD_CAM_FIELD_NUMBER: _ClassVar[int]
    DEEPLIFT_FIELD_NUMBER: _ClassVar[int]
    LRP_FIELD_NUMBER: _ClassVar[int]
    VARGRAD_FIELD_NUMBER: _ClassVar[int]
    LIME_FIELD_NUMBER: _ClassVar[int]
    KERNEL_SHAP_FIELD_NUMBER: _ClassVar[int]
    RISE_FIELD_NUMBER: _ClassVar[int]
    S_GRAD_CAM_FIELD_NUMBER: _ClassVar[int]
    S_XGRAD_CAM_FIELD_NUMBER: _ClassVar[int]
    S_GRAD_CAM_PLUS_PLUS_FIELD_NUMBER: _ClassVar[int]
    S_GRAD_CAM_PIXEL_FIELD_NUMBER: _ClassVar[int]
    AUTO_FIELD_NUMBER: _ClassVar[int]
    RELIABILITY_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    GAD_FIELD_NUMBER: _ClassVar[int]
    method: Method
    stage: MapStage
    smoothgrad: SmoothGradParams
    integrated_gradients: IntegratedGradientsParams
    occlusion: OcclusionParams
    grad_cam: GradCamParams
    deeplift: DeepLiftParams
    lrp: LrpParams
    vargrad: SmoothGradParams
    lime: SurrogateParams
    kernel_shap: SurrogateParams
    rise: RiseParams
    s_grad_cam: ScamParams
    s_xgrad_cam: ScamParams
    s_grad_cam_plus_plus: ScamParams
    s_grad_cam_pixel: ScamParams
    auto: AutoParams
    reliability: ReliabilityOptions
    filter: FilterOptions
    gad: GadOptions
    def __init__(self, method: _Optional[_Union[Method, str]] = ..., stage: _Optional[_Union[MapStage, str]] = ..., smoothgrad: _Optional[_Union[SmoothGradParams, _Mapping]] = ..., integrated_gradients: _Optional[_Union[IntegratedGradientsParams, _Mapping]] = ..., occlusion: _Optional[_Union[OcclusionParams, _Mapping]] = ..., grad_cam: _Optional[_Union[GradCamParams, _Mapping]] = ..., deeplift: _Optional[_Union[DeepLiftParams, _Mapping]] = ..., lrp: _Optional[_Union[LrpParams, _Mapping]] = ..., vargrad: _Optional[_Union[SmoothGradParams, _Mapping]] = ..., lime: _Optional[_Union[SurrogateParams, _Mapping]] = ..., kernel_shap: _Optional[_Union[SurrogateParams, _Mapping]] = ..., rise: _Optional[_Union[RiseParams, _Mapping]] = ..., s_grad_cam: _Optional[_Union[ScamParams, _Mapping]] = ..., s_xgrad_cam: _Optional[_Union[ScamParams, _Mapping]] = ..., s_grad_cam_plus_plus: _Optional[_Union[ScamParams, _Mapping]] = ..., s_grad_cam_pixel: _Optional[_Union[ScamParams, _Mapping]] = ..., auto: _Optional[_Union[AutoParams, _Mapping]] = ..., reliability: _Optional[_Union[ReliabilityOptions, _Mapping]] = ..., filter: _Optional[_Union[FilterOptions, _Mapping]] = ..., gad: _Optional[_Union[GadOptions, _Mapping]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "image", "target", "methods", "top_k", "map_encoding", "forward_backend")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAP_ENCODING_FIELD_NUMBER: _ClassVar[int]
    FORWARD_BACKEND_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    image: Image
    target: int
    methods: _containers.RepeatedCompositeFieldContainer[MethodRequest]
    top_k: int
    map_encoding: MapEncoding
    forward_backend: ForwardBackend
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., target: _Optional[int] = ..., methods: _Optional[_Iterable[_Union[MethodRequest, _Mapping]]] = ..., top_k: _Optional[int] = ..., map_encoding: _Optional[_Union[MapEncoding, str]] = ..., forward_backend: _Optional[_Union[ForwardBackend, str]] = ...) -> None: ...

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
    __slots__ = ("model_name", "model_version", "prediction", "explanations", "timings", "forward_passes", "device_calls")
    class ForwardPassesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CALLS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    prediction: Prediction
    explanations: _containers.RepeatedCompositeFieldContainer[Explanation]
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    forward_passes: _containers.ScalarMap[str, int]
    device_calls: float
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., prediction: _Optional[_Union[Prediction, _Mapping]] = ..., explanations: _Optional[_Iterable[_Union[Explanation, _Mapping]]] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., forward_passes: _Optional[_Mapping[str, int]] = ..., device_calls: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "input_shape", "labels", "methods", "cam_layer", "forward_backend", "onnx_status", "calibrated", "gad_class_pairs", "unsupported_methods", "onnx_providers", "status", "status_reason", "device")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    CAM_LAYER_FIELD_NUMBER: _ClassVar[int]
    FORWARD_BACKEND_FIELD_NUMBER: _ClassVar[int]
    ONNX_STATUS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    GAD_CLASS_PAIRS_FIELD_NUMBER: _ClassVar[int]
    UNSUPPORTED_METHODS_FIELD_NUMBER: _ClassVar[int]
    ONNX_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_REASON_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    methods: _containers.RepeatedScalarFieldContainer[Method]
    cam_layer: str
    forward_backend: str
    onnx_status: str
    calibrated: bool
    gad_class_pairs: _containers.RepeatedScalarFieldContainer[str]
    unsupported_methods: _containers.RepeatedScalarFieldContainer[str]
    onnx_providers: _containers.RepeatedScalarFieldContainer[str]
    status: ModelStatus
    status_reason: str
    device: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., labels: _Optional[_Iterable[str]] = ..., methods: _Optional[_Iterable[_Union[Method, str]]] = ..., cam_layer: _Optional[str] = ..., forward_backend: _Optional[str] = ..., onnx_status: _Optional[str] = ..., calibrated: _Optional[bool] = ..., gad_class_pairs: _Optional[_Iterable[str]] = ..., unsupported_methods: _Optional[_Iterable[str]] = ..., onnx_providers: _Optional[_Iterable[str]] = ..., status: _Optional[_Union[ModelStatus, str]] = ..., status_reason: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
