"""Runs the gateway: ``xaiserve-server`` (``main``) and the pieces tests start directly.

The server carries three services: ``xaiserve.v1.ExplanationService``, ``grpc.health.v1``
(``""`` and the explanation service are SERVING while the backend is ready, NOT_SERVING from
the start of a shutdown) and server reflection. SIGTERM and SIGINT stop it gracefully:
health goes NOT_SERVING, new calls are refused, calls in flight get ``grace_seconds``.
``serve`` also answers Prometheus scrapes over HTTP on ``metrics_port`` (0: off).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import prometheus_client
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from xaiserve.api.errors import ModelLoadError
from xaiserve.api.v1 import explain_pb2, explain_pb2_grpc
from xaiserve.gateway import security
from xaiserve.gateway.admission import InFlightLimit, ReceiveRefusals
from xaiserve.gateway.backends import Backend, LocalBackend
from xaiserve.gateway.metrics import Metrics, MetricsHttpServer
from xaiserve.gateway.servicer import ExplanationServicer
from xaiserve.gateway.settings import SettingError, Settings, configure_logging, parse_settings

logger = logging.getLogger(__name__)

#: Full name of the explanation service, as health checks and reflection know it.
SERVICE_NAME: str = explain_pb2.DESCRIPTOR.services_by_name["ExplanationService"].full_name
#: Services whose health is reported ("" is the server as a whole).
HEALTH_SERVICES: tuple[str, ...] = ("", SERVICE_NAME)
#: How often ``serve`` asks the backend whether it is ready.
HEALTH_POLL_SECONDS = 5.0


class BindError(RuntimeError):
    """The server cannot listen on the configured address."""


@dataclass
class RunningServer:
    """A started server with what is needed to report health and stop it."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    metrics: Metrics

    async def set_serving(self, serving: bool) -> None:
        """Reports every service in :data:`HEALTH_SERVICES` as SERVING or NOT_SERVING."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in HEALTH_SERVICES:
            await self.health.set(service, status)

    async def stop(self, grace: float | None) -> None:
        """NOT_SERVING for good, then stop taking calls; calls in flight get ``grace`` s."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def _server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # a second server on a busy port must fail, not silently share it, unless the
        # processes of one server share it on purpose (--processes)
        ("grpc.so_reuseport", int(settings.reuse_port)),
    ]


