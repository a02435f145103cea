"""Soak run: concurrent clients against the embedded server and the full TorchServe stack.

    python bench/soak.py [--clients 64] [--seconds 60] [--backends local,torchserve]
                         [--model-dir var/models/demo]

For each backend the script starts the service on free loopback ports (``local``: one
``xaiserve-server`` process with the engine in it; ``torchserve``: TorchServe with the demo
model's archive and an ``xaiserve-server --backend torchserve`` gateway in front of it),
computes a single-call reference answer for every request of the mix (one call at a time),
runs ``--warmup-seconds`` of concurrent load that is not counted, reads the RSS of every
process of the service, then runs ``--clients`` concurrent clients for ``--seconds``. The
mix cycles through ``--images`` demo images times three kinds of call: saliency; grad_cam +
occlusion; integrated_gradients with a reliability record and a FAST-filtered map.

It prints requests/s, latency p50/p99 (all calls and by kind), every status code with its
count, the answers that differ from the reference (prediction, maps, reliability records
and filtered maps compared within ``--tolerance``; must be 0), the RSS of each process
(gateway or embedded server, TorchServe's launcher and Java frontend, each worker) before
and after, and read every ``--rss-interval`` seconds during the run: its minimum, maximum
and the peak of each half of the run, and the load average. The RSS check compares the peaks
(the second half's must stay within ``--max-rss-growth``, 5%, of the first's): a process
that keeps memory grows its peaks, while buffers of the calls in flight and the JVM's growing
heap make a before/after difference that depends on where the two readings fall. A
saw-tooth whose period is longer than the run (the gateway's, 80 -> 123 -> 88 -> 111 MiB
within 200 s, until the fix in docs/operations.md#memory) fails or passes the peak check
depending on where the run falls in it; a long ``--seconds`` shows it in min and max.
The exit status is 1 when a check fails. Everything listens on 127.0.0.1 and
everything started is stopped at the end; the run is bounded by ``--seconds``,
``--max-calls`` and ``--call-timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from answers import differences

from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.api.v1 import explain_pb2_grpc
from xaiserve.gateway.torchserve_process import (
    TorchServeConfig,
    TorchServeProcess,
    stop_process_group,
)
from xaiserve.model_store import synthetic
from xaiserve.model_store.archive import ArchiveSettings, build_archive
from xaiserve.model_store.build_demo import ensure_demo_model

HOST = "127.0.0.1"
STARTUP_SECONDS = 240.0
KINDS: dict[str, list[pb.MethodRequest]] = {
    "saliency": [pb.MethodRequest(method=pb.SALIENCY)],
    "grad_cam+occlusion": [
        pb.MethodRequest(method=pb.GRAD_CAM),
        pb.MethodRequest(method=pb.OCCLUSION),
    ],
    "ig+reliability+filter": [
        pb.MethodRequest(
            method=pb.INTEGRATED_GRADIENTS,
            integrated_gradients=pb.IntegratedGradientsParams(steps=16),
            reliability=pb.ReliabilityOptions(enabled=True, shuffles=0),
            filter=pb.FilterOptions(enabled=True, mode=pb.FAST, forward_budget=512),
        )
    ],
}


@dataclass(frozen=True)
class Call:
    """One request of the mix."""

    kind: str
    request: pb.ExplainRequest


@dataclass
class Service:
    """A started backend: the gateway's address and the processes to watch."""

    name: str
    address: str
    pids: dict[str, int] = field(default_factory=dict)


@dataclass
class Load:
    """What a load phase recorded."""

    seconds: float = 0.0
    latencies: dict[str, list[float]] = field(default_factory=dict)
    codes: Counter[str] = field(default_factory=Counter)
    differing: Counter[str] = field(default_factory=Counter)  # field -> calls
    differing_calls: int = 0
    examples: list[str] = field(default_factory=list)
    rss: dict[str, list[int]] = field(default_factory=dict)  # label -> KiB every interval

    @property
    def calls(self) -> int:
        return sum(self.codes.values())


# ------------------------------------------------------------------------------ requests


