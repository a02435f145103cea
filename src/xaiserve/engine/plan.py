"""The plan of a request: every method request validated, its parameters and its APEM and
filter options resolved once into typed objects, and its worst-case forward passes checked
against the limit, all before the image is decoded.

The engine runs what the plan says; nothing below it resolves a request option again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

from xaiserve.api.errors import InvalidArgument, ResourceExhausted
from xaiserve.api.types import STAGES, ExplainRequest, MethodRequest, ReliabilityRequest
from xaiserve.engine.cost import (
    GRADIENT_PASSES,
    Cost,
    check_within,
    filter_cost,
    gad_cost,
    map_entries,
    method_cost,
    reliability_cost,
)
from xaiserve.engine.gad import gad_reason
from xaiserve.engine.limits import EngineLimits
from xaiserve.methods.base import AttributionMethod
from xaiserve.methods.registry import get_method
from xaiserve.reliability.options import (
    ApemOptions,
    FilterOptions,
    resolve_filter_options,
    resolve_options,
)
from xaiserve.runtime.formats import CLASS, FORMAT_NAMES, ONNX
from xaiserve.runtime.model import ServedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedMethod:
    """A validated method request, ready to run. ``params_field`` names its parameters in
    errors (``methods[0].occlusion``, or an AUTO candidate's ``...candidates[1]``);
    ``apem_options`` are set where a reliability record or a filter is asked for,
    ``filter_options`` where a filter is."""

    request: MethodRequest
    method: AttributionMethod
    params: dict[str, Any]
    apem_options: ApemOptions | None
    ranked: bool = False  # one of AUTO's candidates
    params_field: str = ""
    filter_options: FilterOptions | None = None

    @property
    def attribution_key(self) -> tuple[str, str]:
        """The same method and parameters at another stage share one attribution."""
        return (self.method.name, repr(sorted(self.params.items())))

    @property
    def wants_record(self) -> bool:
        """A reliability record is asked for (``apem_options`` may serve a filter alone)."""
        return self.request.reliability is not None


@dataclass(frozen=True)
class Plan:
    """One group of planned methods per requested method (AUTO's candidates, or the method
    alone), and the most forward passes they may spend, the prediction's included."""

    groups: list[list[PlannedMethod]]
    max_forward_passes: int


def plan_request(request: ExplainRequest, served: ServedModel, limits: EngineLimits) -> Plan:
    """Validates every method request before any work starts; one group per request.
    A request whose worst case exceeds the forward-pass limit is refused here
    (``cost``), naming the field that costs most."""
    if len(request.methods) > limits.max_methods:
        raise ResourceExhausted(
            "methods",
            f"{len(request.methods)} methods requested; at most {limits.max_methods} per call",
        )
    n_labels = len(served.config.labels)
    if request.top_k is not None and not 1 <= request.top_k <= n_labels:
        raise InvalidArgument("top_k", f"must be between 1 and {n_labels}, got {request.top_k}")
    if request.target is not None and not 0 <= request.target < n_labels:
        raise InvalidArgument(
            "target", f"class index must be between 0 and {n_labels - 1}, got {request.target}"
        )
    groups = [_plan_one(item, served) for item in request.methods]
    worst = check_within(plan_costs(groups, served), limits.max_forward_passes)
    log.debug("model %s: at most %d forward passes planned", served.config.name, worst)
    return Plan(groups, worst)


def plan_costs(groups: list[list[PlannedMethod]], served: ServedModel) -> list[Cost]:
    """The most forward passes each part of the plan may spend (``cost``): every distinct
    attribution once (the engine computes it once), GAD's, APEM's records and filters, and
    the gradient they share (a filter's bound counts it already)."""
    costs: dict[tuple[str, str], Cost] = {}
    parts: list[Cost] = []
    for item in (item for group in groups for item in group):
        request = item.request
        advice = (
            f"AUTO runs {item.method.name} with its default parameters; leave it out of the "
            "candidates"
            if item.ranked
            else ""
        )
        attribution = costs.setdefault(
            item.attribution_key,
            method_cost(item.method, item.params, served, item.params_field, advice),
        )
        if request.gad:
            parts.append(gad_cost(attribution, served, request.field))
        if item.apem_options is not None and item.wants_record:
            parts.append(reliability_cost(item.apem_options, request.field))
        if item.apem_options is not None and item.filter_options is not None:
            entries = map_entries(served.config.input_shape, request.stage)
            parts.append(
                filter_cost(item.filter_options, item.apem_options, entries, request.field)
            )
    if any(item.wants_record for group in groups for item in group):
        parts.append(Cost(GRADIENT_PASSES, "methods", "ask for fewer methods"))
    return list(costs.values()) + parts


def _plan_one(item: MethodRequest, served: ServedModel) -> list[PlannedMethod]:
    """One requested method as the methods to run: itself, or AUTO's candidates."""
    method = supported(item.name, f"{item.field}.method", served)
    if item.stage not in STAGES:
        raise InvalidArgument(f"{item.field}.stage", f"unknown stage {item.stage!r}")
    if item.gad and (why := gad_reason(method, served)):
        raise InvalidArgument(f"{item.field}.gad", why)
    if served.format == ONNX and (item.reliability is not None or item.filter is not None):
        raise InvalidArgument(
            f"{item.field}.reliability",
            "APEM records and the filter need gradients, and ONNX Runtime runs the ONNX "
            "model's forward only",
        )
    params_field = f"{item.field}.{item.params_field or item.name}"
    shape = served.config.input_shape
    params = method.resolve_params(item.params, shape, params_field)
    if method.composite:  # AUTO: every candidate gets a reliability record
        item = replace(item, reliability=item.reliability or ReliabilityRequest())
    apem_options = filter_options = None
    if item.reliability is not None or item.filter is not None:
        apem_options = resolve_options(item.reliability, math.prod(shape), item.field)
    if item.filter is not None and apem_options is not None:
        filter_options = resolve_filter_options(item.filter, apem_options, field=item.field)
    if not method.composite:
        return [
            PlannedMethod(item, method, params, apem_options, False, params_field, filter_options)
        ]
    candidates = []
    for i, name in enumerate(params["candidates"]):
        field = f"{params_field}.candidates[{i}]"
        candidate = supported(name, field, served)
        defaults = candidate.resolve_params({}, shape, field)
        planned = PlannedMethod(
            replace(item, name=name), candidate, defaults, apem_options, True, field, filter_options
        )
        candidates.append(planned)
    return candidates


def supported(name: str, field: str, served: ServedModel) -> AttributionMethod:
    """The registered method ``name``; InvalidArgument naming ``field`` when it is unknown
    or cannot run on the model."""
    method = get_method(name, field)
    reason = method_reason(method, served)
    if reason:
        raise InvalidArgument(field, f"{name} cannot run on model {served.config.name!r}: {reason}")
    return method


#: Methods that act on the network's Python modules (nn.ReLU backward overrides, the
#: biases of conv and linear layers, per-layer rules). A TorchScript or torch.export
#: program holds compiled or traced operators instead, where these would be wrong or fail.
MODULE_METHODS = frozenset(
    (
        *("guided_backprop", "deconvolution", "guided_grad_cam", "fullgrad", "deeplift"),
        *("lrp", "attention_rollout"),  # the latter hooks nn.Softmax modules
    )
)


def method_reason(method: AttributionMethod, served: ServedModel) -> str | None:
    """Why ``method`` cannot run on ``served``, or None: the format's reason first (an
    ONNX model has no gradients; a program has no Python layers for ``MODULE_METHODS``; a
    TorchScript or ONNX forward exposes no CAM layer, ``layer_reason``), else the
    method's own."""
    if served.format == ONNX and method.needs_gradients:
        return f"{method.name} needs gradients, and ONNX Runtime runs the ONNX model's forward only"
    if served.format != CLASS and method.name in MODULE_METHODS:
        return (
            f"{method.name} works on the network's Python layers (nn.ReLU, conv, linear, "
            f"softmax modules); a {FORMAT_NAMES[served.format]} model runs compiled operators "
            "instead: serve the class + weights to use it"
        )
    reason = method.unsupported_reason(served)
    if reason and method.needs_layer and served.cam_layer is None and served.layer_reason:
        return served.layer_reason
    return reason
