"""The real gateway in its own process (``python -m xaiserve.gateway.server``, health
watcher and signal handling included), a channel to a gateway, and a PNG for the tiny
model."""

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

import grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from .tiny_models import write_tiny_model_dir

STARTUP_SECONDS = 60
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # as XaiClient's channel


@dataclass(frozen=True)
class Gateway:
    """A running ``xaiserve-server``: its gRPC port, its metrics port (0: none asked
    for) and its log so far."""

    port: int
    log: list[str]
    metrics_port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

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


def open_channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A channel to ``target`` (TLS with ``credentials``, else plaintext) for stubs of any
    service, with XaiClient's message size limits."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def tiny_png(seed: int = 0) -> bytes:
    """A 16 x 16 RGB PNG for the tiny model."""
    pixels = bytes((seed * 31 + i * 7) % 256 for i in range(16 * 16 * 3))
    buffer = io.BytesIO()
    Image.frombytes("RGB", (16, 16), pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def gateway_process(*flags: str, metrics_port: int = 0) -> Iterator[Gateway]:
    """Starts ``python -m xaiserve.gateway.server FLAGS --port 0``; SIGTERM at the end.

    metrics_port: the ``--metrics-port`` among ``flags``, if any (for ``Gateway.scrape``).
    """
    command = [sys.executable, "-m", "xaiserve.gateway.server", "--port", "0", *flags]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    listening = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if "listening on" in line:
                listening.set()
        listening.set()  # the process ended

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        listening.wait(STARTUP_SECONDS)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(lines))
        assert match, "gateway did not start:\n" + "".join(lines)
        yield Gateway(port=int(match.group(1)), log=lines, metrics_port=metrics_port)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(10)


@contextmanager
def running_gateway(model_store: Path, extra_args: Sequence[str] = ()) -> Iterator[Gateway]:
    """A gateway process over the tiny model (written to ``model_store/tiny``), one worker,
    metrics on a free port.

    extra_args: more ``xaiserve-server`` flags (``--max-message-bytes``, ...).
    """
    write_tiny_model_dir(model_store / "tiny")
    metrics_port = free_port()
    flags = ["--model-store", str(model_store), "--metrics-port", str(metrics_port)]
    with gateway_process(*flags, "--workers", "1", *extra_args, metrics_port=metrics_port) as g:
        yield g
