"""The full stack on one machine: TorchServe with the model archives, then the gateway.

    python -m xaiserve.gateway.stack up [--port 50051] [GATEWAY FLAGS...]   (make stack-up)
    python -m xaiserve.gateway.stack status
    python -m xaiserve.gateway.stack down                                     (make stack-down)

``up`` trains the demo model into the model store if it is missing, packs every model
directory of the store into a ``.mar`` archive, starts TorchServe (token authorization on,
Prometheus metrics, management API on 127.0.0.1 only) and waits until every model has a
worker, then starts ``xaiserve-server --backend torchserve`` over it and waits until the
gateway is SERVING. Both run in the background, in their own sessions; their PIDs, logs and
TorchServe's working directory (with its key file) are under ``--dir`` (``var/stack``).
Flags ``up`` does not know are passed to the gateway (``--auth-token-file``, TLS, ...), and
so are ``XAISERVE_*`` variables. ``down`` stops the gateway (gracefully: SIGTERM) and then
TorchServe.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from xaiserve.gateway.torchserve_process import (
    TorchServeConfig,
    TorchServeError,
    TorchServeProcess,
    stop_process_group,
)

logger = logging.getLogger("xaiserve.stack")

GATEWAY_PID = "gateway.pid"
TORCHSERVE_PID = "torchserve.pid"
GATEWAY_LOG = "gateway.log"
STARTUP_SECONDS = 180.0


def _alive(pid_file: Path) -> int | None:
    """The process group id in ``pid_file`` if that group still exists."""
    try:
        pgid = int(pid_file.read_text().strip())
        os.killpg(pgid, 0)
    except (OSError, ValueError):
        return None
    return pgid


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``up`` passes unknown flags on to the gateway."""
    parser = argparse.ArgumentParser(
        prog="python -m xaiserve.gateway.stack",
        description="Start or stop TorchServe and the gateway in front of it.",
    )
    parser.add_argument("--dir", type=Path, default=Path("var/stack"), help="PIDs, logs, keys")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start TorchServe and the gateway")
    up.add_argument(
        "--model-store",
        type=Path,
        default=Path("var/models"),
        help="model directories (the demo model is trained here if missing)",
    )
    up.add_argument(
        "--archives",
        type=Path,
        default=Path("var/model-archives"),
        help="where the .mar archives are built (TorchServe's model store)",
    )
    up.add_argument("--host", default="127.0.0.1", help="address of the gateway")
    up.add_argument("--port", type=int, default=50051, help="port of the gateway")
    up.add_argument("--torchserve-grpc-port", type=int, default=7070)
    up.add_argument("--torchserve-metrics-port", type=int, default=8082)
    up.add_argument("--batch-size", type=int, default=16, help="TorchServe batch size")
    up.add_argument(
        "--max-batch-delay-ms",
        type=int,
        default=1,
        help="how long TorchServe waits to fill a batch (TorchServe reads 0 as 100 ms)",
    )
    up.add_argument(
        "--torchserve-workers",
        type=int,
        default=0,
        help="workers per model; 0: one per GPU, one on a host without GPUs (its engine's "
        "executor uses every core)",
    )
    commands.add_parser("down", help="stop the gateway, then TorchServe")
    commands.add_parser("status", help="say what is running")
    return parser


def default_workers() -> int:
    """Workers per model where none are asked for: one per GPU torch sees, else one (a
    worker's executor runs calls side by side on every core; a second worker would split
    the cores and pack fewer rows per call, and hold a second copy of the model)."""
    import torch

    return max(1, torch.cuda.device_count())


def _archives(args: argparse.Namespace) -> None:
    """Trains the demo model if missing; packs every model directory of the store."""
    from xaiserve.model_store.archive import ArchiveSettings, build_archive
    from xaiserve.model_store.build_demo import ensure_demo_model

    ensure_demo_model(args.model_store / "demo", progress=True)
    settings = ArchiveSettings(
        batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
        min_workers=args.torchserve_workers or default_workers(),
        max_workers=args.torchserve_workers or default_workers(),
    )
    for old in args.archives.glob("*.mar"):
        old.unlink()
    for config in sorted(args.model_store.glob("*/config.yaml")):
        build_archive(config.parent, args.archives, settings)


