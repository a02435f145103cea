"""Concurrent requests side by side: the embedded server packing their device work into
shared calls (``--concurrency batched``), the same server one request at a time per model
(``--concurrency serial``, the behaviour before issue 22) and the full TorchServe stack
(gateway -> TorchServe -> worker, default archive settings), in one run (issue 22, item 5).

    python bench/concurrency.py                                    # the default table
    python bench/concurrency.py --models demo --clients 1 4 --seconds 3
    python bench/concurrency.py --backends batched serial --mixes saliency --requests 32
    python bench/concurrency.py --cap 900      # every ResNet cell, however long (an hour)

Models: the demo model (3 x 64 x 64, trained into ``--demo-dir`` if missing) and a
ResNet-18-shaped network at 3 x 224 x 224 (``tests/support/resnets.py``, random weights
from seed 0, its model directory written to a temporary folder, demo shapes drawn at 224 as
images). Mixes: ``saliency``; ``grad_cam``; ``grad_cam+occlusion`` (the demo's default
window 8, stride 4: 225 windows; the ResNet's window 112, stride 56: 9 windows,
``--resnet-occlusion``); ``saliency+reliability`` (an APEM record, default options).
All services run at once (every one serves both models) and the backends take turns at
each client count, so each ratio compares cells measured next to each other in time.

A cell (model, mix, client count, backend) is a closed loop: each client sends its next
call when the previous one returns, cycling through ``--images`` images. Warm-up: the
first round (as many completions as clients; they all start at once) and at least
``--warmup-seconds``; the measured window starts at the completion that ends it. New calls
stop ``--seconds`` later, or once ``--requests`` calls (at least one per client) have been
sent after the first round's, and the calls in flight finish. Columns:

- req/s: completions after the warm-up / the time from its end to the last completion
  (counting completions keeps a burst of packed calls that end together from skewing it);
- p50, p99: latency of every call but each client's first;
- cpu: the server processes' CPU time (utime + stime of all their threads, /proc/PID/stat)
  over the window / the window / the usable cores (affinity, cgroup quota); for the stack
  the gateway, TorchServe's launcher, its Java frontend and the worker processes; client:
  this process's CPU time (the load generator's, all its threads) / the window: 100% is
  one core;
- dev calls: the mean of the answers' ``device_calls`` (a device call that ran the work of
  k requests counts 1/k for each); a saliency call alone takes 2 (prediction, gradient),
  fewer means its calls were shared: the packing factor is 2 / this;
- differing: answers (warm-up ones included) whose prediction (target, top-k classes)
  differs from the single-call reference, or any map value or reliability number by more
  than ``--tolerance`` absolute plus relative. Must be 0; the first few are printed. The
  reference of each request is one call at a time on the first backend selected, in the
  order serial, batched, torchserve.

Every call carries the deadline of its cell's ``--cap`` (the cell's whole time, warm-up
included), so a cell that reaches it stops at once on the server too (``capped``: what
completed is reported). A cell that the rate of the previous client count predicts to need
longer is ``skipped``, with the estimate: on 2 cores the ResNet's heavier mixes at 16 and
64 clients do not fit the default cap (a round of 64 reliability calls alone takes minutes).
The servers settle (under 10% of a core) before each cell.

Starvation, per backend: the latency of a small call (saliency on the demo model; saliency
on the large request's model) one at a time alone, then while a large request (occlusion
with window 16, stride 8 on the ResNet: 730 images) runs on the same server over and over.

The machine (cores, CPU model, usable cores) is printed first, the load average before and
after each section. The exit status is 1 when an answer differs or a call fails other than
by a cell's cap. Everything listens on 127.0.0.1 and stops at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import yaml
from answers import differences
from soak import descendants, gateway_process, load_average, torchserve_processes

from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.api.v1 import explain_pb2_grpc
from xaiserve.gateway.torchserve_process import TorchServeConfig, TorchServeProcess
from xaiserve.model_store import synthetic
from xaiserve.model_store.archive import ArchiveSettings, build_archive
from xaiserve.model_store.build_demo import ensure_demo_model

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
MODELS = ("demo", "resnet18")
MIXES = ("saliency", "grad_cam", "grad_cam+occlusion", "saliency+reliability")
BACKENDS = ("batched", "processes", "serial", "torchserve")
CLIENTS = (1, 4, 16, 64)
# where the single-call answers come from
REFERENCE_ORDER = ("serial", "batched", "processes", "torchserve")
IMAGE_SEED = 4242
RESNET_SEED = 0
STARTUP_SECONDS = 300.0
IDLE_CORES = 0.1  # server CPU below which a service counts as settled
MAX_EXAMPLES = 5
#: Each client its own TCP connection (as separate client processes have), so that the
#: kernel can spread clients over the processes of ``--processes``.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
# The ResNet test network's own source (tests/support/resnets.py), then the class served.
RESNET_CLASS = """