def build_mix(images: int) -> list[Call]:
    """``images`` demo images (pixel space, 3 x 64 x 64) times the kinds of call."""
    calls = []
    for index in range(images):
        pixels = synthetic.make_sample(4242, index).image.astype("<f4")
        image = pb.Image(tensor=pb.Tensor(shape=list(pixels.shape), data=pixels.tobytes()))
        for kind, methods in KINDS.items():
            request = pb.ExplainRequest(model_name="demo", image=image, methods=methods)
            calls.append(Call(kind, request))
    return calls


# --------------------------------------------------------------------------- processes


def _rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB (from /proc), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return 0


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc/*/stat."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (children, theirs, ...)."""
    tree = _children()
    found: list[int] = []
    pending = list(tree.get(pid, []))
    while pending:
        child = pending.pop()
        found.append(child)
        pending.extend(tree.get(child, []))
    return found


def torchserve_processes(launcher: int) -> dict[str, int]:
    """TorchServe's launcher, Java frontend and model workers, by label."""
    found = {f"torchserve launcher (pid {launcher})": launcher}
    for pid in descendants(launcher):
        command = _cmdline(pid)
        if "java" in command.split(" ", 1)[0]:
            found[f"torchserve frontend java (pid {pid})"] = pid
        elif "model_service_worker" in command:
            found[f"torchserve worker (pid {pid})"] = pid
    return found


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@contextmanager
def gateway_process(command: list[str], log: Path) -> Iterator[tuple[int, str]]:
    """Starts an ``xaiserve-server`` command in its own session; yields (pid, address)
    once it logs that it listens, and stops its process group at the end."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "xaiserve.gateway.server", *command],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        end = time.monotonic() + STARTUP_SECONDS
        while not (found := re.search(rf"listening on {re.escape(HOST)}:(\d+)", log.read_text())):
            if process.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the gateway did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield process.pid, f"{HOST}:{found.group(1)}"
    finally:
        stop_process_group(process.pid, timeout=30.0)
        with suppress(subprocess.TimeoutExpired):
            process.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextmanager
def embedded(model_dir: Path, tmp: Path) -> Iterator[Service]:
    """``xaiserve-server`` (local backend) over a store holding the demo model."""
    store = tmp / "store"
    store.mkdir()
    (store / "demo").symlink_to(model_dir.resolve(), target_is_directory=True)
    flags = ["--model-store", str(store), "--host", HOST, "--port", "0", "--metrics-port", "0"]
    with gateway_process(flags, tmp / "gateway-local.log") as (pid, address):
        yield Service("local", address, {f"embedded server (pid {pid})": pid})


@contextmanager
def torchserve_stack(model_dir: Path, tmp: Path, args: argparse.Namespace) -> Iterator[Service]:
    """TorchServe with the demo model's archive, and the gateway in front of it."""
    store = tmp / "archives"
    settings = ArchiveSettings(
        batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
        min_workers=args.torchserve_workers,
        max_workers=args.torchserve_workers,
    )
    build_archive(model_dir, store, settings)
    config = TorchServeConfig(
        model_store=store,
        workdir=tmp / "torchserve",
        host=HOST,
        grpc_inference_port=_free_port(),
        grpc_management_port=_free_port(),
        http_inference_port=_free_port(),
        management_port=_free_port(),
        metrics_port=_free_port(),
    )
    torchserve = TorchServeProcess.start(config)
    try:
        torchserve.wait_ready(STARTUP_SECONDS)
        flags = [
            "--backend",
            "torchserve",
            "--model-store",
            str(store),
            "--torchserve-target",
            config.grpc_target,
            "--torchserve-key-file",
            str(config.key_file),
            "--host",
            HOST,
            "--port",
            "0",
            "--metrics-port",
            "0",
        ]
        with gateway_process(flags, tmp / "gateway-torchserve.log") as (pid, address):
            pids = {f"gateway (pid {pid})": pid, **torchserve_processes(torchserve.pid)}
            yield Service("torchserve", address, pids)
    finally:
        torchserve.stop()


# -------------------------------------------------------------------------------- load


async def reference(address: str, mix: list[Call], timeout: float) -> list[pb.ExplainResponse]:
    """One call at a time: the answer of each request of the mix."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = explain_pb2_grpc.ExplanationServiceStub(channel)
        return [await stub.Explain(call.request, timeout=timeout) for call in mix]


async def run_load(
    address: str,
    mix: list[Call],
    refs: list[pb.ExplainResponse],
    args: argparse.Namespace,
    seconds: float,
    pids: dict[str, int],
) -> Load:
    """``args.clients`` concurrent clients, each on its own channel, calling until
    ``seconds`` pass or ``args.max_calls`` calls have started; the RSS of ``pids`` is read
    every ``args.rss_interval`` seconds meanwhile."""
    load = Load(latencies={kind: [] for kind in KINDS})
    started = 0
    end = time.monotonic() + seconds

    async def client(number: int) -> None:
        nonlocal started
        async with grpc.aio.insecure_channel(address) as channel:
            stub = explain_pb2_grpc.ExplanationServiceStub(channel)
            turn = number
            while time.monotonic() < end and started < args.max_calls:
                started += 1
                index = turn % len(mix)
                turn += 1
                t0 = time.perf_counter()
                try:
                    answer = await stub.Explain(mix[index].request, timeout=args.call_timeout)
                except grpc.aio.AioRpcError as error:
                    load.codes[error.code().name] += 1
                    if len(load.examples) < 5:
                        load.examples.append(f"{error.code().name}: {error.details()[:200]}")
                    continue
                load.latencies[mix[index].kind].append(time.perf_counter() - t0)
                load.codes["OK"] += 1
                diff = differences(answer, refs[index], args.tolerance)
                if diff:
                    load.differing_calls += 1
                    load.differing.update(diff)

    async def sample_rss() -> None:
        while time.monotonic() < end:
            for label, pid in pids.items():
                kib = _rss_kib(pid)
                if kib is not None:
                    load.rss.setdefault(label, []).append(kib)
            await asyncio.sleep(args.rss_interval)

    t0 = time.perf_counter()
    sampler = asyncio.ensure_future(sample_rss())
    await asyncio.gather(*(client(n) for n in range(args.clients)))
    load.seconds = time.perf_counter() - t0
    sampler.cancel()
    return load


# ------------------------------------------------------------------------------ report


def _ms(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q) * 1e3:.0f}" if values else "-"


def report(
    service: Service,
    load: Load,
    before: dict[str, int | None],
    after: dict[str, int | None],
    loads: tuple[str, str],
    args: argparse.Namespace,
) -> list[str]:
    """Prints one backend's results; returns the checks that failed."""
    every = [s for values in load.latencies.values() for s in values]
    print(f"\n== {service.name} ({service.address}) ==")
    print(
        f"calls {load.calls} in {load.seconds:.1f} s: {load.calls / load.seconds:.2f} requests/s; "
        f"OK latency p50 {_ms(every, 50)} ms, p99 {_ms(every, 99)} ms"
    )
    for kind, values in load.latencies.items():
        print(
            f"  {kind:<24} OK {len(values):>6}  p50 {_ms(values, 50):>7} ms  "
            f"p99 {_ms(values, 99):>7} ms"
        )
    print("status codes: " + ", ".join(f"{c} {n}" for c, n in load.codes.most_common()))
    for example in load.examples:
        print(f"  e.g. {example}")
    print(
        f"answers differing from the single-call reference (tolerance {args.tolerance:g}): "
        f"{load.differing_calls}"
    )
    for name, count in load.differing.most_common():
        print(f"  {name}: {count}")
    print(
        f"{'process':<40}{'RSS before':>11}{'after':>8}{'growth':>8}"
        f"{'min':>8}{'max':>8}{'peak 1st half':>15}{'2nd half':>9}{'trend':>8}  (MiB)"
    )
    trends = []
    for label, kib in before.items():
        end = after.get(label)
        if kib is None or end is None:
            print(f"{label:<40}{'-' if kib is None else f'{kib / 1024:.1f}':>11}{'gone':>8}")
            continue
        growth = (end - kib) / kib * 100 if kib else 0.0
        samples = load.rss.get(label) or [kib, end]
        half = max(len(samples) // 2, 1)
        first, second = max(samples[:half]), max(samples[half:] or samples[-1:])
        trend = (second - first) / first * 100 if first else 0.0
        trends.append(trend)
        print(
            f"{label:<40}{kib / 1024:>11.1f}{end / 1024:>8.1f}{growth:>+7.1f}%"
            f"{min(samples) / 1024:>8.1f}{max(samples) / 1024:>8.1f}{first / 1024:>15.1f}"
            f"{second / 1024:>9.1f}{trend:>+7.1f}%"
        )
    print(f"load average (1/5/15 min): before {loads[0]}; after {loads[1]}")
    failed = []
    if load.differing_calls:
        failed.append(f"{service.name}: {load.differing_calls} answers differ from the reference")
    if any(g >= args.max_rss_growth for g in trends):
        failed.append(
            f"{service.name}: the RSS peak of the run's second half is {max(trends):.1f}% above "
            f"the first half's (limit {args.max_rss_growth}%)"
        )
    if any(v is None for v in after.values()):
        failed.append(f"{service.name}: a process ended during the run")
    return failed


def soak(service: Service, mix: list[Call], args: argparse.Namespace) -> list[str]:
    """Reference, warm-up, measured load and report of one started backend."""
    refs = asyncio.run(reference(service.address, mix, args.call_timeout))
    if args.warmup_seconds > 0:
        asyncio.run(run_load(service.address, mix, refs, args, args.warmup_seconds, {}))
    loads = [load_average()]
    before = {label: _rss_kib(pid) for label, pid in service.pids.items()}
    load = asyncio.run(run_load(service.address, mix, refs, args, args.seconds, service.pids))
    after = {label: _rss_kib(pid) for label, pid in service.pids.items()}
    loads.append(load_average())
    return report(service, load, before, after, (loads[0], loads[1]), args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured load per backend")
    parser.add_argument(
        "--warmup-seconds",
        type=float,
        default=60.0,
        help="uncounted concurrent load before the RSS is first read (the JVM grows its heap for "
        "about a minute under this load)",
    )
    parser.add_argument(
        "--backends",
        default="local,torchserve",
        help="comma-separated: local (embedded server), torchserve (full stack)",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path("var/models/demo"),
        help="the demo model (trained here if missing)",
    )
    parser.add_argument("--images", type=int, default=4, help="demo images in the mix")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument(
        "--max-rss-growth",
        type=float,
        default=5.0,
        help="percent: the most the RSS peak of the run's second half may exceed the first's",
    )
    parser.add_argument(
        "--rss-interval", type=float, default=2.0, help="seconds between RSS readings"
    )
    parser.add_argument("--max-calls", type=int, default=200_000, help="calls per phase, at most")
    parser.add_argument("--call-timeout", type=float, default=120.0, help="seconds per call")
    parser.add_argument("--batch-size", type=int, default=8, help="TorchServe batch size")
    parser.add_argument("--max-batch-delay-ms", type=int, default=20)
    parser.add_argument("--torchserve-workers", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"local", "torchserve"}
    if unknown or args.clients < 1 or args.seconds <= 0 or args.images < 1:
        parser.error(f"bad arguments (unknown backends: {sorted(unknown)})")

    model_dir = ensure_demo_model(args.model_dir, progress=True)
    mix = build_mix(args.images)
    print(
        f"soak: {args.clients} clients, {args.seconds:g} s per backend after "
        f"{args.warmup_seconds:g} s of warm-up; mix of {len(mix)} requests ({args.images} demo "
        f"images x {', '.join(KINDS)}); TorchServe batch size {args.batch_size}, "
        f"max batch delay {args.max_batch_delay_ms} ms, {args.torchserve_workers} worker(s)"
    )
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="xaiserve-soak-") as tmp:
        for name in backends:
            workdir = Path(tmp) / name
            workdir.mkdir()
            start = (
                embedded(model_dir, workdir)
                if name == "local"
                else torchserve_stack(model_dir, workdir, args)
            )
            with start as service:
                failed.extend(soak(service, mix, args))
    print("\nchecks: " + ("all passed" if not failed else "; ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