def _wait_for_gateway(process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Waits until the gateway logs that it listens and its health is SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout
    while "listening on" not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > end:
            raise TorchServeError(f"the gateway did not start; see {log}")
        time.sleep(0.2)
    text = log.read_text(errors="replace")
    address = text.split("listening on ", 1)[1].split()[0]
    while time.monotonic() < end:
        try:
            with grpc.insecure_channel(address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=2
                )
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            return  # TLS or tokens on the gateway: it listens, which is what we can check
        time.sleep(0.5)
    raise TorchServeError(f"the gateway is not SERVING; see {log}")


def up(args: argparse.Namespace, gateway_flags: Sequence[str]) -> int:
    """Starts TorchServe, then the gateway; returns the exit status."""
    directory: Path = args.dir
    if _alive(directory / GATEWAY_PID) or _alive(directory / TORCHSERVE_PID):
        logger.error("the stack is already running (%s); `make stack-down` first", directory)
        return 1
    directory.mkdir(parents=True, exist_ok=True)
    _archives(args)
    config = TorchServeConfig(
        model_store=args.archives,
        workdir=directory / "torchserve",
        grpc_inference_port=args.torchserve_grpc_port,
        metrics_port=args.torchserve_metrics_port,
    )
    torchserve = TorchServeProcess.start(config)
    (directory / TORCHSERVE_PID).write_text(str(torchserve.pid))
    try:
        torchserve.wait_ready(STARTUP_SECONDS)
    except TorchServeError as error:
        logger.error("%s", error)
        torchserve.stop()
        return 1
    log = directory / GATEWAY_LOG
    command = [
        sys.executable,
        "-m",
        "xaiserve.gateway.server",
        "--backend",
        "torchserve",
        "--model-store",
        str(args.archives),
        "--torchserve-target",
        config.grpc_target,
        "--torchserve-key-file",
        str(config.key_file),
        "--host",
        args.host,
        "--port",
        str(args.port),
        *gateway_flags,
    ]
    with log.open("wb") as out:
        gateway = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (directory / GATEWAY_PID).write_text(str(gateway.pid))
    try:
        _wait_for_gateway(gateway, log, 60.0)
    except TorchServeError as error:
        logger.error("%s", error)
        down(args)
        return 1
    logger.info(
        "stack up: gateway %s:%d (backend torchserve, log %s); TorchServe gRPC %s, metrics "
        "%s, logs %s",
        args.host,
        args.port,
        log,
        config.grpc_target,
        config.metrics_url,
        config.workdir / "logs",
    )
    return 0


def down(args: argparse.Namespace) -> int:
    """Stops the gateway (SIGTERM: calls in flight finish), then TorchServe."""
    directory: Path = args.dir
    stopped = False
    for name, what in ((GATEWAY_PID, "gateway"), (TORCHSERVE_PID, "TorchServe")):
        pid_file = directory / name
        pgid = _alive(pid_file)
        if pgid is not None:
            stop_process_group(pgid, timeout=30.0)
            logger.info("stopped %s (process group %d)", what, pgid)
            stopped = True
        pid_file.unlink(missing_ok=True)
    (directory / "torchserve" / "key_file.json").unlink(missing_ok=True)
    if not stopped:
        logger.info("nothing was running")
    return 0


def status(args: argparse.Namespace) -> int:
    """0 when both processes run, 1 otherwise."""
    running = {
        what: _alive(args.dir / name)
        for name, what in ((GATEWAY_PID, "gateway"), (TORCHSERVE_PID, "TorchServe"))
    }
    for what, pgid in running.items():
        logger.info("%s: %s", what, f"running (process group {pgid})" if pgid else "stopped")
    return 0 if all(running.values()) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xaiserve.gateway.stack up|down|status``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args, extra = build_parser().parse_known_args(argv)
    if args.command == "up":
        return up(args, extra)
    if extra:
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    return down(args) if args.command == "down" else status(args)


if __name__ == "__main__":
    sys.exit(main())
