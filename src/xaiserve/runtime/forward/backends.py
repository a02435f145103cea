"""Which implementation runs a model's forward-only batches: torch or ONNX Runtime.

Per model, at load (``prepare_forwards``): the ONNX graph (``model.onnx`` from the model
directory, else exported in memory; see :mod:`.onnx_export`) is checked against torch, and
an ONNX Runtime session is kept when it passes. The model's default backend is then
``ForwardConfig.backend`` (ONNX Runtime unless configured otherwise); a model whose export
or check failed, or a server without onnxruntime, serves on torch, with the reason in
``onnx_status`` (ListModels) and the log.

Per request (``ModelForwards.forward``): ``ExplainRequest.forward_backend`` "" (the
model's default), "torch" or "onnxruntime". Asking for ONNX Runtime where it is
unavailable runs torch instead, and says so: the forward's ``label`` is
``torch_fallback``, which the engine reports as the timing ``forward.torch_fallback``
(seconds spent in forward-only batches; ``forward.onnxruntime`` or ``forward.torch``
otherwise), and a log line gives the reason.

Both implementations batch the same way and charge the same forward passes: methods build
``batch_size`` images at once, from the memory budget and the count cap
(``forward.memory_batch_size``: bytes per image x batch <= budget, batch <=
``ForwardConfig.max_batch``, bytes per image measured once per model by
``forward.image_bytes``), and each backend call takes at most ``call_batches[backend]`` of
them: ``ForwardConfig.call_batch``, or where that is 0 the memory budget's batch on torch
and, on ONNX Runtime, the batch size with the best throughput, measured at load
(``forward.fastest_batch``, whose largest call is ``batch_size``, so it stays within the
budget too). Gradients always run in torch (``ServedModel.module``), in batches of at most
``gradient_batch`` images.

Occlusion also asks the forward for an incremental occluder (``ModelForwards.occluder``,
:mod:`.incremental.build`): built on first use per backend, window side and window
positions (then cached, at most ``MAX_OCCLUDERS`` per model), checked against full forward
passes, and None (full forward passes) where the model's graph does not allow it or
``incremental_occlusion`` is off.
Incremental stages run on the CPU: a session on a GPU provider (CUDA on GPU nodes, the
default where onnxruntime-gpu finds a GPU), and a model on a GPU (``ServedModel.device``),
run full passes, which a GPU batches well, rather than move every stage's crops through
host memory.

A model on a GPU (``cuda:N``) gets ONNX Runtime's GPU providers on the same GPU unless
``ForwardConfig.onnx_device_id`` names another (``prepare_forwards`` sets it per model).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from xaiserve.api.errors import InvalidArgument
from xaiserve.runtime.device import onnx_device_id
from xaiserve.runtime.formats import ONNX
from xaiserve.runtime.forward.config import BACKENDS, FALLBACK, ONNXRUNTIME, TORCH, ForwardConfig
from xaiserve.runtime.forward.counted import (
    Budget,
    CountedForward,
    TorchForward,
    fastest_batch,
    image_bytes,
    memory_batch_size,
)
from xaiserve.runtime.forward.incremental.build import build_occluder
from xaiserve.runtime.forward.incremental.plan import describe
from xaiserve.runtime.forward.incremental.run import IncrementalOcclusion
from xaiserve.runtime.forward.onnx_export import (
    INPUT_NAME,
    ONNX_FILE,
    OUTPUT_NAME,
    OnnxUnavailable,
    check_onnx,
    export_onnx,
    new_session,
    onnxruntime_module,
    release_arena,
)
from xaiserve.runtime.model import ServedModel

log = logging.getLogger(__name__)

MAX_OCCLUDERS = 4
CPU_PROVIDER = "CPUExecutionProvider"


class OnnxForward(CountedForward):
    """``CountedForward`` on an ONNX Runtime session of the exported pixel-space model."""

    backend = ONNXRUNTIME

    def __init__(
        self, session: Any, budget: Budget, batch_size: int, call_batch: int | None = None
    ) -> None:
        super().__init__(budget, batch_size, call_batch)
        self.session = session

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})
        return torch.from_numpy(logits).to(x.device)


@dataclass
class ModelForwards:
    """One model's forward-only setup.

    session: the checked ONNX Runtime session, or None; onnx_status: "" when the session
    is there, else why not. bytes_per_image, batch_size: the memory budget rule's inputs
    and result. call_batches: per backend, images per call (at most ``batch_size``).
    """

    served: ServedModel
    session: Any | None
    onnx_status: str
    bytes_per_image: int
    batch_size: int
    preferred: str = ONNXRUNTIME
    config: ForwardConfig = field(default_factory=ForwardConfig)
    call_batches: dict[str, int] = field(default_factory=dict)
    _occluders: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _building: dict = field(default_factory=dict, repr=False)  # key -> Future of the build
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def providers(self) -> tuple[str, ...]:
        """The execution providers the ONNX Runtime session runs on, in order; () without
        a session."""
        return tuple(self.session.get_providers()) if self.session is not None else ()

    @property
    def default_backend(self) -> str:
        """The backend of requests that leave ``forward_backend`` empty."""
        return ONNXRUNTIME if self.session is not None and self.preferred == ONNXRUNTIME else TORCH

    def gradient_batch(self, limit: int) -> int:
        """Images per gradient batch: at most ``limit`` (``EngineLimits.max_batch``) and at
        most ``batch_size``, since a gradient pass keeps about ``bytes_per_image`` per image
        (every activation) for its backward pass."""
        return max(1, min(limit, self.batch_size))

    def forward(self, budget: Budget, requested: str = "") -> CountedForward:
        """A counted forward for one request; ``requested``: "", "torch" or "onnxruntime"."""
        if requested not in ("", *BACKENDS):
            raise InvalidArgument(
                "forward_backend", f"unknown backend {requested!r}; use one of {BACKENDS}"
            )
        backend = requested or self.default_backend
        forward: CountedForward
        if backend == ONNXRUNTIME and self.session is not None:
            forward = OnnxForward(
                self.session, budget, self.batch_size, self.call_batches.get(ONNXRUNTIME)
            )
        else:
            forward = TorchForward(
                self.served.module, budget, self.batch_size, self.call_batches.get(TORCH)
            )
            if backend == ONNXRUNTIME:
                forward.label = FALLBACK
                log.info(
                    "model %s: onnxruntime requested, running torch: %s",
                    self.served.config.name,
                    self.onnx_status,
                )
        if self.config.incremental_occlusion:
            forward.occluders = self.occluder
        return forward

    def occluder(
        self, backend: str, window: int, starts: Sequence[Sequence[int]]
    ) -> IncrementalOcclusion | None:
        """The checked incremental occluder for windows of side ``window`` at every
        combination of ``starts`` (per spatial axis) on ``backend``, built on first use
        and cached; None where the model does not allow one or planning fails (the reason
        is logged once): occlusion then runs full forward passes, never fails for it.

        A build runs outside the cache's lock, so callers asking for other windows (built
        or not) do not wait for it, and callers asking for the same window wait for that
        one build."""
        key = (backend, window, tuple(tuple(axis) for axis in starts))
        with self._lock:
            if key in self._occluders:
                self._occluders.move_to_end(key)
                return self._occluders[key]
            pending = self._building.get(key)
            if pending is None:
                pending = self._building[key] = Future()
                owner = True
            else:
                owner = False
        if not owner:
            return pending.result()
        occluder, built = None, False
        try:
            occluder, built = self._planned_occluder(backend, window, starts), True
        finally:  # an error past the build's own guard: waiters run full passes, no cache
            with self._lock:
                if built:
                    self._occluders[key] = occluder
                    if len(self._occluders) > MAX_OCCLUDERS:
                        self._occluders.popitem(last=False)
                del self._building[key]
            pending.set_result(occluder)
        return occluder

    def _planned_occluder(
        self, backend: str, window: int, starts: Sequence[Sequence[int]]
    ) -> IncrementalOcclusion | None:
        start = time.perf_counter()
        if backend == ONNXRUNTIME and self.providers[:1] not in ((), (CPU_PROVIDER,)):
            # each stage's crops would go through host memory: full passes on the GPU
            occluder, reason = None, f"the session runs on {self.providers[0]}"
        elif self.served.device.type != "cpu":  # the stages run on the CPU: likewise
            occluder, reason = None, f"the model is on {self.served.device}"
        else:
            occluder, reason = self._build_occluder(backend, window, starts)
        name = self.served.config.name
        if occluder is None:
            log.info(
                "model %s: occlusion (window %d) runs full forward passes: %s", name, window, reason
            )
        else:
            log.info(
                "model %s: incremental occlusion (window %d, %s) in %.1f s: %s; %d of "
                "the stages without a ring (valid windows)",
                name,
                window,
                backend,
                time.perf_counter() - start,
                describe(occluder.plan),
                occluder.valid_stages,
            )
        return occluder

    def _build_occluder(
        self, backend: str, window: int, starts: Sequence[Sequence[int]]
    ) -> tuple[IncrementalOcclusion | None, str]:
        try:
            stage_options = self.config.session_options | {"providers": (CPU_PROVIDER,)}
            return build_occluder(
                self.served.module,
                self.served.config.input_shape,
                window,
                starts,
                backend,
                stage_options,
                self.config.onnx_tolerance,
            )
        except Exception as err:  # a graph the planner did not foresee: full passes
            reason = f"planning failed: {type(err).__name__}: {err}"
            log.warning("model %s: incremental occlusion %s", self.served.config.name, reason)
            return None, reason


def _session(served: ServedModel, config: ForwardConfig) -> Any:
    """A checked session of the directory's model.onnx, else of a fresh export; raises
    OnnxUnavailable with the reason."""
    onnxruntime_module()  # fails fast (and says so) without onnxruntime
    shape = served.config.input_shape
    options = config.session_options
    path = served.directory / ONNX_FILE
    stale = ""
    if path.is_file():
        try:
            session = new_session(path, **options)
            check = check_onnx(served.module, session, shape, tolerance=config.onnx_tolerance)
            if check.passed:
                log.info(
                    "model %s: %s passed the check: %s", served.config.name, path, check.describe()
                )
                return session
            stale = f"{ONNX_FILE} failed the check ({check.describe()}); "
        except OnnxUnavailable as err:  # unreadable, or not this model's graph
            stale = f"{ONNX_FILE} unusable ({err}); "
        log.warning("model %s: %s; exporting again", served.config.name, stale.rstrip("; "))
    elif not config.export_on_load:
        raise OnnxUnavailable(f"no {ONNX_FILE} in the model directory and export at load is off")
    session = new_session(export_onnx(served.module, shape), **options)
    check = check_onnx(served.module, session, shape, tolerance=config.onnx_tolerance)
    if not check.passed:
        raise OnnxUnavailable(f"{stale}check failed: {check.describe()}")
    log.info("model %s: exported to ONNX at load: %s", served.config.name, check.describe())
    return session


def prepare_forwards(served: ServedModel, config: ForwardConfig | None = None) -> ModelForwards:
    """The forward-only setup of one model (module docstring). Never raises for ONNX
    problems: the model then serves on torch, ``onnx_status`` saying why."""
    config = config or ForwardConfig()
    config = replace(config, onnx_device_id=onnx_device_id(config.onnx_device_id, served.device))
    per_image = image_bytes(served.module, served.config.input_shape)
    batch = memory_batch_size(per_image, config.memory_budget, config.max_batch)
    try:
        if served.format == ONNX:  # the module itself runs ONNX Runtime (formats.OnnxNet)
            raise OnnxUnavailable(
                "the model is an ONNX graph, which its module runs on ONNX Runtime (timings "
                "say forward.torch)"
            )
        session, status = _session(served, config), ""
    except OnnxUnavailable as err:
        session, status = None, str(err)
        log.warning("model %s serves forward-only batches on torch: %s", served.config.name, status)
    # images per call: the configured cap (within the memory batch), else on torch the
    # memory batch (torch's first calls at each new batch shape are slow, so a probe this
    # short misjudges it; docs/performance.md) and on ONNX Runtime the fastest batch measured
    cap = min(config.call_batch, batch) if config.call_batch else 0
    calls = {TORCH: cap or batch}
    if session is not None:
        calls[ONNXRUNTIME] = cap or _fastest_onnx_batch(served, session, batch)
    return ModelForwards(served, session, status, per_image, batch, config.backend, config, calls)


def _fastest_onnx_batch(served: ServedModel, session: Any, limit: int) -> int:
    """Images per ONNX Runtime call of at most ``limit``: the fastest measured, logged."""
    run = OnnxForward(session, Budget(0), limit)._logits
    size, rates = fastest_batch(run, served.config.input_shape, limit)
    release_arena(session, served.config.input_shape)  # what the largest size left there
    log.info(
        "model %s: ONNX Runtime calls of %d images (%.0f images/s; measured %s; the "
        "memory budget allows %d)",
        served.config.name,
        size,
        rates[size],
        ", ".join(f"{b}: {r:.0f}" for b, r in rates.items()),
        limit,
    )
    return size
