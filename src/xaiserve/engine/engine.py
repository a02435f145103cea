"""The explanation engine: one request in, prediction and maps out.

Pure torch/numpy: the local backend, the TorchServe handler, offline evaluation and the
benchmarks all call ``Engine.explain``. Nothing here imports gRPC or TorchServe.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from xaiserve.api.errors import FailedPrecondition, ModelLoadError, NotFound, listing, quote
from xaiserve.api.types import (
    MODEL_AVAILABLE,
    MODEL_FAILED,
    ClassScore,
    EncodedImage,
    ExplainRequest,
    ExplainResult,
    ModelInfo,
    Prediction,
)
from xaiserve.engine.drafts import draft_maps, explanations, with_reliability
from xaiserve.engine.limits import EngineLimits
from xaiserve.engine.plan import method_reason, plan_request
from xaiserve.engine.preprocess import decode_image, tensor_from_raw
from xaiserve.methods.base import MethodContext
from xaiserve.methods.cam.score_cam import layer_channels
from xaiserve.methods.perturbation.occlusion import Occlusion, window_starts
from xaiserve.methods.registry import METHODS
from xaiserve.runtime.cpus import usable_cpus
from xaiserve.runtime.device import resolve_device
from xaiserve.runtime.execution.executor import Executor
from xaiserve.runtime.forward.backends import ForwardConfig, ModelForwards, prepare_forwards
from xaiserve.runtime.forward.counted import Budget, CountedForward
from xaiserve.runtime.model import FailedModel, ServedModel, failed_model, load_model_dir

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5


def executor_of(name: str, device: torch.device) -> Executor:
    """The executor of a model on ``device``: one stream on a GPU; on a CPU one per usable
    core (affinity, cgroup quota), sharing torch's threads as configured when the engine
    is built (``--torch-threads``; see ``Executor``)."""
    if device.type == "cuda":
        return Executor(name, device)
    return Executor(name, device, streams=usable_cpus(), threads=torch.get_num_threads())


class Engine:
    """Serves the models of a model store. Thread-safe, and calls run at once: each model
    has one executor (:mod:`xaiserve.runtime.execution.executor`) that packs the device
    work of every request in flight into shared calls, and the hooks a method sets act
    in the thread that runs its pass only (``methods.hooks``). ``serial``: one request at
    a time per model instead (the behaviour before executors, kept for comparison).

    Models that failed to load are listed with their reason and answered with
    FAILED_PRECONDITION; they do not stop the others."""

    def __init__(
        self,
        models: dict[str, ServedModel],
        limits: EngineLimits,
        forward_config: ForwardConfig | None = None,
        failed: Sequence[FailedModel] = (),
        *,
        serial: bool = False,
    ) -> None:
        """forward_config: how forward-only batches run (ONNX Runtime or torch, threads,
        providers, memory budget); each model's ONNX forward is prepared here, and a model
        whose preparation fails joins ``failed`` (the models that failed to load).
        serial: one request at a time per model (``--concurrency serial``), the behaviour
        before issue 22, kept for the side-by-side benchmark."""
        if not models and not failed:
            raise ModelLoadError("no models to serve")
        self.serial = serial
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
        self.executors = {name: executor_of(name, m.device) for name, m in self.models.items()}
        self._serial_locks = {name: threading.Lock() for name in self.models}
        for served in self.models.values():  # Score-CAM's cost, once per model
            if served.cam_layer is not None:
                layer_channels(served)

    def warm_up(self) -> threading.Thread:
        """Builds each model's incremental-occlusion plan for the default occlusion window
        on its default backend, in a background thread, so the first occlusion request
        does not pay for it (requests run meanwhile; one that needs this very plan waits
        for its build). The server and the TorchServe worker call it after loading;
        returns the thread."""

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
                forwards.occluder(forwards.default_backend, params["window"], axes)

        thread = threading.Thread(target=build, name="xaiserve-warm-up", daemon=True)
        thread.start()
        return thread

    @classmethod
    def from_model_store(
        cls,
        root: Path,
        limits: EngineLimits,
        forward_config: ForwardConfig | None = None,
        *,
        serial: bool = False,
    ) -> Engine:
        """Loads every subdirectory of ``root`` that holds a ``config.yaml``, each onto
        ``forward_config.device`` unless its config.yaml names a device; ``serial`` as in
        the constructor.

        A directory that fails to load is logged and listed as failed (see the class);
        the first of two directories with the same model name is served.

        Raises:
            ModelLoadError: no directory loaded (the message lists each one's reason), or
                a ``forward_config.device`` torch cannot provide.
        """
        root = Path(root)
        forward_config = forward_config or ForwardConfig()
        try:
            device = resolve_device(forward_config.device)
        except ValueError as err:
            raise ModelLoadError(f"device {err}") from None
        dirs = sorted(p.parent for p in root.glob("*/config.yaml"))
        if not dirs:
            raise ModelLoadError(f"{root}: no model directories (*/config.yaml)")
        models: dict[str, ServedModel] = {}
        failed: list[FailedModel] = []
        for directory in dirs:
            try:
                served = load_model_dir(directory, device)
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
        engine = cls(models, limits, forward_config, failed, serial=serial)
        if not engine.models:
            reasons = "; ".join(f"{f.directory.name}: {f.reason}" for f in engine.failed)
            raise ModelLoadError(f"{root}: no model could be loaded ({reasons})")
        return engine

    def list_models(self) -> list[ModelInfo]:
        """The models, sorted by name: each served one with the methods it supports,
        each failed one (status MODEL_FAILED) with its reason."""
        infos = []
        for _, m in sorted(self.models.items()):
            reasons = {name: method_reason(cls(), m) for name, cls in METHODS.items()}
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
                    device=str(m.device),
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
        plan = plan_request(request, served, self.limits)
        budget = Budget(self.limits.max_forward_passes, deadline)

        t0 = time.perf_counter()
        if isinstance(request.image, EncodedImage):
            x = decode_image(request.image, served.config, self.limits)
        else:
            x = tensor_from_raw(request.image, served.config, self.limits)
        x = x.to(served.device)
        timings = {"decode": time.perf_counter() - t0}

        name = served.config.name
        with self._serial_locks[name] if self.serial else contextlib.nullcontext():
            forward = self.forward(name, budget, request.forward_backend)
            t0 = time.perf_counter()
            logits = forward(x, "predict")[0]
            prediction = self._prediction(logits, served, request)
            timings["predict"] = time.perf_counter() - t0
            target = torch.tensor([prediction.target.index], device=x.device)
            gradient_batch = self.forwards[name].gradient_batch(self.limits.max_batch)
            ctx = MethodContext(served, forward, budget, gradient_batch, self.executors[name])
            drafts = draft_maps(ctx, plan.groups, x, target, request.want_png)
            drafts = with_reliability(ctx, drafts, x, int(target[0]), request.want_png)
        timings[f"forward.{forward.label}"] = forward.seconds
        timings["total"] = time.perf_counter() - start
        return ExplainResult(
            model=served.config.name,
            version=served.config.version,
            prediction=prediction,
            explanations=explanations(drafts),
            timings=timings,
            forward_passes=dict(budget.by_stage),
            device_calls=budget.device_calls,
        )

    def max_forward_passes(self, request: ExplainRequest) -> int:
        """The most forward passes ``explain`` may spend on ``request``: its plan's worst
        case (``cost``), the prediction included. Raises what ``explain`` raises before
        any work: an unknown model, bad parameters, a worst case over the limit."""
        return plan_request(request, self._model(request), self.limits).max_forward_passes

    def forward(self, model: str, budget: Budget, backend: str = "") -> CountedForward:
        """The counted forward-only forward of a served model for one request.

        backend: "" (the model's default), "torch" or "onnxruntime" (torch, labelled
        ``torch_fallback``, where ONNX Runtime is unavailable for the model).
        """
        forward = self.forwards[model].forward(budget, backend)
        forward.executor = self.executors[model]
        return forward

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