class ResNet18(ResNet):
    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__(BasicBlock, (2, 2, 2, 2), num_classes, width)
"""


@dataclass(frozen=True)
class CellPlan:
    """How long each cell of a model runs (see the module docstring).

    seconds: measured window after the warm-up (0: count calls instead).
    requests: calls after the warm-up, at least one per client (when seconds is 0).
    warmup_seconds: the warm-up lasts at least this long (besides the first round).
    cap: the deadline of every call of the cell, from its start.
    """

    seconds: float
    requests: int
    warmup_seconds: float
    cap: float


@dataclass(frozen=True)
class ModelSpec:
    """A served model of the benchmark: its directory, images, the occlusion of its
    grad_cam+occlusion mix and how long its cells run."""

    name: str
    directory: Path
    images: tuple[np.ndarray, ...]  # 3 x H x W float32 in [0, 1]
    occlusion: tuple[int, int]  # window, stride of the grad_cam+occlusion mix
    plan: CellPlan


@dataclass
class Service:
    """A started backend: the gateway's address and its processes (label -> pid)."""

    name: str
    address: str
    processes: Callable[[], dict[str, int]]


@dataclass
class Cell:
    """What one cell measured."""

    model: str
    mix: str
    backend: str
    clients: int
    rate: float | None = None
    latencies: list[float] = field(default_factory=list)
    device_calls: list[float] = field(default_factory=list)
    answers: int = 0
    differing: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    cpu: float | None = None  # share of the usable cores, server processes
    client_cpu: float | None = None  # this process, share of one core
    seconds: float = 0.0  # the cell's wall time, warm-up and drain included
    capped: bool = False
    skipped: str = ""

    @property
    def key(self) -> tuple[str, str, str, int]:
        return self.model, self.mix, self.backend, self.clients


@dataclass
class Checks:
    """Answers that differ from their reference (the count and the first few), and the
    first few failed calls."""

    tolerance: float
    count: int = 0
    examples: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def check(self, where: str, answer: pb.ExplainResponse, ref: pb.ExplainResponse) -> bool:
        found = differences(answer, ref, self.tolerance)
        if found:
            self.count += 1
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(f"{where}: {'; '.join(found[:4])}")
        return bool(found)


# ------------------------------------------------------------------------------ machine


def usable_cores() -> float:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota."""
    cores = float(len(os.sched_getaffinity(0)))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return cores


def machine() -> str:
    """Cores, usable cores and the CPU model, from /proc."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({model}), {usable_cores():g} usable by this process; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}"
    )


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of these processes (all their threads), from /proc."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
    return ticks / _CLOCK_TICKS


# ------------------------------------------------------------------------------- models


