"""The engine on a CUDA GPU: the same answers as on the CPU, and throughput that grows with
concurrent requests (issue 22, item 6). One report, in a few minutes on one GPU.

    make gpu-check                          # python bench/gpu_check.py
    python bench/gpu_check.py --devices cpu cpu --skip-concurrency   # a dry run without a GPU

Without a CUDA GPU that torch can use it prints one line saying why and exits 0.

1. Equality. The demo model and the ResNet-18-shaped network of ``bench/concurrency.py``
   (random weights, seed 0, 3 x 224 x 224) are loaded in this process on each device
   (``Engine.from_model_store`` with ``ForwardConfig(device=..., backend="torch")``: forward-
   only work on torch on both, so the device is the only difference; ONNX Runtime's CPU
   package would run the GPU model's forward-only work on the CPU). Every method the model
   lists (ListModels' ``methods``, default parameters) runs on ``--images`` images, one call
   at a time on each device, and must give the same prediction (target and top-k classes),
   the same forward passes (per stage and per map) and maps within ``--tolerance``: 1e-4
   absolute on the ONE_CHANNEL maps, which the engine min-max scales to [0, 1].
   Why 1e-4: ten times the 1e-5 that packing rows into batches of another size may cost on
   the CPU (``tests/engine/test_concurrency.py``; LRP's epsilon rule reached 1.8e-5), as a
   GPU sums in other orders still (cuDNN picks its own convolution algorithms); a placement
   bug (a tensor left on another device, a missed normalisation, random numbers drawn on the
   GPU) moves maps by 1e-2 and more; and 1e-4 of a map's maximum is below what a heat map
   shows.
   TF32 stays as torch sets it (cuDNN convolutions may use TF32 by default): the check
   measures what the server computes. Where a map misses the tolerance, it runs again with
   TF32 off, and the report says whether that was the cause.
2. Concurrency. ``bench/concurrency.py``'s embedded cells on the GPU (``--device cuda
   --forward-backend torch``): both models, its four mixes, 1, 4, 16 and 64 clients on the
   batched server, 1 and 16 on the serial one, ``--seconds`` per cell, most important cells
   first (ResNet saliency), none started after ``--budget`` seconds from the script's start
   (5 minutes: the whole check stays well under 8 on an H100). Prints the table, the
   64-vs-1 requests/s of ResNet saliency (target >= 10x) and the ratios of concurrency.py.

On a GPU machine without this checkout's virtual environment: ``make gpu-check
GPU_PYTHON=python3`` with ``src`` on PYTHONPATH (the Makefile sets it); the server needs
grpcio, grpcio-health-checking and grpcio-reflection of the versions in pyproject.toml, and
the demo model is trained first where ``--demo-dir`` lacks it (1-2 minutes on a CPU): carry
``var/models/demo``. Exit status: 1 when an answer differs, a call fails or a part cannot run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

# (clients, backend) of each concurrency cell, in the order they run
CELLS = (
    (1, "batched"),
    (1, "serial"),
    (4, "batched"),
    (16, "batched"),
    (16, "serial"),
    (64, "batched"),
)
OK_CODES = ("OK", "DEADLINE_EXCEEDED")  # a cell's cap ends calls with DEADLINE_EXCEEDED


def no_cuda_reason() -> str:
    """Why torch cannot use a CUDA GPU here, or "" when it can."""
    try:
        import torch
    except ImportError as err:
        return f"torch is not installed ({err})"
    if not torch.cuda.is_available():
        return (
            f"torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is false; "
            f"built for CUDA {torch.version.cuda})"
        )
    return ""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--devices",
        nargs=2,
        default=["cpu", "cuda"],
        metavar=("REFERENCE", "DEVICE"),
        help="the reference device and the one checked against it",
    )
    parser.add_argument("--models", nargs="+", default=["demo", "resnet18"])
    parser.add_argument("--images", type=int, default=2, help="images per model")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--demo-dir", type=Path, default=Path("var/models/demo"))
    parser.add_argument("--seconds", type=float, default=2.0, help="measured window per cell")
    parser.add_argument(
        "--budget",
        type=float,
        default=300.0,
        help="seconds from the start after which no concurrency cell starts",
    )
    parser.add_argument("--skip-equality", action="store_true")
    parser.add_argument("--skip-concurrency", action="store_true")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------ equality


@dataclasses.dataclass
class MethodCheck:
    """One method on one model over the images: the largest map difference, what else
    differed, and the seconds each engine spent."""

    model: str
    method: str
    max_diff: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0])
    without_tf32: float | None = None  # the largest difference again, TF32 off

    def failed(self, tolerance: float) -> bool:
        return bool(self.problems) or not self.max_diff <= tolerance


def _forward_config(device: str):  # -> ForwardConfig
    """Forward-only work on torch, on ``device``, without an ONNX export (a checkout
    without a device setting: the CPU only)."""
    from xaiserve.runtime.forward.config import ForwardConfig

    if "device" in {f.name for f in dataclasses.fields(ForwardConfig)}:
        return ForwardConfig(backend="torch", device=device, export_on_load=False)
    if device != "cpu":
        raise RuntimeError(
            "this checkout has no device setting (ForwardConfig.device, the server's "
            "--device), so nothing can run on the GPU"
        )
    return ForwardConfig(backend="torch", export_on_load=False)


def _request(model: str, image: np.ndarray, method: str):  # -> ExplainRequest
    from xaiserve.api.types import ExplainRequest, MethodRequest, RawTensor

    raw = RawTensor(tuple(image.shape), image.astype("<f4").tobytes())
    methods = (MethodRequest(method, params_field=method),)
    return ExplainRequest(model=model, image=raw, methods=methods, want_png=False)


def _compare(want, got) -> tuple[float, list[str]]:  # (ExplainResult, ExplainResult)
    """The largest map difference and what else differs between two answers."""
    problems = []
    if got.prediction.target.index != want.prediction.target.index:
        problems.append(f"target {got.prediction.target.index} != {want.prediction.target.index}")
    if [c.index for c in got.prediction.top_k] != [c.index for c in want.prediction.top_k]:
        problems.append("top-k classes")
    if got.forward_passes != want.forward_passes:
        problems.append(f"forward passes {got.forward_passes} != {want.forward_passes}")
    diff = 0.0
    for a, b in zip(want.explanations, got.explanations, strict=True):
        if a.forward_passes != b.forward_passes:
            problems.append(f"map forward passes {b.forward_passes} != {a.forward_passes}")
        if a.map.shape != b.map.shape:
            problems.append(f"map shape {b.map.shape} != {a.map.shape}")
            continue
        gap = np.abs(a.map.astype(np.float64) - b.map.astype(np.float64))
        diff = max(diff, float(np.nanmax(gap)) if gap.size else 0.0)
        if np.isnan(a.map).any() != np.isnan(b.map).any():
            problems.append("NaN in one map only")
    return diff, problems


def equality(args: argparse.Namespace, store: Path, images: dict[str, list[np.ndarray]]) -> bool:
    """Part 1 (module docstring); prints its report and returns whether it passed."""
    import torch

    from xaiserve.engine.engine import Engine
    from xaiserve.engine.limits import EngineLimits

    started = time.monotonic()
    pair = [
        Engine.from_model_store(store, EngineLimits(), _forward_config(d)) for d in args.devices
    ]
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    print(
        f"\n1. equality, {args.devices[1]} against {args.devices[0]} (both loaded in "
        f"{time.monotonic() - started:.0f} s): every listed method, {args.images} images, "
        f"maps within {args.tolerance:g} absolute (ONE_CHANNEL); TF32 cudnn {tf32[0]}, "
        f"matmul {tf32[1]}"
    )
    ok = True
    for info in pair[0].list_models():
        if info.name not in images:
            continue
        other = next(i for i in pair[1].list_models() if i.name == info.name)
        if set(other.methods) != set(info.methods):
            print(
                f"  {info.name}: methods differ: {sorted(set(info.methods) ^ set(other.methods))}"
            )
            ok = False
        checks = [_check(pair, info.name, method, images[info.name]) for method in info.methods]
        failing = [c for c in checks if c.failed(args.tolerance)]
        if failing and args.devices[1].startswith("cuda") and any(tf32):
            _again_without_tf32(pair, failing, images)
        worst = ", ".join(f"{c.method} {c.max_diff:.2g}" for c in sorted(checks, key=_worst)[:3])
        print(
            f"  {info.name}: {len(checks)} methods: maps max |diff| "
            f"{max(c.max_diff for c in checks):.2g} (worst {worst}); {len(failing)} failing; "
            f"{args.devices[0]} {sum(c.seconds[0] for c in checks):.1f} s, "
            f"{args.devices[1]} {sum(c.seconds[1] for c in checks):.1f} s"
        )
        for c in failing:
            again = "" if c.without_tf32 is None else f"; TF32 off: {c.without_tf32:.2g}"
            print(f"    FAIL {c.method}: max |diff| {c.max_diff:.2g}{again}")
            for problem in c.problems[:3]:
                print(f"      {problem}")
        ok = ok and not failing
    return ok


def _worst(check: MethodCheck) -> float:
    return -check.max_diff


def _check(pair, model: str, method: str, images: list[np.ndarray]) -> MethodCheck:
    """``method`` on each image, one call on each engine of the pair."""
    check = MethodCheck(model, method)
    for image in images:
        request = _request(model, image, method)
        answers = []
        for k, engine in enumerate(pair):
            t = time.monotonic()
            answers.append(engine.explain(request))
            check.seconds[k] += time.monotonic() - t
        diff, problems = _compare(*answers)
        check.max_diff = max(check.max_diff, diff)
        check.problems += problems
    return check


def _again_without_tf32(pair, failing: list[MethodCheck], images) -> None:
    """Runs the failing methods again with TF32 off; records their largest difference."""
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for check in failing:
            check.without_tf32 = _check(
                pair, check.model, check.method, images[check.model]
            ).max_diff
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --------------------------------------------------------------------------- concurrency


def concurrency_cells(args: argparse.Namespace, tmp: Path, began: float) -> bool:
    """Part 2 (module docstring); prints its report and returns whether it passed."""
    import concurrency as bench  # bench/concurrency.py, beside this file

    device = args.devices[1]
    flags = ["--models", *args.models, "--seconds", str(args.seconds), "--warmup-seconds", "0.5"]
    flags += ["--cap", "60", "--images", str(args.images), "--demo-dir", str(args.demo_dir)]
    options = bench.parse_args(flags)
    tmp.mkdir()
    specs = bench.prepare_models(options.models, tmp, options, bench.plans(options))
    server_flags = ["--forward-backend", "torch"]
    if device != "cpu":
        server_flags += ["--device", device]
    print(f"\n2. concurrency on {device}: embedded servers with {' '.join(server_flags)}")
    started = time.monotonic()
    checks = bench.Checks(options.tolerance)
    cells: dict[tuple[str, str, str, int], bench.Cell] = {}
    with ExitStack() as stack:
        store = bench._store(specs, tmp / "store")
        services = {}
        for name in ("batched", "serial"):
            flags = ("--concurrency", name, *server_flags)
            services[name] = stack.enter_context(bench.embedded_server(name, store, tmp, flags))
        print(f"  servers up in {time.monotonic() - started:.0f} s")
        print(bench.HEADER)
        order = [("resnet18", "saliency"), ("demo", "saliency")]
        order += [(m, x) for m in args.models for x in bench.MIXES if (m, x) not in order]
        for model, mix in order:
            if model not in specs:
                continue
            todo = bench.mix_requests(specs[model], mix)
            refs = asyncio.run(bench.references(services["batched"], todo, 120.0))
            for clients, backend in CELLS:
                cell = bench.Cell(model, mix, backend, clients)
                if time.monotonic() - began > args.budget:
                    cell.skipped = f"skipped: past the {args.budget:g} s budget"
                else:
                    service = services[backend]
                    asyncio.run(bench.settle(service, 10.0))
                    plan = specs[model].plan
                    asyncio.run(bench.run_cell(service, todo, refs, cell, plan, checks))
                cells[cell.key] = cell
                print(bench.row(cell), flush=True)
    print("\n  ratios:")
    for line in bench.ratios(cells, [1, 16]):
        print(f"  {line}")
    one = cells.get(("resnet18", "saliency", "batched", 1))
    many = cells.get(("resnet18", "saliency", "batched", 64))
    if one and many and one.rate and many.rate:
        verdict = "meets" if many.rate >= 10 * one.rate else "MISSES"
        print(
            f"  resnet18 saliency, batched: requests/s at 64 clients / at 1 client = "
            f"x{many.rate / one.rate:.1f} ({verdict} the >= 10x target)"
        )
    failed = sum(n for c in cells.values() for code, n in c.codes.items() if code not in OK_CODES)
    print(
        f"  answers differing from the single-call reference: {checks.count}; "
        f"failed calls: {failed}"
    )
    for example in checks.examples + checks.failures:
        print(f"    {example}")
    return not checks.count and not failed


# --------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if any(d.startswith("cuda") for d in args.devices) and (why := no_cuda_reason()):
        print(f"gpu-check skipped: {why}")
        return 0
    import concurrency as bench
    import torch

    from xaiserve.model_store.build_demo import ensure_demo_model

    began = time.monotonic()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"gpu-check: {gpu}; torch {torch.__version__}; devices {' vs '.join(args.devices)}")
    ok = True
    with tempfile.TemporaryDirectory(prefix="xaiserve-gpu-check-") as tmp:
        root = Path(tmp)
        store = root / "equality"
        store.mkdir()
        images: dict[str, list[np.ndarray]] = {}
        if "demo" in args.models:
            demo = ensure_demo_model(args.demo_dir, progress=True)
            (store / "demo").symlink_to(demo.resolve(), target_is_directory=True)
            images["demo"] = list(bench.images(args.images, 64))
        if "resnet18" in args.models:
            bench.write_resnet18(store / "resnet18")
            images["resnet18"] = list(bench.images(args.images, 224))
        parts = []
        if not args.skip_equality:
            parts.append(("equality", lambda: equality(args, store, images)))
        if not args.skip_concurrency:
            parts.append(("concurrency", lambda: concurrency_cells(args, root / "cells", began)))
        for name, part in parts:
            try:
                ok = part() and ok
            except Exception:  # report it and go on: the GPU time is spent either way
                print(f"\n{name} could not run:\n{traceback.format_exc(limit=6)}")
                ok = False
    print(f"\ngpu-check {'passed' if ok else 'FAILED'} in {time.monotonic() - began:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
