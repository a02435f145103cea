"""A real TorchServe for the whole session (started on free ports, stopped at the end) and
gateways in front of it: in this process (on a background event loop) or as a process.

TorchServe serves two archives: ``demo`` (the trained demo model; batches of up to 8,
50 ms batch delay, one worker) and ``tiny`` (the tiny test model; no batching and a job
queue of one, to see TorchServe refuse work).
"""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.gateway import free_port
from support.servers import start_server
from support.service_fakes import LoopThread
from support.tiny_models import write_tiny_model_dir
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.gateway.backends import Backend, LocalBackend
from xaiserve.gateway.settings import Settings
from xaiserve.gateway.torchserve_backend import TorchServeBackend
from xaiserve.gateway.torchserve_process import TorchServeConfig, TorchServeProcess
from xaiserve.runtime.model import load_model_dir

MODELS = ("demo", "tiny")
STARTUP_SECONDS = 240.0


@dataclass
class TorchServeStack:
    """The session's TorchServe and what the tests need to know about it."""

    config: TorchServeConfig
    process: TorchServeProcess
    demo_dir: Path
    tiny_dir: Path

    def backend(self, key_file: Path | None = None) -> TorchServeBackend:
        """A gateway backend over this TorchServe."""
        return TorchServeBackend(self.config.grpc_target, key_file or self.config.key_file, MODELS)

    def stop(self) -> None:
        self.process.stop()

    def start(self) -> None:
        """Starts TorchServe again with the same configuration (it writes new keys)."""
        self.process = TorchServeProcess.start(self.config)
        self.process.wait_ready(STARTUP_SECONDS)

    def batch_sizes(self) -> dict[int, float]:
        """Batches the handler has served so far, by size (TorchServe's Prometheus endpoint)."""
        with urllib.request.urlopen(self.config.metrics_url, timeout=10) as reply:
            text = reply.read().decode("utf-8")
        counts: dict[int, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (
                    sample.name.startswith("XaiserveBatches")
                    and sample.labels.get("ModelName") == "demo"
                ):
                    size = int(sample.labels["BatchSize"])
                    counts[size] = counts.get(size, 0.0) + sample.value
        return counts

    def model_log(self) -> str:
        path = self.config.workdir / "logs" / "model_log.log"
        return path.read_text(errors="replace") if path.is_file() else ""


@pytest.fixture(scope="session")
def torchserve(
    tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path
) -> Iterator[TorchServeStack]:
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 17 or newer on the PATH")
    pytest.importorskip("ts")
    from xaiserve.model_store.archive import ArchiveSettings, build_archive

    root = tmp_path_factory.mktemp("ts")
    store = root / "store"
    build_archive(
        demo_model_dir,
        store,
        ArchiveSettings(batch_size=8, max_batch_delay_ms=50, response_timeout_s=120),
    )
    tiny_dir = write_tiny_model_dir(root / "tiny")
    build_archive(
        tiny_dir, store, ArchiveSettings(batch_size=1, max_batch_delay_ms=0, job_queue_size=1)
    )
    config = TorchServeConfig(
        model_store=store,
        workdir=root / "run",
        grpc_inference_port=free_port(),
        grpc_management_port=free_port(),
        http_inference_port=free_port(),
        management_port=free_port(),
        metrics_port=free_port(),
    )
    process = TorchServeProcess.start(config)
    stack = TorchServeStack(config, process, demo_model_dir, tiny_dir)
    try:
        process.wait_ready(STARTUP_SECONDS)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def demo_engine(demo_model_dir: Path) -> Engine:
    """The engine the local backend runs, over the same demo model directory."""
    return Engine({"demo": load_model_dir(demo_model_dir)}, EngineLimits())


@dataclass
class Gateway:
    """A gateway started in this process."""

    port: int
    backend: Backend

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def start_gateway(aio_loop: LoopThread) -> Iterator[Callable[..., Gateway]]:
    """``start_gateway(backend, **settings)``: a gateway on a free port, stopped afterwards."""
    started: list[tuple[grpc.aio.Server, Backend]] = []

    def start(backend: Backend, **overrides: Any) -> Gateway:
        settings = Settings(**{"port": 0, "metrics_port": 0, **overrides})
        server, port = aio_loop.run(start_server(settings, backend), 60)
        started.append((server, backend))
        return Gateway(port=port, backend=backend)

    yield start
    for server, backend in started:
        aio_loop.run(server.stop(0), 60)
        aio_loop.run(backend.close(), 60)


@pytest.fixture
def local_backend(demo_engine: Engine) -> LocalBackend:
    return LocalBackend(demo_engine, workers=2)