def write_resnet18(directory: Path, seed: int = RESNET_SEED) -> Path:
    """A model directory of a ResNet-18-shaped network at 3 x 224 x 224 with 10 classes:
    ``tests/support/resnets.py`` as its model.py, random weights from ``seed``."""
    import torch

    source = (REPO / "tests/support/resnets.py").read_text() + RESNET_CLASS
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.py").write_text(source)
    namespace: dict[str, object] = {}
    exec(compile(source, "model.py", "exec"), namespace)
    torch.manual_seed(seed)
    network = namespace["ResNet18"]
    assert isinstance(network, type) and issubclass(network, torch.nn.Module)
    torch.save(network().state_dict(), directory / "weights.pt")
    config = {
        "name": "resnet18",
        "version": "1",
        "model": {"file": "model.py", "class": "ResNet18", "kwargs": {"num_classes": 10}},
        "weights": "weights.pt",
        "input": {"channels": 3, "height": 224, "width": 224},
        "normalize": {"mean": [0.5] * 3, "std": [0.25] * 3},
        "labels": [f"class{i}" for i in range(10)],
        "cam_layer": "layer4",
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return directory


def images(count: int, size: int) -> tuple[np.ndarray, ...]:
    """``count`` demo-set images (shapes on a textured background) of side ``size``."""
    return tuple(
        synthetic.make_sample(IMAGE_SEED, i, size).image.astype("<f4") for i in range(count)
    )


def prepare_models(
    names: Sequence[str], root: Path, args: argparse.Namespace, plans: dict[str, CellPlan]
) -> dict[str, ModelSpec]:
    """The selected models' directories (the ResNet's written under ``root``, each with a
    checked model.onnx so that no server exports it again) and images."""
    from xaiserve.runtime.forward.onnx_export import ONNX_FILE, export_model_dir

    specs = {}
    for name in names:
        if name == "demo":
            directory = ensure_demo_model(args.demo_dir, progress=True)
            shown, occlusion = images(args.images or 4, 64), (8, 4)
        else:
            directory = write_resnet18(root / "resnet18")
            window, stride = args.resnet_occlusion
            shown, occlusion = images(args.images or 2, 224), (window, stride)
        if not (directory / ONNX_FILE).exists():
            export_model_dir(directory)
        specs[name] = ModelSpec(name, directory, shown, occlusion, plans[name])
    return specs


def methods(spec: ModelSpec, mix: str) -> list[pb.MethodRequest]:
    """The methods of one call of ``mix`` on the model."""
    if mix == "saliency":
        return [pb.MethodRequest(method=pb.SALIENCY)]
    if mix == "grad_cam":
        return [pb.MethodRequest(method=pb.GRAD_CAM)]
    if mix == "grad_cam+occlusion":
        window, stride = spec.occlusion
        occlusion = pb.OcclusionParams(window=window, stride=stride)
        return [
            pb.MethodRequest(method=pb.GRAD_CAM),
            pb.MethodRequest(method=pb.OCCLUSION, occlusion=occlusion),
        ]
    if mix == "saliency+reliability":
        reliability = pb.ReliabilityOptions(enabled=True)
        return [pb.MethodRequest(method=pb.SALIENCY, reliability=reliability)]
    raise ValueError(f"unknown mix {mix!r}")


def request(model: str, image: np.ndarray, methods: list[pb.MethodRequest]) -> pb.ExplainRequest:
    """One Explain of ``image`` (3 x H x W float32, pixel space) as a raw tensor."""
    tensor = pb.Tensor(shape=list(image.shape), data=image.astype("<f4").tobytes())
    return pb.ExplainRequest(model_name=model, image=pb.Image(tensor=tensor), methods=methods)


def mix_requests(spec: ModelSpec, mix: str) -> list[pb.ExplainRequest]:
    """One request of ``mix`` per image of the model."""
    return [request(spec.name, image, methods(spec, mix)) for image in spec.images]


# ------------------------------------------------------------------------------ answers


# ----------------------------------------------------------------------------- services


def _store(specs: dict[str, ModelSpec], root: Path) -> Path:
    """A model store of links to the model directories."""
    root.mkdir(parents=True)
    for spec in specs.values():
        (root / spec.name).symlink_to(spec.directory.resolve(), target_is_directory=True)
    return root


@contextmanager
def embedded_server(
    name: str, store: Path, workdir: Path, flags: Sequence[str] = ()
) -> Iterator[Service]:
    """``xaiserve-server`` (local backend) over ``store``, with extra ``flags``
    (``--concurrency serial``, ``--device cuda``, ...)."""
    command = [
        *("--model-store", str(store), "--host", HOST, "--port", "0", "--metrics-port", "0"),
        *("--max-in-flight", "1024"),  # admission is not what is measured
        *flags,
    ]
    with gateway_process(command, workdir / f"{name}.log") as (pid, address):

        def processes() -> dict[str, int]:  # with --processes, the supervisor's children
            return {f"server (pid {p})": p for p in (pid, *descendants(pid))}

        yield Service(name, address, processes)


@contextmanager
def torchserve_stack(
    specs: dict[str, ModelSpec], workdir: Path, settings: ArchiveSettings | None = None
) -> Iterator[Service]:
    """TorchServe with an archive of each model (``settings``: by default
    ``ArchiveSettings()``), and the gateway in front of it."""
    archives = workdir / "archives"
    for spec in specs.values():
        build_archive(spec.directory, archives, settings or ArchiveSettings())
    ports = [_free_port() for _ in range(5)]
    config = TorchServeConfig(
        model_store=archives,
        workdir=workdir / "torchserve",
        host=HOST,
        grpc_inference_port=ports[0],
        grpc_management_port=ports[1],
        http_inference_port=ports[2],
        management_port=ports[3],
        metrics_port=ports[4],
    )
    torchserve = TorchServeProcess.start(config)
    try:
        torchserve.wait_ready(STARTUP_SECONDS)
        flags = [
            *("--backend", "torchserve", "--model-store", str(archives)),
            *("--torchserve-target", config.grpc_target),
            *("--torchserve-key-file", str(config.key_file)),
            *("--host", HOST, "--port", "0", "--metrics-port", "0", "--max-in-flight", "1024"),
        ]
        with gateway_process(flags, workdir / "gateway-torchserve.log") as (pid, address):

            def processes() -> dict[str, int]:
                return {f"gateway (pid {pid})": pid, **torchserve_processes(torchserve.pid)}

            yield Service("torchserve", address, processes)
    finally:
        torchserve.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------- load


async def references(
    service: Service, todo: Sequence[pb.ExplainRequest], timeout: float
) -> list[pb.ExplainResponse]:
    """The answer of each request, one call at a time."""
    async with grpc.aio.insecure_channel(service.address) as channel:
        stub = explain_pb2_grpc.ExplanationServiceStub(channel)
        return [await stub.Explain(r, timeout=timeout) for r in todo]


async def settle(service: Service, limit: float) -> None:
    """Waits (at most ``limit`` seconds) until the service's processes use under
    ``IDLE_CORES`` of CPU over a quarter of a second."""
    pids = list(service.processes().values())
    end = time.monotonic() + limit
    before, t = cpu_seconds(pids), time.monotonic()
    while time.monotonic() < end:
        await asyncio.sleep(0.25)
        now_cpu, now = cpu_seconds(pids), time.monotonic()
        if (now_cpu - before) / (now - t) < IDLE_CORES:
            return
        before, t = now_cpu, now


async def run_cell(
    service: Service,
    todo: Sequence[pb.ExplainRequest],
    refs: Sequence[pb.ExplainResponse],
    cell: Cell,
    plan: CellPlan,
    checks: Checks,
) -> Cell:
    """One closed-loop cell (module docstring) against ``service``; fills ``cell``."""
    clients = cell.clients
    pids = list(service.processes().values())
    cores = usable_cores()
    t0 = time.monotonic()
    hard_end = t0 + plan.cap
    issued = 0
    done = 0
    last = t0
    window: tuple[float, int, float, float] | None = None  # time, done, server and own CPU

    def more() -> bool:
        now = time.monotonic()
        if now >= hard_end:
            cell.capped = True
            return False
        if window is None:
            return True
        if plan.seconds > 0:
            return now < window[0] + plan.seconds
        return issued < clients + max(plan.requests, clients)

    async def client(number: int) -> None:
        nonlocal issued, done, last, window
        async with grpc.aio.insecure_channel(service.address, options=OWN_CONNECTION) as channel:
            stub = explain_pb2_grpc.ExplanationServiceStub(channel)
            turn, first = number, True
            while more():
                index = turn % len(todo)
                turn += 1
                issued += 1
                started = time.monotonic()
                try:
                    answer = await stub.Explain(todo[index], timeout=hard_end - started)
                except grpc.aio.AioRpcError as error:
                    cell.codes[error.code().name] += 1
                    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        cell.capped = True
                        return
                    if len(checks.failures) < MAX_EXAMPLES:
                        details = f"{error.code().name}: {error.details()}"
                        checks.failures.append(f"{_where(cell)}: {details}")
                    continue
                finished = time.monotonic()
                cell.codes["OK"] += 1
                done += 1
                last = finished
                if not first:
                    cell.latencies.append(finished - started)
                    cell.device_calls.append(answer.device_calls)
                first = False
                cell.answers += 1
                if checks.check(f"{_where(cell)} image {index}", answer, refs[index]):
                    cell.differing += 1
                warm = done >= clients and finished - t0 >= plan.warmup_seconds
                if window is None and warm:
                    window = (finished, done, cpu_seconds(pids), time.process_time())

    await asyncio.gather(*(client(n) for n in range(clients)))
    end = time.monotonic()
    cell.seconds = end - t0
    if window is not None and done > window[1] and last > window[0]:
        cell.rate = (done - window[1]) / (last - window[0])
        span = end - window[0]
        cell.cpu = (cpu_seconds(pids) - window[2]) / span / cores
        cell.client_cpu = (time.process_time() - window[3]) / span
    return cell


def _where(cell: Cell) -> str:
    return f"{cell.model} {cell.mix} {cell.backend} x{cell.clients}"


def estimate(rate: float | None, clients: int, plan: CellPlan) -> float:
    """Seconds a cell would take at ``rate`` requests/s (0 when unknown)."""
    if not rate:
        return 0.0
    if plan.seconds > 0:
        return max(plan.warmup_seconds, clients / rate) + plan.seconds + clients / rate
    return (clients + max(plan.requests, clients)) / rate


@dataclass
class Starved:
    """Latencies (seconds) of the small calls alone and during the large request, and of
    the large requests; ``code``: how the small calls during it ended."""

    alone: list[float] = field(default_factory=list)
    during: list[float] = field(default_factory=list)
    large: list[float] = field(default_factory=list)
    code: str = "OK"


async def starvation(
    service: Service,
    small: pb.ExplainRequest,
    large: pb.ExplainRequest,
    calls: int,
    cap: float,
) -> Starved:
    """``calls`` small calls one at a time alone, then while ``large`` runs over and over
    on the same service (the small calls get ``cap`` seconds in all)."""
    got = Starved()
    async with grpc.aio.insecure_channel(service.address) as channel:
        stub = explain_pb2_grpc.ExplanationServiceStub(channel)
        await stub.Explain(small, timeout=cap)  # warm
        for _ in range(calls):
            t = time.monotonic()
            await stub.Explain(small, timeout=cap)
            got.alone.append(time.monotonic() - t)
        stop = asyncio.Event()

        async def large_loop() -> None:
            while not stop.is_set():
                t = time.monotonic()
                await stub.Explain(large, timeout=STARTUP_SECONDS)
                got.large.append(time.monotonic() - t)

        looping = asyncio.ensure_future(large_loop())
        await asyncio.sleep(0.5)  # the large request is on the server
        end = time.monotonic() + cap
        while len(got.during) < calls and not looping.done():
            t = time.monotonic()
            try:
                await stub.Explain(small, timeout=max(end - t, 0.001))
            except grpc.aio.AioRpcError as error:
                got.code = error.code().name
                break
            got.during.append(time.monotonic() - t)
        stop.set()
        await looping  # the large call in flight finishes
    return got


# ------------------------------------------------------------------------------- report


def _ms(values: Sequence[float], q: float) -> str:
    return f"{np.percentile(values, q) * 1e3:.0f}" if values else "-"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


HEADER = (
    f"{'model':<9}{'mix':<22}{'clients':>7} {'backend':<11}{'req/s':>8}{'p50 ms':>9}"
    f"{'p99 ms':>9}{'cpu':>6}{'client':>7}{'dev calls':>10}{'differing':>10}{'calls':>7}  note"
)


def row(cell: Cell) -> str:
    """One line of the table."""
    rate = "-" if cell.rate is None else f"{cell.rate:.2f}"
    calls = statistics.fmean(cell.device_calls) if cell.device_calls else None
    note = cell.skipped or ("capped" if cell.capped else "")
    errors = {c: n for c, n in cell.codes.items() if c not in ("OK", "DEADLINE_EXCEEDED")}
    if errors:
        note += " " + ", ".join(f"{c} {n}" for c, n in errors.items())
    return (
        f"{cell.model:<9}{cell.mix:<22}{cell.clients:>7} {cell.backend:<11}{rate:>8}"
        f"{_ms(cell.latencies, 50):>9}{_ms(cell.latencies, 99):>9}{_pct(cell.cpu):>6}"
        f"{_pct(cell.client_cpu):>7}{'-' if calls is None else f'{calls:.3f}':>10}"
        f"{cell.differing:>10}{cell.answers:>7}  {note.strip()}"
    )


def _ratio(a: float | None, b: float | None) -> str:
    return f"x{a / b:.2f}" if a and b else "-"


def ratios(cells: dict[tuple[str, str, str, int], Cell], clients: Sequence[int]) -> list[str]:
    """The ratios of the issue: each backend's req/s at 16 clients over 1 client, batched
    over serial req/s at 16, TorchServe over embedded (batched) p50 at 1 client and req/s at
    16 (the most clients selected where 16 is not); the columns whose backends ran."""
    hi = 16 if 16 in clients else max(clients)
    lo = min(clients)
    pairs = sorted({(m, x) for m, x, _, _ in cells}, key=lambda p: (p[0], MIXES.index(p[1])))
    ran = [b for b in BACKENDS if any(k[2] == b for k in cells)]

    def rate(model: str, mix: str, backend: str, n: int) -> float | None:
        cell = cells.get((model, mix, backend, n))
        return cell.rate if cell else None

    def p50(model: str, mix: str, backend: str, n: int) -> float | None:
        cell = cells.get((model, mix, backend, n))
        return float(np.percentile(cell.latencies, 50)) if cell and cell.latencies else None

    columns: list[tuple[str, Callable[[str, str], str]]] = [
        (f"{b} {hi}/{lo}", lambda m, x, b=b: _ratio(rate(m, x, b, hi), rate(m, x, b, lo)))
        for b in ran
    ]
    if {"batched", "processes"} <= set(ran):
        columns.append(
            (
                f"proc/batched @{hi}",
                lambda m, x: _ratio(rate(m, x, "processes", hi), rate(m, x, "batched", hi)),
            )
        )
    if {"batched", "serial"} <= set(ran):
        columns.append(
            (
                f"batched/serial @{hi}",
                lambda m, x: _ratio(rate(m, x, "batched", hi), rate(m, x, "serial", hi)),
            )
        )
    if {"batched", "torchserve"} <= set(ran):
        columns.append(
            (
                f"ts/emb p50 @{lo}",
                lambda m, x: _ratio(p50(m, x, "torchserve", lo), p50(m, x, "batched", lo)),
            )
        )
        columns.append(
            (
                f"ts/emb req/s @{hi}",
                lambda m, x: _ratio(rate(m, x, "torchserve", hi), rate(m, x, "batched", hi)),
            )
        )
    width = max(len(name) for name, _ in columns) + 2
    lines = [f"{'model':<9}{'mix':<22}" + "".join(f"{name:>{width}}" for name, _ in columns)]
    for model, mix in pairs:
        values = "".join(f"{column(model, mix):>{width}}" for _, column in columns)
        lines.append(f"{model:<9}{mix:<22}{values}")
    return lines


# --------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--mixes", nargs="+", choices=MIXES, default=list(MIXES))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--clients", nargs="+", type=int, default=list(CLIENTS))
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--seconds",
        type=float,
        help="measured window of every cell (default: 3 on the demo model; the ResNet counts "
        "calls)",
    )
    how.add_argument(
        "--requests",
        type=int,
        help="calls after the warm-up of every cell, at least one per client (default: 4 on "
        "the ResNet)",
    )
    parser.add_argument(
        "--warmup-seconds", type=float, help="least warm-up per cell (default 1 demo, 0 ResNet)"
    )
    parser.add_argument(
        "--cap", type=float, help="seconds per cell at most (default 30 demo, 25 ResNet)"
    )
    parser.add_argument(
        "--images", type=int, default=0, help="images per model (default 4 demo, 2 ResNet)"
    )
    parser.add_argument(
        "--resnet-occlusion",
        nargs=2,
        type=int,
        default=[112, 56],
        metavar=("WINDOW", "STRIDE"),
        help="occlusion of the ResNet's grad_cam+occlusion mix",
    )
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument(
        "--starvation-calls",
        type=int,
        default=10,
        help="small calls alone and during the large request, per backend (0: no starvation)",
    )
    parser.add_argument(
        "--starvation-cap", type=float, default=30.0, help="seconds of small calls during"
    )
    parser.add_argument(
        "--large-occlusion",
        nargs=2,
        type=int,
        default=[16, 8],
        metavar=("WINDOW", "STRIDE"),
        help="the large request: occlusion on the ResNet (on the demo model without it)",
    )
    parser.add_argument("--demo-dir", type=Path, default=Path("var/models/demo"))
    parser.add_argument(
        "--server-flags",
        default="",
        help="more flags of the embedded servers, e.g. '--workers 64 --forward-backend torch'",
    )
    parser.add_argument(
        "--torchserve-batch-size", type=int, help="archive batch size (default: the archive's)"
    )
    parser.add_argument(
        "--torchserve-max-batch-delay-ms",
        type=int,
        help="archive max batch delay (default: the archive's)",
    )
    args = parser.parse_args(argv)
    if min(args.clients) < 1 or (args.requests is not None and args.requests < 1):
        parser.error("--clients and --requests must be >= 1")
    if args.seconds is not None and args.seconds <= 0:
        parser.error("--seconds must be > 0")
    args.clients = sorted(set(args.clients))
    return args


