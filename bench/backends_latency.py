"""Latency of one Explain through the gateway, local backend vs. torchserve backend.

    python bench/backends_latency.py [--requests 60] [--batch-size 1 --max-batch-delay-ms 0]

One call explains one demo-model image with saliency, grad_cam and occlusion (default
parameters). The script starts TorchServe (token auth on) with the demo model's archive on
free ports, two gateways in this process (one per backend) and calls them one at a time,
alternating between the backends so that both see the same machine load; the engine alone
(no gRPC) is measured in the same loop as the baseline. It prints p50 and p95 per path and
the ratios against the local backend and the bare engine (the design's budget: gateway +
TorchServe adds at most 10% at p50 over the in-process engine).

TorchServe waits up to ``--max-batch-delay-ms`` to fill a batch, which one-at-a-time calls
never do; the default (batch size 1, no delay) measures the path itself.

OpenMP threads busy-wait after each parallel region by default. Here torch runs in two
processes on the same cores (this one for the in-process paths, the TorchServe worker),
and on a machine with few cores the spinning threads of one slow the other down (on 2 cores
the worker measured about 2x slower). In production the gateway of the torchserve backend
runs no torch at all. So this script sets ``OMP_WAIT_POLICY=PASSIVE`` for both processes
unless the variable is set already (``OMP_WAIT_POLICY=ACTIVE python bench/...`` measures
the other way).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP; inherited

import argparse
import asyncio
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from xaiserve.api import convert
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.api.v1 import explain_pb2_grpc
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.gateway.backends import LocalBackend
from xaiserve.gateway.server import start
from xaiserve.gateway.settings import Settings
from xaiserve.gateway.torchserve_backend import TorchServeBackend
from xaiserve.gateway.torchserve_process import TorchServeConfig, TorchServeProcess
from xaiserve.model_store import synthetic
from xaiserve.model_store.archive import ArchiveSettings, build_archive
from xaiserve.model_store.build_demo import ensure_demo_model
from xaiserve.runtime.model import load_model_dir

METHODS = (pb.SALIENCY, pb.GRAD_CAM, pb.OCCLUSION)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _request(index: int) -> pb.ExplainRequest:
    image = synthetic.make_sample(777, index).image.astype("<f4")
    return pb.ExplainRequest(
        model_name="demo",
        image=pb.Image(tensor=pb.Tensor(shape=list(image.shape), data=image.tobytes())),
        methods=[pb.MethodRequest(method=m) for m in METHODS],
    )


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("var/models/demo"))
    parser.add_argument("--requests", type=int, default=60, help="timed calls per path")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-batch-delay-ms", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model_dir = ensure_demo_model(args.model_dir, progress=True)
    engine = Engine({"demo": load_model_dir(model_dir)}, EngineLimits())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(300)

    with tempfile.TemporaryDirectory(prefix="xaiserve-bench-") as tmp:
        store = Path(tmp) / "store"
        settings = ArchiveSettings(
            batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay_ms
        )
        build_archive(model_dir, store, settings)
        config = TorchServeConfig(
            model_store=store,
            workdir=Path(tmp) / "run",
            grpc_inference_port=_free_port(),
            grpc_management_port=_free_port(),
            http_inference_port=_free_port(),
            management_port=_free_port(),
            metrics_port=_free_port(),
        )
        torchserve = TorchServeProcess.start(config)
        try:
            torchserve.wait_ready(240)
            gateway = Settings(port=0, metrics_port=0)
            local = run(start(gateway, LocalBackend(engine, workers=1)))
            remote_backend = TorchServeBackend(config.grpc_target, config.key_file, ["demo"])
            remote = run(start(gateway, remote_backend))
            channels = {
                name: grpc.insecure_channel(f"127.0.0.1:{port}")
                for name, port in (("local", local.port), ("torchserve", remote.port))
            }
            stubs = {n: explain_pb2_grpc.ExplanationServiceStub(c) for n, c in channels.items()}

            def engine_call(request: pb.ExplainRequest) -> None:
                engine.explain(convert.request_from_proto(request))

            paths: dict[str, Callable[[pb.ExplainRequest], object]] = {
                "engine (no gateway)": engine_call,
                "gateway + local": lambda r: stubs["local"].Explain(r, timeout=60),
                "gateway + torchserve": lambda r: stubs["torchserve"].Explain(r, timeout=60),
            }
            seconds: dict[str, list[float]] = {name: [] for name in paths}
            worker: list[float] = []  # the engine's own time inside the TorchServe worker
            for i in range(args.warmup + args.requests):
                request = _request(i % 8)
                order = list(paths.items())
                if i % 2:
                    order.reverse()
                for name, call in order:
                    started = time.perf_counter()
                    answer = call(request)
                    if i >= args.warmup:
                        seconds[name].append(time.perf_counter() - started)
                        if name == "gateway + torchserve":
                            timings = {t.stage: t.seconds for t in answer.timings}
                            worker.append(timings["total"])
            for channel in channels.values():
                channel.close()
            run(local.stop(0))
            run(remote.stop(0))
            run(remote_backend.close())
        finally:
            torchserve.stop()
    loop.call_soon_threadsafe(loop.stop)

    seconds["(engine in the worker)"] = worker
    p50 = {name: _percentile(v, 50) for name, v in seconds.items()}
    p95 = {name: _percentile(v, 95) for name, v in seconds.items()}
    print(
        f"one Explain (saliency, grad_cam, occlusion) on the demo model, {args.requests} "
        f"calls per path after {args.warmup} warm-up, one at a time, paths interleaved; "
        f"TorchServe batch size {args.batch_size}, max batch delay {args.max_batch_delay_ms} ms; "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    print(f"{'path':<24}{'p50 ms':>10}{'p95 ms':>10}{'mean ms':>10}")
    for name, values in seconds.items():
        print(
            f"{name:<24}{p50[name] * 1e3:>10.2f}{p95[name] * 1e3:>10.2f}"
            f"{statistics.fmean(values) * 1e3:>10.2f}"
        )
    for base in ("gateway + local", "engine (no gateway)", "(engine in the worker)"):
        print(
            f"torchserve / {base}: p50 x{p50['gateway + torchserve'] / p50[base]:.3f}, "
            f"p95 x{p95['gateway + torchserve'] / p95[base]:.3f}"
        )


if __name__ == "__main__":
    main()
