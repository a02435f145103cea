"""The TorchServe handler: hosts the engine in a TorchServe worker.

The only module of xaiserve that imports TorchServe. ``xaiserve.model_store.archive`` puts
this file into every model archive as its handler; TorchServe imports it as a top-level
module, so every xaiserve import here is absolute and the module defines exactly one class.

Each request of a batch is answered on its own (its own model version check, target,
methods, options and deadline): a bad request gets its error answer and the others their
results. The wire format is :mod:`xaiserve.api.worker_protocol`. Every batch is counted
in the ``XaiserveBatches`` metric (dimension ``BatchSize``) and logged, so the batches
TorchServe forms can be observed.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from google.protobuf.message import DecodeError
from ts.metrics.dimension import Dimension
from ts.torch_handler.base_handler import BaseHandler

from xaiserve.api import convert, worker_protocol
from xaiserve.api.errors import DeadlineExceeded, InvalidArgument, ModelLoadError, XaiError
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.runtime.device import configure_torch_threads, resolve_device
from xaiserve.runtime.forward.config import CONCURRENCY, SERIAL, ForwardConfig
from xaiserve.runtime.model import failed_model, load_model_dir

logger = logging.getLogger(__name__)

#: Key of the xaiserve section in the archive's model-config.yaml.
CONFIG_SECTION = "xaiserve"
#: Counter of batches handled, by size.
BATCH_METRIC = "XaiserveBatches"
#: The worker's environment variable of ``concurrency`` (as the gateway's setting).
CONCURRENCY_ENV = "XAISERVE_CONCURRENCY"
#: The worker's environment variable of torch's threads (as the gateway's setting).
TORCH_THREADS_ENV = "XAISERVE_TORCH_THREADS"


def engine_limits(model_yaml_config: Mapping[str, Any] | None) -> EngineLimits:
    """The engine limits of ``xaiserve.limits`` in model-config.yaml (defaults otherwise).

    Raises:
        ModelLoadError: an unknown limit or a value that is not a positive integer.
    """
    section = (model_yaml_config or {}).get(CONFIG_SECTION) or {}
    given = dict(section.get("limits") or {})
    known = EngineLimits.__dataclass_fields__
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ModelLoadError(f"model-config.yaml: unknown xaiserve.limits {unknown}")
    for name, value in given.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelLoadError(f"model-config.yaml: xaiserve.limits.{name} must be >= 1")
    return EngineLimits(**given)


def forward_config(model_yaml_config: Mapping[str, Any] | None) -> ForwardConfig:
    """How forward-only batches run, from ``xaiserve.forward`` in model-config.yaml
    (``backend``, ``device``, ``onnx_threads``, ``onnx_providers`` (a list),
    ``onnx_device_id``, ``memory_mb``, ``max_batch``, ``call_batch``,
    ``incremental_occlusion``; defaults otherwise).

    Raises:
        ModelLoadError: an unknown key or a bad value.
    """
    section = (model_yaml_config or {}).get(CONFIG_SECTION) or {}
    given = dict(section.get("forward") or {})
    known = {
        "backend",
        "device",
        "onnx_threads",
        "onnx_providers",
        "onnx_device_id",
        "memory_mb",
        "max_batch",
        "call_batch",
        "incremental_occlusion",
    }
    unknown = sorted(set(given) - known)
    if unknown:
        raise ModelLoadError(f"model-config.yaml: unknown xaiserve.forward {unknown}")
    if "onnx_providers" in given:
        given["onnx_providers"] = tuple(given["onnx_providers"] or ())
    try:
        return ForwardConfig(**given)
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"model-config.yaml: xaiserve.forward: {err}") from err


def serial(
    model_yaml_config: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
) -> bool:
    """Whether the worker runs one request at a time (``concurrency: serial``): from
    ``xaiserve.concurrency`` in model-config.yaml, else the worker's ``XAISERVE_CONCURRENCY``,
    else ``batched``.

    Raises:
        ModelLoadError: a value other than ``batched`` or ``serial``.
    """
    section = (model_yaml_config or {}).get(CONFIG_SECTION) or {}
    environ = os.environ if environ is None else environ
    if section.get("concurrency"):
        where, value = "model-config.yaml: xaiserve.concurrency", section["concurrency"]
    else:
        where, value = CONCURRENCY_ENV, environ.get(CONCURRENCY_ENV) or CONCURRENCY[0]
    if str(value).strip().lower() not in CONCURRENCY:
        raise ModelLoadError(f"{where}: {value!r}: choose from {', '.join(CONCURRENCY)}")
    return str(value).strip().lower() == SERIAL


def torch_threads(environ: Mapping[str, str] | None = None) -> int:
    """The worker's ``XAISERVE_TORCH_THREADS`` (0, auto, when unset: the CPUs the worker
    may use, or ``OMP_NUM_THREADS`` when set; see ``runtime.device.configure_torch_threads``).

    Raises:
        ModelLoadError: not a whole number >= 0.
    """
    environ = os.environ if environ is None else environ
    text = environ.get(TORCH_THREADS_ENV, "").strip() or "0"
    if not text.isdigit():
        raise ModelLoadError(f"{TORCH_THREADS_ENV}={text!r}: must be a whole number >= 0")
    return int(text)


def answer(engine: Engine, inputs: Mapping[str, Any]) -> bytes:
    """The answer to one request of a batch; never raises (errors become error answers)."""
    try:
        command = worker_protocol.command_of(inputs)
        if command == worker_protocol.LIST_MODELS:
            return convert.models_to_proto(engine.list_models()).SerializeToString()
        deadline = worker_protocol.deadline_of(inputs)
        try:
            message = pb.ExplainRequest.FromString(worker_protocol.body_of(inputs))
        except DecodeError:
            raise InvalidArgument("body", "not a serialized xaiserve.v1.ExplainRequest") from None
        request = convert.request_from_proto(message)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(None, "deadline passed while the request was queued")
        result = engine.explain(request, deadline)
        response = convert.response_to_proto(result, request.want_array, request.want_png)
        return response.SerializeToString()
    except XaiError as error:
        return worker_protocol.encode_error(error.code, str(error))
    except Exception:
        error_id = uuid.uuid4().hex[:12]
        logger.exception("internal error (id %s)", error_id)
        return worker_protocol.encode_error(
            "INTERNAL", f"internal error in the TorchServe worker (id {error_id})"
        )


class XaiHandler(BaseHandler):
    """Loads the archive's model directory into an :class:`Engine` and answers batches."""

    def __init__(self) -> None:
        super().__init__()
        self.engine: Engine | None = None
        self.pool: ThreadPoolExecutor | None = None

    def initialize(self, context: Any) -> None:
        """Loads ``config.yaml``, the model code and weights from the extracted archive.

        The engine limits come from ``xaiserve.limits`` in the archive's model-config.yaml,
        how forward-only batches run from ``xaiserve.forward``, whether requests run one at a
        time from ``xaiserve.concurrency`` (see :func:`serial`). The model goes to
        ``xaiserve.forward.device`` (``auto`` by default: the GPU TorchServe gave the worker,
        ``gpu_id``, when torch sees GPUs, else the CPU; a model's config.yaml ``device``
        wins), ONNX Runtime's GPU providers to the same GPU. torch gets the threads of
        :func:`torch_threads`. The archive's ``model.onnx``, when there, is checked and used
        (see ``forward_backends``).

        A model that fails to load (or a bad model-config.yaml) does not fail the worker,
        which TorchServe would restart without end: the worker answers ListModels with the
        model as failed and its reason, and Explain with FAILED_PRECONDITION, as the
        embedded server does.
        """
        self.context = context
        self.manifest = context.manifest
        batch = int(context.system_properties.get("batch_size") or 1)
        self.pool = ThreadPoolExecutor(max_workers=batch, thread_name_prefix="xaiserve-batch")
        model_dir = Path(context.system_properties["model_dir"])
        yaml_config = getattr(context, "model_yaml_config", None)
        gpu = context.system_properties.get("gpu_id")
        gpu = None if gpu is None else int(gpu)  # the worker's GPU, on hosts with GPUs
        try:
            configure_torch_threads(torch_threads())
            limits = engine_limits(yaml_config)
            config = forward_config(yaml_config)
            one_at_a_time = serial(yaml_config)
            try:
                device = resolve_device(config.device, gpu)
            except ValueError as err:
                raise ModelLoadError(f"model-config.yaml: xaiserve.forward.device {err}") from None
            served = load_model_dir(model_dir, device, gpu)
        except Exception as err:
            logger.error(
                "model directory %s not served: %s",
                model_dir,
                err,
                exc_info=not isinstance(err, ModelLoadError),
            )
            failure = failed_model(model_dir, err)
            name = ((self.manifest or {}).get("model") or {}).get("modelName")
            if name:  # the name the gateway asks for, whatever config.yaml holds
                failure = replace(failure, name=str(name))
            self.engine = Engine({}, EngineLimits(), failed=[failure])
            self.initialized = True
            return
        if gpu is not None and config.onnx_device_id is None:  # also where torch has no CUDA
            config = replace(config, onnx_device_id=gpu)
        self.engine = Engine({served.config.name: served}, limits, config, serial=one_at_a_time)
        self.engine.warm_up()
        self.initialized = True
        logger.info(
            "xaiserve handler %s: model %s version %s from %s on %s (torch threads %d)",
            "ready" if self.engine.models else "failed",
            served.config.name,
            served.config.version,
            model_dir,
            served.device,
            torch.get_num_threads(),
        )

    def handle(self, data: list[Mapping[str, Any]], context: Any) -> list[bytes]:
        """One answer per request, in order (see :func:`answer`). The batch's requests run
        at once, each on a thread of the pool, so their device work shares the model's
        calls (the engine's executor) as the requests of the embedded server do."""
        if self.engine is None or self.pool is None:
            raise RuntimeError("handle() before initialize()")
        start = time.perf_counter()
        answers = list(self.pool.map(functools.partial(answer, self.engine), data))
        size = len(data)
        logger.info("xaiserve batch size=%d seconds=%.3f", size, time.perf_counter() - start)
        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            metrics.add_counter(BATCH_METRIC, 1, None, [Dimension("BatchSize", str(size))])
        return answers
