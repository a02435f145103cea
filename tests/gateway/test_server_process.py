"""``serve`` in its own process: listening log line, health, graceful SIGTERM; ``main``."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.api.v1 import explain_pb2_grpc
from xaiserve.gateway import server

TESTS = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    f"""
    import asyncio, sys
    sys.path.insert(0, {str(TESTS)!r})
    from support.service_fakes import FakeEngine, sleep_for
    from xaiserve.gateway.backends import LocalBackend
    from xaiserve.gateway.server import serve
    from xaiserve.gateway.settings import Settings, configure_logging

    configure_logging("INFO")
    engine = FakeEngine(behaviour=sleep_for(1.0))
    asyncio.run(serve(Settings(port=0, metrics_port=0, grace_seconds=5), LocalBackend(engine)))
    """
)


def _read_lines(stream, lines: list[str], found: threading.Event) -> None:
    for line in stream:
        lines.append(line)
        if "listening on" in line:
            found.set()


def test_sigterm_lets_calls_in_flight_finish() -> None:
    process = subprocess.Popen([sys.executable, "-c", SCRIPT], stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    listening = threading.Event()
    reader = threading.Thread(target=_read_lines, args=(process.stderr, lines, listening))
    reader.start()
    try:
        assert listening.wait(30), "".join(lines)
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(lines)).group(1))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

            stub = explain_pb2_grpc.ExplanationServiceStub(channel)
            request = pb.ExplainRequest(model_name="demo", image=pb.Image(encoded=b"png"))
            in_flight = stub.Explain.future(request, timeout=20)
            time.sleep(0.3)  # the engine is now busy for about a second
            process.send_signal(signal.SIGTERM)
            assert in_flight.result(20).model_name == "demo"  # finished within the grace
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(10)
    log = "".join(lines)
    assert "shutting down" in log and "stopped" in log


def test_main_fails_cleanly_without_models(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert server.main(["--model-store", str(tmp_path), "--port", "0"]) == 1
    assert "cannot serve" in caplog.text
