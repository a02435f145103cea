"""``xaiserve-server`` in its own process (health watcher and signal handling included)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class GatewayProcess:
    """``xaiserve-server`` in its own process, with its log so far."""

    port: int
    process: subprocess.Popen[str]
    log: list[str]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextmanager
def gateway_process(*flags: str) -> Iterator[GatewayProcess]:
    """Starts ``python -m xaiserve.gateway.server FLAGS --port 0``; SIGTERM at the end."""
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
        listening.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        listening.wait(60)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(lines))
        assert match, "gateway did not start:\n" + "".join(lines)
        yield GatewayProcess(port=int(match.group(1)), process=process, log=lines)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(10)
