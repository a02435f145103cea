"""The explanation engine: one request in, prediction and maps out.

Pure torch/numpy: the local backend, the TorchServe handler, offline evaluation and the
benchmarks all call ``Engine.explain``. Nothing here imports gRPC or TorchServe.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from xaiserve.api.errors import (
    FailedPrecondition,
    InvalidArgument,
    ModelLoadError,
    NotFound,
    ResourceExhausted,
    listing,
    quote,
)
from xaiserve.api.types import (
    MODEL_AVAILABLE,
    MODEL_FAILED,
    STAGES,
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
    ReliabilityRequest,
)
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
from xaiserve.engine.gad import gad_map, gad_reason
from xaiserve.engine.limits import EngineLimits
from xaiserve.engine.postprocess import apply_stage
from xaiserve.engine.preprocess import decode_image, tensor_from_raw
from xaiserve.engine.render import overlay_png
from xaiserve.methods.base import AttributionMethod, MethodContext
from xaiserve.methods.cam.score_cam import layer_channels
from xaiserve.methods.perturbation.occlusion import Occlusion, window_starts
from xaiserve.methods.registry import METHODS, get_method
from xaiserve.reliability.apem import STAGE as APEM_STAGE
from xaiserve.reliability.apem import (
    ApemOptions,
    MapScore,
    SharedGradient,
    apem_many,
    relevance_from_map,
    resolve_options,
)
from xaiserve.reliability.filter import STAGE as FILTER_STAGE
from xaiserve.reliability.filter import FilterOptions, Shared, filter_map, resolve_filter_options
from xaiserve.runtime.forward.backends import ForwardConfig, ModelForwards, prepare_forwards
from xaiserve.runtime.forward.counted import Budget, CountedForward
from xaiserve.runtime.model import FailedModel, ServedModel, failed_model, load_model_dir

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class _Planned:
    """A validated method request, ready to run. ``params_field`` names its parameters in
    errors (``methods[0].occlusion``, or an AUTO candidate's ``...candidates[1]``)."""

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


@dataclass
class _Draft:
    """One map on its way to an ``Explanation``: computed and post-processed first, its
    APEM and filter added once every map of the request is there (they share forward
    calls and the gradient)."""

    item: _Planned
    staged: torch.Tensor
    map: Any
    forward_passes: int
    timings: dict[str, float]
    png: bytes | None
    reliability: ReliabilityRecord | None = None
    filtered: FilteredRecord | None = None
    score: MapScore | None = None  # its APEM searches, for the filter

    def explanation(self) -> Explanation:
        return Explanation(
            method=self.item.method.name,
            stage=self.item.request.stage,
            map=self.map,
            forward_passes=self.forward_passes,
            timings=self.timings,
            png=self.png,
            reliability=self.reliability,
            filtered=self.filtered,
        )


def _apem_rank(explanation: Explanation) -> tuple[int, float]:
    """Sort key: defined APEM first, highest first."""
    record = explanation.reliability
    if record is None or record.undefined_reason or math.isnan(record.apem):
        return (1, 0.0)
    return (0, -record.apem)


def _ranked(group: list[_Draft]) -> list[Explanation]:
    """The explanations of one requested method; AUTO's ranked by APEM, best first."""
    explanations = [d.explanation() for d in group]
    return sorted(explanations, key=_apem_rank) if group[0].item.ranked else explanations


class Engine:
    """Serves the models of a model store. Thread-safe: calls on one model are serialized
    (CAM methods hook the model's layers), calls on different models run concurrently.

    Models that failed to load are listed with their reason and answered with
    FAILED_PRECONDITION; they do not stop the others."""

    def __init__(
        self,
        models: dict[str, ServedModel],
        limits: EngineLimits,
        forward_config: ForwardConfig | None = None,
        failed: Sequence[FailedModel] = (),
    ) -> None:
        """forward_config: how forward-only batches run (ONNX Runtime or torch, threads,
        providers, memory budget); each model's ONNX forward is prepared here, and a model
        whose preparation fails joins ``failed`` (the models that failed to load)."""
        if not models and not failed:
            raise ModelLoadError("no models to serve")
        self.limits = limits
        self.forward_config = forward_config or ForwardConfig()
        self.forwards: dict[str, ModelForwards] = {}
        self.failed: list[FailedModel] = list(failed)
        for name, served in models.items():
            try:
                self.forwards[name] = prepare_forwards(served, self.forward_config)
            except Exception as err:
                log.exception("model %s from %s not served", name, served.directory)
                failure = failed_model(served.directory, err)
                self.failed.append(replace(failure, name=name, version=served.config.version))
        self.models = {name: models[name] for name in self.forwards}
        self._locks = {name: threading.Lock() for name in self.models}
        for served in self.models.values():  # Score-CAM's cost, before requests hook layers
            if served.cam_layer is not None:
                layer_channels(served)

    def warm_up(self) -> threading.Thread:
        """Builds each model's incremental-occlusion plan for the default occlusion window
        on its default backend, in a background thread, so the first occlusion request
        does not pay for it (0.1-4 s). The build runs the model, so it holds the model's
        lock as a request does (CAM methods hook its layers): a request that comes
        meanwhile waits for it. The server and the TorchServe worker call it after
        loading; returns the thread."""

        def build() -> None:
            occlusion = Occlusion()
            for name, served in self.models.items():
                forwards = self.forwards[name]
                if not forwards.config.incremental_occlusion or occlusion.unsupported_reason(
                    served
                ):
                    continue
                shape = served.config.input_shape
                params = occlusion.resolve_params({}, shape, "occlusion")
                axes = [window_starts(n, params["window"], params["stride"]) for n in shape[1:]]
                with self._locks[name]:
                    forwards.occluder(forwards.default_backend, params["window"], axes)

        thread = threading.Thread(target=build, name="xaiserve-warm-up", daemon=True)
        thread.start()
        return thread

    @classmethod
    def from_model_store(
        cls, root: Path, limits: EngineLimits, forward_config: ForwardConfig | None = None
    ) -> Engine:
        """Loads every subdirectory of ``root`` that holds a ``config.yaml``.

        A directory that fails to load is logged and listed as failed (see the class);
        the first of two directories with the same model name is served.

        Raises:
            ModelLoadError: no directory loaded; the message lists each one's reason.
        """
        root = Path(root)
        dirs = sorted(p.parent for p in root.glob("*/config.yaml"))
        if not dirs:
            raise ModelLoadError(f"{root}: no model directories (*/config.yaml)")
        models: dict[str, ServedModel] = {}
        failed: list[FailedModel] = []
        for directory in dirs:
            try:
                served = load_model_dir(directory)
                if served.config.name in models:
                    raise ModelLoadError(
                        f"model name {served.config.name!r} repeated: "
                        f"{models[served.config.name].directory.name} is served"
                    )
            except Exception as err:
                log.error(
                    "model directory %s not served: %s",
                    directory,
                    err,
                    exc_info=not isinstance(err, ModelLoadError),
                )
                failed.append(failed_model(directory, err))
                continue
            models[served.config.name] = served
        engine = cls(models, limits, forward_config, failed)
        if not engine.models:
            reasons = "; ".join(f"{f.directory.name}: {f.reason}" for f in engine.failed)
            raise ModelLoadError(f"{root}: no model could be loaded ({reasons})")
        return engine

    def list_models(self) -> list[ModelInfo]:
        """The models, sorted by name: each served one with the methods it supports,
        each failed one (status MODEL_FAILED) with its reason."""
        infos = []
        for _, m in sorted(self.models.items()):
            reasons = {name: cls().unsupported_reason(m) for name, cls in METHODS.items()}
            infos.append(
                ModelInfo(
                    name=m.config.name,
                    version=m.config.version,
                    input_shape=m.config.input_shape,
                    labels=m.config.labels,
                    methods=tuple(name for name, why in reasons.items() if why is None),
                    cam_layer=m.config.cam_layer,
                    forward_backend=self.forwards[m.config.name].default_backend,
                    onnx_status=self.forwards[m.config.name].onnx_status,
                    onnx_providers=self.forwards[m.config.name].providers,
                    calibrated=m.calibration is not None,
                    gad_class_pairs=m.gad.names(m.config.labels) if m.gad else (),
                    unsupported_methods=tuple(f"{n}: {why}" for n, why in reasons.items() if why),
                )
            )
        infos += [
            ModelInfo(
                name=f.name,
                version=f.version,
                input_shape=(),
                labels=(),
                methods=(),
                status=MODEL_FAILED,
                status_reason=f.reason,
            )
            for f in self.failed
        ]
        return sorted(infos, key=lambda info: (info.name, info.status != MODEL_AVAILABLE))

    def explain(self, request: ExplainRequest, deadline: float | None = None) -> ExplainResult:
        """Predicts and explains one image. Raises XaiError subclasses on bad input.

        deadline: ``time.monotonic()`` seconds by which the work must finish, or None.
        """
        start = time.perf_counter()
        served = self._model(request)
        plan = self._plan(request, served)
        budget = Budget(self.limits.max_forward_passes, deadline)

        t0 = time.perf_counter()
        if isinstance(request.image, EncodedImage):
            x = decode_image(request.image, served.config, self.limits)
        else:
            x = tensor_from_raw(request.image, served.config, self.limits)
        timings = {"decode": time.perf_counter() - t0}

        with self._locks[served.config.name]:
            forward = self.forward(served.config.name, budget, request.forward_backend)
            t0 = time.perf_counter()
            logits = forward(x, "predict")[0]
            prediction = self._prediction(logits, served, request)
            timings["predict"] = time.perf_counter() - t0
            target = torch.tensor([prediction.target.index])
            gradient_batch = self.forwards[served.config.name].gradient_batch(self.limits.max_batch)
            ctx = MethodContext(served, forward, budget, gradient_batch)
            attributions: dict[tuple[str, str], torch.Tensor] = {}
            drafts = [
                [self._draft(ctx, item, x, target, request, attributions) for item in group]
                for group in plan
            ]
            self._reliability(ctx, [d for group in drafts for d in group], x, target, request)
            explanations = tuple(explanation for group in drafts for explanation in _ranked(group))
        timings[f"forward.{forward.label}"] = forward.seconds
        timings["total"] = time.perf_counter() - start
        return ExplainResult(
            model=served.config.name,
            version=served.config.version,
            prediction=prediction,
            explanations=explanations,
            timings=timings,
            forward_passes=dict(budget.by_stage),
        )

    def max_forward_passes(self, request: ExplainRequest) -> int:
        """The most forward passes ``explain`` may spend on ``request``: its plan's worst
        case (``cost``), the prediction included. Raises what ``explain`` raises before
        any work: an unknown model, bad parameters, a worst case over the limit."""
        served = self._model(request)
        plan = self._plan(request, served)
        return check_within(self._costs(plan, served), self.limits.max_forward_passes)

    def forward(self, model: str, budget: Budget, backend: str = "") -> CountedForward:
        """The counted forward-only forward of a served model for one request.

        backend: "" (the model's default), "torch" or "onnxruntime" (torch, labelled
        ``torch_fallback``, where ONNX Runtime is unavailable for the model).
        """
        return self.forwards[model].forward(budget, backend)

    def _model(self, request: ExplainRequest) -> ServedModel:
        served = self.models.get(request.model)
        failed = next((f for f in self.failed if f.name == request.model), None)
        if served is None and failed is not None:
            raise FailedPrecondition(
                "model_name", f"model {quote(request.model)} failed to load: {failed.reason}"
            )
        if served is None:
            raise NotFound(
                "model_name",
                f"model {quote(request.model)} is not served; served: {listing(self.models)}",
            )
        if request.version and request.version != served.config.version:
            raise NotFound(
                "model_version",
                f"model {quote(request.model)} version {quote(request.version)} is not served "
                f"(serving version {quote(served.config.version)})",
            )
        return served

    def _plan(self, request: ExplainRequest, served: ServedModel) -> list[list[_Planned]]:
        """Validates every method request before any work starts; one group per request.
        A request whose worst case exceeds the forward-pass limit is refused here
        (``cost``), naming the field that costs most."""
        if len(request.methods) > self.limits.max_methods:
            raise ResourceExhausted(
                "methods",
                f"{len(request.methods)} methods requested; at most {self.limits.max_methods} "
                "per call",
            )
        n_labels = len(served.config.labels)
        if request.top_k is not None and not 1 <= request.top_k <= n_labels:
            raise InvalidArgument("top_k", f"must be between 1 and {n_labels}, got {request.top_k}")
        if request.target is not None and not 0 <= request.target < n_labels:
            raise InvalidArgument(
                "target", f"class index must be between 0 and {n_labels - 1}, got {request.target}"
            )
        plan = [self._plan_one(item, served) for item in request.methods]
        worst = check_within(self._costs(plan, served), self.limits.max_forward_passes)
        log.debug("model %s: at most %d forward passes planned", served.config.name, worst)
        return plan

    @staticmethod
    def _costs(plan: list[list[_Planned]], served: ServedModel) -> list[Cost]:
        """The most forward passes each part of the plan may spend (``cost``): every
        distinct attribution once (``_draft`` computes it once), GAD's, APEM's records
        and filters, and the gradient they share (a filter's bound counts it already)."""
        costs: dict[tuple[str, str], Cost] = {}
        parts: list[Cost] = []
        for item in (item for group in plan for item in group):
            request = item.request
            advice = (
                (
                    f"AUTO runs {item.method.name} with its default parameters; leave it "
                    "out of the candidates"
                )
                if item.ranked
                else ""
            )
            attribution = costs.setdefault(
                item.attribution_key,
                method_cost(item.method, item.params, served, item.params_field, advice),
            )
            if request.gad:
                parts.append(gad_cost(attribution, served, request.field))
            if item.apem_options is not None and request.reliability is not None:
                parts.append(reliability_cost(item.apem_options, request.field))
            if item.apem_options is not None and item.filter_options is not None:
                entries = map_entries(served.config.input_shape, request.stage)
                parts.append(
                    filter_cost(item.filter_options, item.apem_options, entries, request.field)
                )
        if any(item.request.reliability is not None for group in plan for item in group):
            parts.append(Cost(GRADIENT_PASSES, "methods", "ask for fewer methods"))
        return list(costs.values()) + parts

    def _plan_one(self, item: MethodRequest, served: ServedModel) -> list[_Planned]:
        """One requested method as the methods to run: itself, or AUTO's candidates."""
        method = self._supported(item.name, f"{item.field}.method", served)
        if item.stage not in STAGES:
            raise InvalidArgument(f"{item.field}.stage", f"unknown stage {item.stage!r}")
        if item.gad and (why := gad_reason(method, served)):
            raise InvalidArgument(f"{item.field}.gad", why)
        params_field = f"{item.field}.{item.params_field or item.name}"
        params = method.resolve_params(item.params, served.config.input_shape, params_field)
        if method.composite:  # AUTO: every candidate gets a reliability record
            item = replace(item, reliability=item.reliability or ReliabilityRequest())
        apem_options = filter_options = None
        if item.reliability is not None or item.filter is not None:
            numel = math.prod(served.config.input_shape)
            apem_options = resolve_options(item.reliability, numel, item.field)
        if item.filter is not None:
            filter_options = resolve_filter_options(item.filter, apem_options, field=item.field)
        if not method.composite:
            return [
                _Planned(item, method, params, apem_options, False, params_field, filter_options)
            ]
        candidates = []
        for i, name in enumerate(params["candidates"]):
            field = f"{params_field}.candidates[{i}]"
            candidate = self._supported(name, field, served)
            defaults = candidate.resolve_params({}, served.config.input_shape, field)
            candidates.append(
                _Planned(
                    replace(item, name=name),
                    candidate,
                    defaults,
                    apem_options,
                    True,
                    field,
                    filter_options,
                )
            )
        return candidates

    @staticmethod
    def _supported(name: str, field: str, served: ServedModel) -> AttributionMethod:
        method = get_method(name, field)
        reason = method.unsupported_reason(served)
        if reason:
            raise InvalidArgument(
                field, f"{name} cannot run on model {served.config.name!r}: {reason}"
            )
        return method

    def _prediction(
        self, logits: torch.Tensor, served: ServedModel, request: ExplainRequest
    ) -> Prediction:
        labels = served.config.labels
        probs = torch.softmax(logits, dim=0)
        k = min(request.top_k or DEFAULT_TOP_K, len(labels))
        order = torch.argsort(probs, descending=True)

        def score(i: int) -> ClassScore:
            return ClassScore(i, labels[i], float(probs[i]), float(logits[i]))

        target = request.target if request.target is not None else int(order[0])
        return Prediction(top_k=tuple(score(int(i)) for i in order[:k]), target=score(target))

    def _draft(
        self,
        ctx: MethodContext,
        item: _Planned,
        x: torch.Tensor,
        target: torch.Tensor,
        request: ExplainRequest,
        attributions: dict[tuple[str, str], torch.Tensor],
    ) -> _Draft:
        """One map, without its APEM and filter. ``attributions`` holds the raw maps
        computed so far in this request, by method and parameters, so one method asked for
        at several stages runs once (the later explanations then report no forward passes
        of their own)."""
        spent_before = ctx.budget.spent
        t0 = time.perf_counter()
        key = item.attribution_key
        raw = attributions.get(key)
        if raw is None:  # the same method and parameters at another stage: computed once
            raw = attributions[key] = item.method.attribute(ctx, x, target, item.params)
        timings = {"attribute": time.perf_counter() - t0}
        t0 = time.perf_counter()
        staged = apply_stage(raw, x, item.request.stage)[0].detach()
        if item.request.gad:  # keep what the support models agree on (seed 002)
            t1 = time.perf_counter()
            staged = gad_map(
                ctx,
                item.method,
                item.params,
                x,
                target,
                staged,
                item.request.stage,
                item.request.field,
            )
            timings["gad"] = time.perf_counter() - t1
        attr_map = staged.numpy().astype("float32")
        png = self._png(attr_map, x, request)
        timings["postprocess"] = time.perf_counter() - t0 - timings.get("gad", 0.0)
        return _Draft(item, staged, attr_map, ctx.budget.spent - spent_before, timings, png)

    def _reliability(
        self,
        ctx: MethodContext,
        drafts: list[_Draft],
        x: torch.Tensor,
        target: torch.Tensor,
        request: ExplainRequest,
    ) -> None:
        """The APEM records and filtered maps asked for, added to the drafts. Every map's
        APEM runs in the same forward calls (``apem_many``; its timing ``apem`` is its
        share of them by forward passes), one gradient serves them all, and a filter starts
        from its map's APEM instead of searching the original again."""
        wanted = [d for d in drafts if d.item.apem_options is not None]
        if not wanted:
            return
        y = int(target[0])
        scored = [d for d in wanted if d.item.request.reliability is not None]
        gradient = SharedGradient(
            ctx.model, x[0], y, ctx.budget, APEM_STAGE if scored else FILTER_STAGE
        )
        relevance = {id(d): relevance_from_map(d.staged) for d in wanted}
        if scored:
            t0 = time.perf_counter()
            results = apem_many(
                ctx.forward,
                ctx.model,
                x[0],
                y,
                [relevance[id(d)] for d in scored],
                [d.item.request.reliability for d in scored],
                budget=ctx.budget,
                fields=[d.item.request.field for d in scored],
                gradient=gradient,
            )
            elapsed = time.perf_counter() - t0
            total = sum(r.record.forward_passes for r in results)
            for d, result in zip(scored, results):
                share = result.record.forward_passes / total if total else 1 / len(scored)
                d.reliability, d.score = result.record, result.score
                d.timings["apem"] = elapsed * share
        for d in wanted:
            if d.item.request.filter is None:
                continue
            t0 = time.perf_counter()
            record = filter_map(
                ctx.forward,
                ctx.model,
                x[0],
                y,
                relevance[id(d)],
                d.item.request.reliability,
                request=d.item.request.filter,
                budget=ctx.budget,
                field=d.item.request.field,
                shared=Shared(gradient, d.score),
            )
            kept = d.map * (record.map > 0)  # the original's values where R was kept
            d.filtered = replace(record, map=kept, png=self._png(kept, x, request))
            d.timings["filter"] = time.perf_counter() - t0

    @staticmethod
    def _png(attr_map: Any, x: torch.Tensor, request: ExplainRequest) -> bytes | None:
        """The PNG overlay when asked for (2-D images only)."""
        return overlay_png(attr_map, x[0].numpy()) if request.want_png and x.dim() == 4 else None
