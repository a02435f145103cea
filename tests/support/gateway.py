"""The real gateway in its own process (``xaiserve-server`` over the tiny model), for the
metrics and dashboard tests."""

from __future__ import annotations

import io
import re
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from .tiny_models import write_tiny_model_dir

STARTUP_SECONDS = 60


@dataclass(frozen=True)
class Gateway:
    """A running ``xaiserve-server``: its gRPC and metrics ports and its log so far."""

    port: int
    metrics_port: int
    log: list[str]

    def scrape(self) -> str:
        """The text of ``GET /metrics``."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.status == 200
            return reply.read().decode("utf-8")

    def samples(self) -> list[Sample]:
        """Every sample of a scrape, parsed."""
        return [
            s for family in text_string_to_metric_families(self.scrape()) for s in family.samples
        ]


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tiny_png(seed: int = 0) -> bytes:
    """A 16 x 16 RGB PNG for the tiny model."""
    pixels = bytes((seed * 31 + i * 7) % 256 for i in range(16 * 16 * 3))
    buffer = io.BytesIO()
    Image.frombytes("RGB", (16, 16), pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _read_lines(stream, lines: list[str], found: threading.Event) -> None:
    for line in stream:
        lines.append(line)
        if "listening on" in line:
            found.set()
    found.set()  # the process ended


@contextmanager
def running_gateway(model_store: Path, extra_args: Sequence[str] = ()) -> Iterator[Gateway]:
    """Starts ``python -m xaiserve.gateway.server`` over the tiny model; SIGTERM at the end.

    extra_args: more ``xaiserve-server`` flags (``--max-message-bytes``, ...).
    """
    write_tiny_model_dir(model_store / "tiny")
    metrics_port = free_port()
    command = [
        sys.executable,
        "-m",
        "xaiserve.gateway.server",
        "--model-store",
        str(model_store),
        "--port",
        "0",
        "--metrics-port",
        str(metrics_port),
        "--workers",
        "1",
        *extra_args,
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    listening = threading.Event()
    reader = threading.Thread(target=_read_lines, args=(process.stderr, lines, listening))
    reader.start()
    try:
        listening.wait(STARTUP_SECONDS)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(lines))
        assert match, "gateway did not start:\n" + "".join(lines)
        yield Gateway(port=int(match.group(1)), metrics_port=metrics_port, log=lines)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(10)
