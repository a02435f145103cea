"""Latency of one Explain through the gRPC server (embedded engine, demo model).

    python bench/explain_latency.py [--calls 20] [--model-store var/models]

Starts ``xaiserve-server`` in its own process (as ``make serve`` does, building the demo
model if missing), waits for it to listen, then sends one call at a time with saliency,
grad_cam, integrated_gradients (32 steps) and occlusion (defaults) on held-out demo images.
Prints p50/p95 of the whole call as the client sees it, the engine's per-method times and
the forward passes per method.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from xaiserve.gateway.client import XaiClient
from xaiserve.model_store.synthetic import TEST_SEED, make_sample

METHODS = ("saliency", "grad_cam", "integrated_gradients", "occlusion")


def start_server(model_store: Path) -> tuple[subprocess.Popen, int]:
    command = [
        sys.executable,
        "-m",
        "xaiserve.gateway.server",
        "--model-store",
        str(model_store),
        "--build-demo",
        "--port",
        "0",
        "--metrics-port",
        "0",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    found: list[int] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stderr:
            match = re.search(r"listening on [^ ]+:(\d+)", line)
            if match:
                found.append(int(match.group(1)))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(600)
    if not found:
        process.kill()
        raise SystemExit("the server did not start")
    return process, found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--model-store", type=Path, default=Path("var/models"))
    args = parser.parse_args()
    process, port = start_server(args.model_store)
    totals, per_method, passes = [], {m: [] for m in METHODS}, {}
    try:
        with XaiClient(f"127.0.0.1:{port}", timeout=120) as client:
            warm = make_sample(TEST_SEED, 0).image
            client.explain(warm, methods=METHODS, params={"integrated_gradients": {"steps": 32}})
            for i in range(1, args.calls + 1):
                image = make_sample(TEST_SEED, i).image
                t0 = time.perf_counter()
                response = client.explain(
                    image, methods=METHODS, params={"integrated_gradients": {"steps": 32}}
                )
                totals.append(time.perf_counter() - t0)
                for name, explanation in zip(METHODS, response.explanations, strict=True):
                    timing = {t.stage: t.seconds for t in explanation.timings}
                    per_method[name].append(timing["attribute"])
                    passes[name] = explanation.forward_passes
    finally:
        process.terminate()
        process.wait(30)
    ms = lambda values, q: 1000 * float(np.percentile(values, q))
    print(
        f"Explain (saliency, grad_cam, integrated_gradients 32 steps, occlusion) on the demo "
        f"model, {args.calls} calls through gRPC, one at a time"
    )
    print(
        f"  whole call: p50 {ms(totals, 50):.1f} ms, p95 {ms(totals, 95):.1f} ms, "
        f"mean {1000 * statistics.mean(totals):.1f} ms"
    )
    for name in METHODS:
        print(
            f"  {name:22s} attribute p50 {ms(per_method[name], 50):7.1f} ms, "
            f"forward passes {passes[name]}"
        )


if __name__ == "__main__":
    main()