async def start(
    settings: Settings, backend: Backend, metrics: Metrics | None = None
) -> RunningServer:
    """Builds, binds and starts the server on ``settings.address`` (port 0: a free port).

    Health is SERVING when this returns if the backend is ready, NOT_SERVING otherwise.
    Calls are recorded in ``metrics`` (a private registry when none is given).

    Raises:
        BindError: the address cannot be bound.
        SecurityConfigError: the TLS or token settings cannot be used.
    """
    metrics = metrics if metrics is not None else Metrics()
    credentials = security.server_credentials(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    )
    server = grpc.aio.server(
        options=_server_options(settings), interceptors=_interceptors(settings, metrics)
    )
    explain_pb2_grpc.add_ExplanationServiceServicer_to_server(
        ExplanationServicer(backend, settings.default_deadline_seconds, metrics), server
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        if credentials is None:
            port = server.add_insecure_port(settings.address)
        else:
            port = server.add_secure_port(settings.address, credentials)
    except RuntimeError as error:
        raise BindError(f"cannot listen on {settings.address}: {error}") from None
    if port == 0:
        raise BindError(f"cannot listen on {settings.address}")
    running = RunningServer(server=server, port=port, health=health, metrics=metrics)
    await running.set_serving(False)
    await server.start()
    ready = await backend.ready()
    if ready:
        await _learn_models(metrics, backend)
    await running.set_serving(ready)
    return running


def _interceptors(settings: Settings, metrics: Metrics) -> list[grpc.aio.ServerInterceptor]:
    """The count of messages gRPC refuses (over ``max_message_bytes``), bearer-token
    authentication (when a token file is set), then the in-flight limit; each refusal is
    counted in the error metrics."""
    interceptors: list[grpc.aio.ServerInterceptor] = [
        ReceiveRefusals((SERVICE_NAME,), on_reject=metrics.observe_rpc_error)
    ]
    if settings.auth_token_file:
        interceptors.append(
            security.BearerTokenAuth(
                security.read_tokens(settings.auth_token_file),
                on_reject=metrics.observe_rpc_error,
                metered=(SERVICE_NAME,),
            )
        )
    interceptors.append(
        InFlightLimit(settings.max_in_flight, (SERVICE_NAME,), on_reject=metrics.observe_rpc_error)
    )
    return interceptors


async def _learn_models(metrics: Metrics, backend: Backend) -> None:
    """Adds the backend's model names to the metrics' ``model`` label vocabulary."""
    try:
        models = await asyncio.wait_for(backend.list_models(), HEALTH_POLL_SECONDS)
    except Exception:
        logger.warning("cannot list the backend's models for metrics labels", exc_info=True)
        return
    metrics.add_models(m.name for m in models)


def start_metrics_http(settings: Settings, metrics: Metrics) -> MetricsHttpServer | None:
    """Serves ``metrics`` on ``settings.host:settings.metrics_port``; ``None`` when it is 0.

    Raises:
        BindError: the address cannot be bound.
    """
    if settings.metrics_port == 0:
        return None
    try:
        http = metrics.serve_http(settings.host, settings.metrics_port)
    except OSError as error:
        raise BindError(
            f"cannot serve metrics on {settings.host}:{settings.metrics_port}: {error}"
        ) from None
    logger.info("metrics on http://%s:%d/metrics", settings.host, http.port)
    return http


async def _watch_health(running: RunningServer, backend: Backend) -> None:
    """Keeps the health status in step with ``backend.ready()``."""
    serving: bool | None = None
    while True:
        try:
            ready = await backend.ready()
        except Exception:
            logger.exception("backend readiness probe failed")
            ready = False
        if ready != serving:
            logger.info("health: %s", "SERVING" if ready else "NOT_SERVING")
            if ready:
                await _learn_models(running.metrics, backend)
            await running.set_serving(ready)
            serving = ready
        await asyncio.sleep(HEALTH_POLL_SECONDS)


async def serve(settings: Settings, backend: Backend | None = None) -> None:
    """Serves until SIGTERM or SIGINT, then shuts down gracefully and closes the backend.

    ``backend`` defaults to :func:`build_backend` (settings.backend).
    """
    if backend is None:
        backend = build_backend(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            logger.warning("cannot handle %s here; stop the server another way", sig.name)
    metrics_http: MetricsHttpServer | None = None
    try:
        metrics = Metrics()
        metrics_http = start_metrics_http(settings, metrics)
        running = await start(settings, backend, metrics)
        logger.info(
            "listening on %s:%d (backend %s)", settings.host, running.port, settings.backend
        )
        watcher = asyncio.create_task(_watch_health(running, backend))
        try:
            await stop.wait()
        finally:
            logger.info("shutting down: %.1f s for calls in flight", settings.grace_seconds)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await running.stop(settings.grace_seconds)
    finally:
        if metrics_http is not None:
            metrics_http.stop()
        await backend.close()
        for sig in handled:
            loop.remove_signal_handler(sig)
    logger.info("stopped")


def build_backend(settings: Settings) -> Backend:
    """The backend named by ``settings.backend``, with its models loaded.

    The local backend serves the models that loaded; those that failed are listed by
    ListModels with their reason (see ``Engine``), and health is SERVING while one model
    is served.

    The local backend first sets torch's threads (``torch_threads``; 0: the CPUs this
    process may use) and checks ``device`` against the GPUs torch sees.

    Raises:
        ModelLoadError: the model store cannot be served (on the local backend: no model
            loaded; the message gives each directory's reason).
        SettingError: ``device`` names a GPU torch does not see.
    """
    if settings.backend == "local":
        from xaiserve.engine.engine import Engine  # torch: imported only when serving
        from xaiserve.runtime.device import configure_torch_threads, resolve_device

        configure_torch_threads(settings.torch_threads)
        try:
            device = resolve_device(settings.device)
        except ValueError as error:
            raise SettingError("device", str(error)) from None
        logger.info("local backend: models on %s unless their config.yaml says", device)
        engine = Engine.from_model_store(
            Path(settings.model_store),
            settings.engine_limits(),
            settings.forward_config(),
            serial=settings.serial,
        )
        models = ", ".join(sorted(engine.models))
        logger.info("local backend: models %s from %s", models, settings.model_store)
        for failed in engine.failed:  # listed by ListModels, answered FAILED_PRECONDITION
            logger.warning("model %s failed to load: %s", failed.name, failed.reason)
        engine.warm_up()
        return LocalBackend(engine, workers=settings.workers)
    if settings.backend == "torchserve":
        from xaiserve.gateway.torchserve_backend import TorchServeBackend
        from xaiserve.gateway.torchserve_process import TorchServeError, model_names

        names = [n.strip() for n in settings.torchserve_models.split(",") if n.strip()]
        if not names:
            try:
                names = model_names(Path(settings.model_store))
            except TorchServeError as error:
                raise ModelLoadError(str(error)) from None
        if not names:
            raise ModelLoadError(
                f"{settings.model_store}: no model archives (*.mar); build them with "
                "`python -m xaiserve.model_store.archive` or name them in --torchserve-models"
            )
        logger.info(
            "torchserve backend: models %s at %s", ", ".join(names), settings.torchserve_target
        )
        return TorchServeBackend(
            settings.torchserve_target,
            Path(settings.torchserve_key_file),
            names,
            max_message_bytes=settings.max_message_bytes,
        )
    raise ValueError(f"unknown backend {settings.backend!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """``xaiserve-server``: parse settings, build the demo model if asked, serve."""
    settings = parse_settings(argv)
    configure_logging(settings.log_level, process_ids=settings.processes > 1 or settings.reuse_port)
    prometheus_client.disable_created_metrics()  # no *_created series next to each counter
    if settings.build_demo:
        from xaiserve.model_store.build_demo import ensure_demo_model

        ensure_demo_model(Path(settings.model_store) / "demo", progress=True)
    from xaiserve.gateway.processes import follow_supervisor, supervise

    if settings.processes > 1:
        return supervise(settings, sys.argv[1:] if argv is None else argv)
    follow_supervisor()
    try:
        backend = build_backend(settings)
    except SettingError as error:
        logger.error("%s", error)
        return 2
    except ModelLoadError as error:
        logger.error("cannot serve %s: %s", settings.model_store, error)
        return 1
    try:
        asyncio.run(serve(settings, backend))
    except (BindError, security.SecurityConfigError) as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