def plans(args: argparse.Namespace) -> dict[str, CellPlan]:
    """Each model's cell plan: the defaults, overridden by the flags."""
    defaults = {"demo": CellPlan(3.0, 0, 1.0, 30.0), "resnet18": CellPlan(0.0, 4, 0.0, 25.0)}
    out = {}
    for name, plan in defaults.items():
        seconds, requests = plan.seconds, plan.requests
        if args.seconds is not None:
            seconds, requests = args.seconds, 0
        elif args.requests is not None:
            seconds, requests = 0.0, args.requests
        warmup = plan.warmup_seconds if args.warmup_seconds is None else args.warmup_seconds
        out[name] = CellPlan(seconds, requests, warmup, args.cap or plan.cap)
    return out


def start_services(
    stack: ExitStack,
    names: Sequence[str],
    specs: dict[str, ModelSpec],
    tmp: Path,
    args: argparse.Namespace,
) -> dict[str, Service]:
    """Starts the selected backends, each serving every selected model."""
    services = {}
    store = _store(specs, tmp / "store")
    archive = ArchiveSettings()
    if args.torchserve_batch_size is not None:
        archive = dataclasses.replace(archive, batch_size=args.torchserve_batch_size)
    if args.torchserve_max_batch_delay_ms is not None:
        delay = args.torchserve_max_batch_delay_ms
        archive = dataclasses.replace(archive, max_batch_delay_ms=delay)
    for name in names:
        started = time.monotonic()
        if name == "torchserve":
            workdir = tmp / "stack"
            workdir.mkdir()
            service = stack.enter_context(torchserve_stack(specs, workdir, archive))
        elif name == "processes":
            flags = (
                *("--concurrency", "batched", "--processes", str(math.ceil(usable_cores()))),
                *shlex.split(args.server_flags),
            )
            service = stack.enter_context(embedded_server(name, store, tmp, flags))
        else:
            flags = ("--concurrency", name, *shlex.split(args.server_flags))
            service = stack.enter_context(embedded_server(name, store, tmp, flags))
        services[name] = service
        print(f"  {name}: {service.address} in {time.monotonic() - started:.0f} s", flush=True)
    return services


