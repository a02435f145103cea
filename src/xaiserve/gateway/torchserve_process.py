"""Starts and stops a TorchServe server for the gateway's ``torchserve`` backend.

Used by ``xaiserve.gateway.stack`` (``make stack-up``) and by the tests. TorchServe runs
with token authorization on (its default: it writes ``key_file.json`` into its working
directory), Prometheus metrics, and every API bound to ``127.0.0.1`` except where
configured otherwise; the management API is always bound to ``127.0.0.1``. Each instance
keeps everything it writes (config.properties, the key file, logs, the temporary directory
with its worker sockets and extracted archives) under its own working directory, so
several instances can run on one machine.

TorchServe is started through its ``torchserve --foreground`` launcher in a new session;
stopping it signals that whole process group (launcher, Java frontend, Python workers).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from xaiserve.api.errors import XaiError

logger = logging.getLogger(__name__)

KEY_FILE = "key_file.json"
MANIFEST = "MAR-INF/MANIFEST.json"


class TorchServeError(RuntimeError):
    """TorchServe could not be started, or did not become ready in time."""


@dataclass(frozen=True)
class TorchServeConfig:
    """What a TorchServe instance is started with.

    model_store: directory of ``.mar`` archives; every one is loaded at start.
    workdir: TorchServe's working directory (key file, logs, temporary files).
    host: address of the inference (gRPC and HTTP) and metrics APIs.
    grpc_inference_port, grpc_management_port, http_inference_port, management_port,
        metrics_port: the ports (the gateway uses the gRPC inference API only).
    max_message_bytes: largest request and response TorchServe accepts.
    token_expiration_min: lifetime of the keys in the key file; TorchServe rejects an
        expired key, so a long-running stack uses a long lifetime (or rotates the key
        with TorchServe's token API; the gateway re-reads the key file when it changes).
    """

    model_store: Path
    workdir: Path
    host: str = "127.0.0.1"
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    http_inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    max_message_bytes: int = 32 * 1024 * 1024
    token_expiration_min: int = 7 * 24 * 60

    @property
    def grpc_target(self) -> str:
        """``host:port`` of the gRPC inference API."""
        return f"{self.host}:{self.grpc_inference_port}"

    @property
    def key_file(self) -> Path:
        """Where TorchServe writes its keys."""
        return self.workdir / KEY_FILE

    @property
    def metrics_url(self) -> str:
        """The Prometheus metrics endpoint."""
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def properties(self) -> dict[str, str]:
        """The contents of config.properties."""
        return {
            "inference_address": f"http://{self.host}:{self.http_inference_port}",
            "management_address": f"http://127.0.0.1:{self.management_port}",
            "metrics_address": f"http://{self.host}:{self.metrics_port}",
            "grpc_inference_address": self.host,
            "grpc_inference_port": str(self.grpc_inference_port),
            "grpc_management_address": "127.0.0.1",
            "grpc_management_port": str(self.grpc_management_port),
            "model_store": str(self.model_store.resolve()),
            "load_models": "all",
            "metrics_mode": "prometheus",
            # custom metrics of the handler (XaiserveBatches) are exported without a
            # metrics.yaml entry
            "model_metrics_auto_detect": "true",
            "disable_system_metrics": "true",
            "max_request_size": str(self.max_message_bytes),
            "max_response_size": str(self.max_message_bytes),
            "token_expiration_min": str(self.token_expiration_min),
            # the model API (registering archives from URLs) stays off, as by default
            "enable_model_api": "false",
        }


def model_names(model_store: Path) -> list[str]:
    """The model names of the archives in ``model_store`` (from their manifests), sorted."""
    names = []
    for archive in sorted(Path(model_store).glob("*.mar")):
        try:
            with zipfile.ZipFile(archive) as packed:
                manifest = json.loads(packed.read(MANIFEST))
            names.append(str(manifest["model"]["modelName"]))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
            raise TorchServeError(f"{archive}: not a model archive ({error})") from None
    return sorted(names)


def read_inference_key(key_file: Path) -> str:
    """The inference key of a TorchServe key file.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file holds no inference key.
    """
    document = json.loads(Path(key_file).read_text())
    try:
        key = document["inference"]["key"]
    except (KeyError, TypeError):
        raise ValueError(f"{key_file}: no inference key") from None
    if not isinstance(key, str) or not key:
        raise ValueError(f"{key_file}: no inference key")
    return key


def answers(target: str, key_file: Path, models: Sequence[str], timeout: float = 5.0) -> bool:
    """Whether TorchServe at ``target`` is Healthy and answers a ``list_models`` request
    for each of ``models`` (blocking; False on any failure)."""
    import grpc  # the stack's ``down`` and ``status`` never need it
    from google.protobuf import empty_pb2

    from xaiserve.api import worker_protocol
    from xaiserve.api.torchserve import inference_pb2, inference_pb2_grpc

    try:
        metadata = (("authorization", f"Bearer {read_inference_key(key_file)}"),)
    except (OSError, ValueError):
        return False
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        try:
            health = stub.Ping(empty_pb2.Empty(), timeout=timeout, metadata=metadata).health
            if json.loads(health).get("status") != "Healthy":
                return False
            for name in models:
                request = inference_pb2.PredictionsRequest(
                    model_name=name, input=worker_protocol.list_models_inputs()
                )
                reply = stub.Predictions(request, timeout=timeout, metadata=metadata)
                worker_protocol.decode_answer(reply.prediction)
        except (grpc.RpcError, ValueError, XaiError):
            return False
    return True


class TorchServeProcess:
    """A TorchServe instance started by :meth:`start`; :meth:`stop` ends it."""

    def __init__(self, config: TorchServeConfig, process: subprocess.Popen[bytes]) -> None:
        self.config = config
        self.process = process

    @property
    def pid(self) -> int:
        """Process id of the launcher, which is also the id of the process group."""
        return self.process.pid

    @property
    def log_file(self) -> Path:
        """The launcher's and frontend's console output."""
        return self.config.workdir / "torchserve.out"

    @classmethod
    def start(cls, config: TorchServeConfig) -> TorchServeProcess:
        """Writes config.properties into ``config.workdir`` and starts TorchServe there.

        Returns at once; call :meth:`wait_ready` before sending requests.
        """
        workdir = config.workdir.resolve()
        tmp = workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o700)  # the key file is written here
        (workdir / KEY_FILE).unlink(missing_ok=True)  # never hand out a previous run's key
        properties = workdir / "config.properties"
        properties.write_text("".join(f"{k}={v}\n" for k, v in config.properties().items()))
        env = dict(os.environ)
        env.update(
            TMPDIR=str(tmp),  # the launcher's pid file
            TEMP=str(tmp),  # java.io.tmpdir: worker sockets, extracted archives
            LOG_LOCATION=str(workdir / "logs"),
            METRICS_LOCATION=str(workdir / "logs"),
        )
        command = [
            sys.executable,
            "-m",
            "ts.model_server",
            "--start",
            "--foreground",
            "--ncs",
            "--ts-config",
            str(properties),
            "--model-store",
            str(config.model_store.resolve()),
        ]
        with (workdir / "torchserve.out").open("ab") as out:
            process = subprocess.Popen(
                command,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        logger.info(
            "torchserve started (pid %d): gRPC inference %s, store %s",
            process.pid,
            config.grpc_target,
            config.model_store,
        )
        return cls(config, process)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Waits until TorchServe answers Ping as Healthy and every archive's handler
        answers (so each model has a worker that has loaded it).

        Raises:
            TorchServeError: it exited, or was not ready within ``timeout`` seconds.
        """
        expected = model_names(self.config.model_store)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TorchServeError(
                    f"torchserve exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if answers(self.config.grpc_target, self.config.key_file, expected):
                return
            time.sleep(0.5)
        raise TorchServeError(f"torchserve not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the console output and of ts_log.log."""
        tails = []
        for path in (self.log_file, self.config.workdir / "logs" / "ts_log.log"):
            if path.is_file():
                tails.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(tails)

    def stop(self, timeout: float = 30.0) -> None:
        """Stops the whole process group (SIGTERM, then SIGKILL after ``timeout`` s)."""
        stop_process_group(self.pid, timeout)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.warning("torchserve launcher %d did not exit", self.pid)
        self.config.key_file.unlink(missing_ok=True)


def stop_process_group(pgid: int, timeout: float = 30.0) -> bool:
    """Sends SIGTERM to the process group ``pgid``, SIGKILL if it outlives ``timeout`` s.

    Returns False if there was no such group.
    """
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pgid, os.WNOHANG)  # the leader may be our child: reap it
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    logger.warning("process group %d did not stop in %.0f s; killing it", pgid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    return True
