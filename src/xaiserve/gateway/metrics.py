"""Prometheus metrics of the gateway: every collector, in one place.

Names follow the Prometheus conventions: one prefix, ``xaiserve_``; durations in seconds;
counters end in ``_total``. Every label has a fixed, small vocabulary, so nothing a client
sends can create new series:

``model``
    a model the backend serves: names come from ``ListModels`` (at start-up and on every
    ``ListModels`` call) and from answered calls; any other name (a typo, a probe) is
    counted as ``other``.
``method``
    a method of the API's catalog (``saliency``, ``grad_cam``, ...) or ``other``. Request
    latency carries no method: a call's set of methods would multiply the series (26
    methods make 2^26 sets); ``method_requests_total`` counts each method of a call once
    instead, one series per method.
``stage``
    request stages :data:`REQUEST_STAGES`, per-method stages :data:`METHOD_STAGES`,
    forward-pass stages :data:`FORWARD_STAGES` (anything else: ``other``).
``code``
    a gRPC status code name (``OK``, ``INVALID_ARGUMENT``, ``NOT_FOUND``, ...; 17 in all).
``rpc``
    ``Explain`` or ``ListModels`` (:data:`RPCS`).

So a family's series are at most the product of its labels' vocabularies, whatever the
number of calls (``tests/gateway/test_metrics_series.py`` checks it over 1,000 random
calls).

Who records what: the engine measures its own stages and returns them in
:class:`~xaiserve.api.types.ExplainResult` (``timings``, ``forward_passes``, each
explanation's ``timings`` and ``reliability``); the TorchServe handler sends the same
record back to the gateway. So the gateway records every stage for both backends
(:meth:`Metrics.observe_explain`), and neither the engine nor the handler imports
Prometheus. TorchServe's own queue and worker metrics come from TorchServe's metrics
endpoint (``metrics_mode=prometheus``); :data:`TORCHSERVE_METRICS` lists the names the
dashboard uses.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from xaiserve.api import catalog
from xaiserve.api.types import ExplainResult
from xaiserve.api.v1 import explain_pb2 as pb

logger = logging.getLogger(__name__)

PREFIX = "xaiserve_"
#: The ``method`` vocabulary: the API's catalog (proto enum names, lower-cased).
METHODS: frozenset[str] = frozenset(catalog.METHODS)
#: The ``code`` vocabulary: gRPC's status code names.
CODES: frozenset[str] = frozenset(code.name for code in grpc.StatusCode)
#: The ``rpc`` vocabulary: the explanation service's methods.
RPCS: frozenset[str] = frozenset(
    pb.DESCRIPTOR.services_by_name["ExplanationService"].methods_by_name
)
OTHER = "other"

#: Request stages: ``decode``, ``predict`` and ``engine`` (all of the engine's work, its
#: ``total``) come from the result; ``backend`` is the gateway's round trip to the backend.
REQUEST_STAGES = ("decode", "predict", "engine", "backend")
#: Per-method stages, from each explanation's timings.
METHOD_STAGES = ("attribute", "postprocess", "gad", "apem", "filter")
#: Stages images are charged to (``Budget.by_stage``); anything else counts as ``other``.
FORWARD_STAGES = ("predict", "attribute", "apem", "apem_filter")
#: Timing keys of the engine that are recorded under another stage name.
STAGE_ALIASES = {"total": "engine", "apem_filter": "filter"}

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STAGE_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: APEM is an L1 perturbation size in pixel units (eps_plus - eps_minus), up to C x H x W.
#: With negative buckets prometheus-client exposes no ``_sum`` (it would not be a counter):
#: dashboards read these histograms through their buckets.
APEM_BUCKETS = (
    -1000.0,
    -100.0,
    -10.0,
    -1.0,
    0.0,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    50.0,
    100.0,
    200.0,
    500.0,
    1000.0,
    2000.0,
    5000.0,
    10000.0,
    20000.0,
    50000.0,
    100000.0,
)
#: APEM_norm is dimensionless; random maps score near 0.
APEM_NORM_BUCKETS = (
    -5.0,
    -2.0,
    -1.0,
    -0.5,
    -0.2,
    -0.1,
    0.0,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    50.0,
)

#: TorchServe's own Prometheus metrics (``metrics_mode=prometheus``, default metrics.yaml of
#: TorchServe 0.12, served on its metrics port 8082) that the dashboard queries, with the
#: names exactly as TorchServe 0.12 exposes them. Counters of cumulative microseconds are
#: divided by ``ts_inference_requests_total`` for a mean.
TORCHSERVE_METRICS: dict[str, str] = {
    "ts_inference_requests_total": "counter: inference requests {model_name, model_version}",
    "ts_inference_latency_microseconds": "counter: cumulative inference time {model_name, ...}",
    "ts_queue_latency_microseconds": "counter: cumulative time in the job queue {model_name, ...}",
    "QueueTime": "gauge: time in the queue of the last job, ms {Level, Hostname}",
    "WorkerThreadTime": "gauge: time in the worker thread besides inference, ms",
    "HandlerTime": "gauge: time in the handler of the last batch, ms {ModelName, Level}",
    "GPUUtilization": "gauge: percent {Level, DeviceId, Hostname}",
    "GPUMemoryUsed": "gauge: megabytes {Level, DeviceId, Hostname}",
    "Requests4XX": "counter: HTTP 4xx answers {Level, Hostname}",
    "Requests5XX": "counter: HTTP 5xx answers {Level, Hostname}",
    # the xaiserve handler's own counter (xaiserve.worker.torchserve_handler)
    "XaiserveBatches": "counter: batches the handler ran {BatchSize, ModelName, Level, ...}",
}


def _label(value: str, vocabulary: frozenset[str]) -> str:
    """``value`` if it is in ``vocabulary``, else ``other``."""
    return value if value in vocabulary else OTHER


def _stage(key: str, vocabulary: Sequence[str]) -> str | None:
    stage = STAGE_ALIASES.get(key, key)
    return stage if stage in vocabulary else None


@dataclass
class MetricsHttpServer:
    """The ``/metrics`` endpoint: a WSGI server on a daemon thread."""

    httpd: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.httpd.server_port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class Metrics:
    """The gateway's collectors, in their own registry (one per server; tests make many).

    Thread-safe, as prometheus-client collectors are.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:  # a server's own registry, with the process's standard metrics
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        self._models: set[str] = set()
        self._lock = threading.Lock()

        def histogram(
            name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]
        ) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=registry)

        self.request_duration = histogram(
            "request_duration_seconds",
            "Explain calls: seconds from arrival to answer, by model and status.",
            ("model", "code"),
            REQUEST_BUCKETS,
        )
        self.method_requests = Counter(
            PREFIX + "method_requests",
            "Explain calls asking for each method (each method once per call, whatever the "
            "answer), by model and method.",
            ("model", "method"),
            registry=registry,
        )
        self.requests_in_flight = Gauge(
            PREFIX + "requests_in_flight",
            "Explain calls being answered now.",
            registry=registry,
            multiprocess_mode="livesum",  # summed over the live processes of --processes
        )
        self.request_errors = Counter(
            PREFIX + "request_errors",
            "Calls answered with a status other than OK, by rpc and status code.",
            ("rpc", "code"),
            registry=registry,
        )
        self.stage_duration = histogram(
            "stage_duration_seconds",
            "Request stages of answered Explain calls: decode, predict, engine (all engine "
            "work), backend (the gateway's round trip to the backend).",
            ("model", "stage"),
            STAGE_BUCKETS,
        )
        self.method_stage_duration = histogram(
            "method_stage_duration_seconds",
            "Per-method stages of answered Explain calls: "
            "attribute, postprocess, gad, apem, filter.",
            ("model", "method", "stage"),
            STAGE_BUCKETS,
        )
        self.forward_passes = Counter(
            PREFIX + "forward_passes",
            "Images the model evaluated for answered Explain calls, by the stage they were "
            "charged to.",
            ("model", "stage"),
            registry=registry,
        )
        self.device_calls = Counter(
            PREFIX + "device_calls",
            "Device calls that ran the work of answered Explain calls, each shared by the "
            "requests packed into it (the sum of the answers' device_calls); divided by the "
            "answered calls, the packing factor: below 1 per pass, calls are shared.",
            ("model",),
            registry=registry,
        )
        self.apem_score = histogram(
            "apem_score",
            "APEM of returned maps (eps_plus - eps_minus, an L1 perturbation size in pixel "
            "units; higher is more reliable), by model and method.",
            ("model", "method"),
            APEM_BUCKETS,
        )
        self.apem_norm_score = histogram(
            "apem_norm_score",
            "APEM_norm of returned maps (against shuffled maps; random maps score near 0).",
            ("model", "method"),
            APEM_NORM_BUCKETS,
        )

    # ------------------------------------------------------------------ model vocabulary

    def add_models(self, names: Iterable[str]) -> None:
        """Adds served model names to the ``model`` vocabulary."""
        with self._lock:
            self._models.update(names)

    def model_label(self, name: str) -> str:
        """``name`` if it is a served model, else ``other``."""
        with self._lock:
            return name if name in self._models else OTHER

    # ------------------------------------------------------------------------- recording

    def observe_explain(
        self,
        model: str,
        methods: Iterable[str],
        code: str,
        seconds: float,
        result: ExplainResult | None = None,
        backend_seconds: float | None = None,
    ) -> None:
        """Records one finished ``Explain`` call.

        model: the requested model name (the result's name is used when there is one).
        methods: the requested method names, as the catalog spells them.
        code: the gRPC status code name the call was answered with.
        seconds: gateway time from arrival to answer.
        result: the backend's result for an answered call; its stage timings, forward
            passes and reliability scores are recorded.
        backend_seconds: the round trip to the backend of an answered call.
        """
        if result is not None:
            self.add_models([result.model])
            model = result.model
        label = self.model_label(model)
        code = _label(code, CODES)
        self.request_duration.labels(label, code).observe(seconds)
        for method in {_label(name, METHODS) for name in methods}:
            self.method_requests.labels(label, method).inc()
        if code != "OK":
            self.request_errors.labels("Explain", code).inc()
        if backend_seconds is not None:
            self.stage_duration.labels(label, "backend").observe(backend_seconds)
        if result is not None:
            self._observe_result(label, result)

    def observe_rpc_error(self, rpc: str, code: str) -> None:
        """Counts a failed call that :meth:`observe_explain` does not see: any ``ListModels``,
        and an ``Explain`` refused before the servicer (token, in-flight limit, size)."""
        self.request_errors.labels(_label(rpc, RPCS), _label(code, CODES)).inc()

    def _observe_result(self, model: str, result: ExplainResult) -> None:
        for key, seconds in result.timings.items():
            stage = _stage(key, REQUEST_STAGES)
            if stage is not None and stage != "backend":
                self.stage_duration.labels(model, stage).observe(seconds)
        for stage, images in result.forward_passes.items():
            label = stage if stage in FORWARD_STAGES else OTHER
            self.forward_passes.labels(model, label).inc(images)
        self.device_calls.labels(model).inc(result.device_calls)
        for explanation in result.explanations:
            method = explanation.method if explanation.method in METHODS else OTHER
            for key, seconds in explanation.timings.items():
                stage = _stage(key, METHOD_STAGES)
                if stage is not None:
                    self.method_stage_duration.labels(model, method, stage).observe(seconds)
            record = explanation.reliability
            if record is None or record.undefined_reason:
                continue
            if math.isfinite(record.apem):
                self.apem_score.labels(model, method).observe(record.apem)
            if record.apem_norm is not None and math.isfinite(record.apem_norm):
                self.apem_norm_score.labels(model, method).observe(record.apem_norm)

    # ----------------------------------------------------------------------- exposition

    def serve_http(self, host: str, port: int) -> MetricsHttpServer:
        """Serves ``/metrics`` (any path, in fact) on ``host:port`` from a daemon thread.

        Raises:
            OSError: the address cannot be bound.
        """
        addr = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        httpd, thread = start_http_server(port, addr=addr, registry=self.registry)
        return MetricsHttpServer(httpd, thread)