def run_table(
    services: dict[str, Service],
    specs: dict[str, ModelSpec],
    args: argparse.Namespace,
    checks: Checks,
) -> dict[tuple[str, str, str, int], Cell]:
    """Every cell of the selection, printed as it completes; backends take turns at each
    client count."""
    reference = next(services[b] for b in REFERENCE_ORDER if b in services)
    cells: dict[tuple[str, str, str, int], Cell] = {}
    print(HEADER, flush=True)
    for spec in specs.values():
        for mix in args.mixes:
            todo = mix_requests(spec, mix)
            before = load_average()
            refs = asyncio.run(references(reference, todo, STARTUP_SECONDS))
            best: dict[str, float] = {}
            for clients in args.clients:
                for backend, service in services.items():
                    cell = Cell(spec.name, mix, backend, clients)
                    guess = estimate(best.get(backend), clients, spec.plan)
                    if guess > spec.plan.cap:
                        cell.skipped = f"skipped: about {guess:.0f} s > cap {spec.plan.cap:g} s"
                    else:
                        asyncio.run(settle(service, 15.0))
                        asyncio.run(run_cell(service, todo, refs, cell, spec.plan, checks))
                        if cell.capped:  # calls past the cap end on the server at their deadline
                            asyncio.run(settle(service, 30.0))
                    if cell.rate:
                        best[backend] = max(best.get(backend, 0.0), cell.rate)
                    cells[cell.key] = cell
                    print(row(cell), flush=True)
            print(f"  load average {spec.name} {mix}: before {before}; after {load_average()}")
    return cells


