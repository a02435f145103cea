"""``--processes N``: children sharing one port, their metrics summed, a killed child
restarted, a child that cannot start stopping the server, the children's threads."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.api.v1 import explain_pb2_grpc
from xaiserve.gateway import processes
from xaiserve.gateway.settings import Settings
from xaiserve.runtime.cpus import OMP_ENV

CALLS = 16  # on separate connections; all on one of 2 processes: odds 2 in 65,536


class Supervised:
    """A ``--processes`` server in its own process group, its log collected."""

    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "xaiserve.gateway.server", *args],
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 120.0) -> list[str]:
        end = time.monotonic() + timeout
        while len(found := re.findall(pattern, self.log)) < count:
            assert time.monotonic() < end, f"no {count} x {pattern!r} in:\n{self.log[-4000:]}"
            assert self.process.poll() is None, f"exited {self.process.poll()}:\n{self.log}"
            time.sleep(0.1)
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.reader.join(10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _png() -> bytes:
    pixels = (np.random.default_rng(7).random((64, 64, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _explain_on_own_connections(port: int, calls: int) -> list[pb.ExplainResponse]:
    request = pb.ExplainRequest(
        model_name="demo",
        image=pb.Image(encoded=_png()),
        methods=[pb.MethodRequest(method=pb.SALIENCY)],
    )
    answers = []
    for _ in range(calls):
        options = [("grpc.use_local_subchannel_pool", 1)]  # a new TCP connection each
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = explain_pb2_grpc.ExplanationServiceStub(channel)
            answers.append(stub.Explain(request, timeout=60))
    return answers


def _ok_calls(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "xaiserve_request_duration_seconds_count" and sample.labels == {
                "model": "demo",
                "code": "OK",
            }:
                return sample.value
    return 0.0


@pytest.fixture
def store(tmp_path: Path, demo_model_dir: Path) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    (root / "demo").symlink_to(demo_model_dir, target_is_directory=True)
    return root


@pytest.fixture
def two_processes(store: Path) -> Iterator[tuple[Supervised, int, int]]:
    metrics_port = _free_port()
    server = Supervised(
        [
            *("--model-store", str(store), "--processes", "2", "--port", "0"),
            *("--metrics-port", str(metrics_port), "--grace-seconds", "2"),
        ]
    )
    try:
        port = int(server.wait_for(r"2 server processes on 127\.0\.0\.1:(\d+)")[0])
        server.wait_for(rf"listening on 127\.0\.0\.1:{port}", count=2)
        yield server, port, metrics_port
    finally:
        server.stop()


def test_processes_share_the_port_answer_alike_and_sum_their_metrics(
    two_processes: tuple[Supervised, int, int],
) -> None:
    server, port, metrics_port = two_processes
    with socket.socket() as other, pytest.raises(OSError):  # a server that does not share
        other.bind(("127.0.0.1", port))

    another_supervisor = processes.hold_port("127.0.0.1", port)
    with pytest.raises(processes.SupervisorError, match="cannot listen"), another_supervisor:
        pass

    answers = _explain_on_own_connections(port, CALLS)

    maps = [np.frombuffer(a.explanations[0].map.data, np.float32) for a in answers]
    assert maps[0].size == 64 * 64 and np.abs(maps[0]).max() > 0
    for other_map in maps[1:]:
        np.testing.assert_allclose(other_map, maps[0], atol=1e-6)
    answering = set(re.findall(r"\[(\d+)\] xaiserve\.gateway\.servicer: Explain .*OK", server.log))
    assert len(answering) == 2  # both children answered
    assert _ok_calls(metrics_port) == CALLS  # the supervisor's sum over both


def test_a_killed_process_is_restarted_and_sigterm_stops_them_all(
    two_processes: tuple[Supervised, int, int],
) -> None:
    server, port, _ = two_processes
    children = [int(p) for p in server.wait_for(r"server process \d: pid (\d+)", count=2)]
    os.kill(children[0], signal.SIGKILL)

    server.wait_for(rf"pid {children[0]}\) ended \(signal SIGKILL\); restarting it")
    server.wait_for(r"server process 0: pid (\d+)", count=2)
    server.wait_for(rf"listening on 127\.0\.0\.1:{port}", count=3)
    assert all(a.explanations for a in _explain_on_own_connections(port, 4))

    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0
    new_child = int(re.findall(r"server process 0: pid (\d+)", server.log)[-1])
    for pid in (children[1], new_child):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_process_that_cannot_start_stops_the_server(tmp_path: Path) -> None:
    server = Supervised(
        ["--model-store", str(tmp_path), "--processes", "2", "--port", "0", "--metrics-port", "0"]
    )
    try:
        assert server.process.wait(120) == 1
        server.reader.join(10)
        failed = r"server process \d \(pid \d+\) exited with status 1; stopping"
        assert re.search(failed, server.log)
        assert "cannot serve" in server.log
    finally:
        server.stop()


def test_children_split_the_usable_cpus_unless_threads_are_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(processes, "usable_cpus", lambda: 8)
    monkeypatch.delenv(OMP_ENV, raising=False)
    command = processes.child_command(Settings(processes=3), ["--device", "cpu"], 5005)
    flags = command[command.index("xaiserve.gateway.server") + 1 :]
    assert flags[:2] == ["--device", "cpu"]  # the supervisor's own flags first, then
    assert flags[2:] == [
        *("--processes", "1", "--reuse-port", "--port", "5005", "--metrics-port", "0"),
        *("--no-build-demo", "--torch-threads", "2", "--onnx-threads", "2"),
    ]
    settings = Settings(processes=3, torch_threads=4, onnx_threads=1)
    assert processes.child_threads(settings, {}) == {}
    assert processes.child_threads(Settings(processes=16), {OMP_ENV: "2"}) == {"onnx_threads": 1}


CHILD = """
import sys, time
from xaiserve.gateway.processes import follow_supervisor
follow_supervisor()
print("following", flush=True)
time.sleep(60)
"""
PARENT = """
import os, subprocess, sys
from xaiserve.gateway.processes import SUPERVISOR_ENV
child = subprocess.Popen(
    [sys.executable, "-c", sys.argv[1]], env={**os.environ, SUPERVISOR_ENV: str(os.getpid())}
)
print(child.pid, flush=True)
child.wait()
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; its new parent may not reap it at once


def test_children_end_with_a_killed_supervisor() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "following"
    assert _alive(child)

    parent.kill()
    parent.wait()
    end = time.monotonic() + 10
    while _alive(child) and time.monotonic() < end:
        time.sleep(0.05)
    assert not _alive(child)