def run_starvation(
    services: dict[str, Service], specs: dict[str, ModelSpec], args: argparse.Namespace
) -> None:
    """The starvation section (module docstring)."""
    large_spec = specs.get("resnet18") or specs["demo"]
    window, stride = args.large_occlusion
    occlusion = pb.OcclusionParams(window=window, stride=stride)
    large = request(
        large_spec.name,
        large_spec.images[0],
        [pb.MethodRequest(method=pb.OCCLUSION, occlusion=occlusion)],
    )
    smalls = {
        spec.name: request(spec.name, spec.images[0], methods(spec, "saliency"))
        for spec in specs.values()
    }
    print(
        f"\nstarvation: small calls one at a time alone, then while occlusion (window {window}, "
        f"stride {stride}) on {large_spec.name} runs over and over on the same server"
    )
    print(
        f"{'backend':<11}{'small call':<20}{'p50 alone ms':>13}{'p50 during ms':>15}"
        f"{'ratio':>8}{'calls':>7}{'large s':>9}  note"
    )
    before = load_average()
    for backend, service in services.items():
        for name, small in smalls.items():
            asyncio.run(settle(service, 30.0))
            got = asyncio.run(
                starvation(service, small, large, args.starvation_calls, args.starvation_cap)
            )
            note = "" if got.code == "OK" else f"a small call ended {got.code}"
            alone, during = (float(np.median(v)) if v else None for v in (got.alone, got.during))
            large_s = f"{statistics.fmean(got.large):.2f}" if got.large else "-"
            print(
                f"{backend:<11}{name + ' saliency':<20}{_ms(got.alone, 50):>13}"
                f"{_ms(got.during, 50):>15}{_ratio(during, alone):>8}{len(got.during):>7}"
                f"{large_s:>9}  {note}",
                flush=True,
            )
    print(f"  load average: before {before}; after {load_average()}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    print(f"machine: {machine()}")
    print(f"load average (1/5/15 min) at start: {load_average()}")
    cell_plans = plans(args)
    with tempfile.TemporaryDirectory(prefix="xaiserve-concurrency-") as tmp, ExitStack() as stack:
        specs = prepare_models(args.models, Path(tmp), args, cell_plans)
        for spec in specs.values():
            p = spec.plan
            how = f"{p.seconds:g} s" if p.seconds else f"{p.requests} calls (>= 1 per client)"
            shape = "x".join(map(str, spec.images[0].shape))
            window, stride = spec.occlusion
            print(
                f"{spec.name}: {len(spec.images)} images {shape}, occlusion window {window} stride "
                f"{stride}; per cell: warm-up a round and >= {p.warmup_seconds:g} s, then {how}; "
                f"cap {p.cap:g} s"
            )
        print(f"starting {', '.join(args.backends)} (load average {load_average()})", flush=True)
        services = start_services(stack, args.backends, specs, Path(tmp), args)
        print(f"started (load average {load_average()})\n", flush=True)
        checks = Checks(args.tolerance)
        cells = run_table(services, specs, args, checks)
        if args.starvation_calls > 0:
            run_starvation(services, specs, args)
    print("\nratios (requests/s, p50):")
    for line in ratios(cells, args.clients):
        print(line)
    errors: Counter[str] = Counter()
    for cell in cells.values():
        errors.update({c: n for c, n in cell.codes.items() if c not in ("OK", "DEADLINE_EXCEEDED")})
    answers = sum(cell.answers for cell in cells.values())
    print(
        f"\nanswers differing from the single-call reference (tolerance {args.tolerance:g} abs + "
        f"rel): {checks.count} of {answers}"
    )
    for example in checks.examples:
        print(f"  {example}")
    if errors:
        print("failed calls: " + ", ".join(f"{c} {n}" for c, n in errors.items()))
        for failure in checks.failures:
            print(f"  {failure}")
    print(f"load average at the end: {load_average()}; {time.monotonic() - began:.0f} s in all")
    return 1 if checks.count or errors else 0


if __name__ == "__main__":
    sys.exit(main())
