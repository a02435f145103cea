"""Forward-only work on torch and on ONNX Runtime, side by side in one process.

    make bench                                  # python bench/forward_only.py
    python bench/forward_only.py --nets demo,resnet18 --demo-images 4

For each network (the trained demo model at 3 x 64 x 64; ResNet-18- and ResNet-50-shaped
networks of ``support.resnets`` at 3 x 224 x 224 with random weights, which
is fine for speed; every one wrapped in its pixel-space normalization, exported to ONNX and
checked against torch as the engine does at load):

1. the machine's best batched forward throughput for that network: images/s over a few
   batch sizes, torch eager (no grad) and the ONNX Runtime session, measured before and
   after the methods (the better of the two is used: load from other processes varies);
   the methods' own forward calls take at most the batch the server uses (printed: on
   ONNX Runtime the fastest measured in the short probe at load, on torch the memory
   budget's);
2. Captum's Occlusion (torch forward, perturbations_per_eval = the batch size with the
   best torch throughput), our occlusion with a full forward pass per occluded image on
   torch and on ONNX Runtime, the same incrementally (the server's default: only the
   region of the early layers a window changes is recomputed; one pass still counted per
   occluded image, the plan's estimated share of a full pass printed, and the share a
   window changes, the least any exact incremental pass computes; the plan is built
   once per model and window before the timings; also timed alone: the plan's head, the
   layers after its last cut, which run on whole activations for every window and so bound
   what any crop can save), adaptive occlusion (ONNX Runtime, incremental; Spearman rank
   correlation with full occlusion, on the demo over ``--held-out`` held-out images of the
   data set, 100 by default, not only the few timed ones), APEM per map (the
   occlusion map's, default options) on torch and on ONNX Runtime, and on the demo model
   the fast APEM filter on both; and the APEMs of a request's four maps (occlusion,
   adaptive occlusion, saliency, Grad-CAM) on ONNX Runtime, one by one (each map its own
   gradient and search rounds) and together as the engine runs them (``apem_many``: one
   gradient, every map's searches in the same forward calls); on the demo model and the
   ResNet-18, Score-CAM and RISE (default options) on ONNX Runtime.

Printed per method: forward passes, seconds, speed-up over Captum's Occlusion, and the
efficiency: (forward passes / the machine's best throughput for the network) / seconds
(above 100% for incremental occlusion, whose passes are cheaper than full ones),
against the best of either backend ("eff") and of the backend the method ran on ("own");
"in fwd" is the share of the method's time spent inside the counted forward (the rest:
building perturbed images, searching, interpolating, and APEM's one torch gradient).
APEM rows also print the efficiency of their forward-only part: without the torch
gradient's pass and time (the gradient of the same image timed right after each run).
With ``--repeats N`` the methods run N times in turn and each method's fastest run
counts (the machine's speed drifts during a run; the minimum is the least disturbed);
incremental occlusion's rows also print their speed-up over Captum's run of each repeat.
Inputs: held-out demo images (``synthetic.TEST_SEED``), and one shape image drawn at
224 x 224 for the ResNets. Occlusion: the demo's default window 8 / stride 4, ResNet-18
window 15 / stride 8, ResNet-50 window 31 / stride 16 (cut: ~4x fewer windows than
15 / 8, to keep the run under 10 minutes on 2 cores). The load average is printed, and on
Linux the CPU time the hypervisor took from this machine (steal) per network: on a
shared machine compare ratios measured in the same run, not absolute times.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from xaiserve.engine.postprocess import apply_stage
from xaiserve.methods.base import MethodContext
from xaiserve.methods.perturbation.occlusion import Occlusion, window_starts
from xaiserve.methods.perturbation.occlusion_adaptive import rank_correlation
from xaiserve.methods.registry import get_method
from xaiserve.model_store import synthetic
from xaiserve.model_store.build_demo import ensure_demo_model
from xaiserve.reliability.apem import apem, apem_many
from xaiserve.reliability.filter import filter_map
from xaiserve.reliability.options import default_filter_options, default_options
from xaiserve.reliability.probe import Probe, gradient_sign_and_logits
from xaiserve.reliability.score import relevance_from_map
from xaiserve.runtime.forward.backends import ModelForwards, prepare_forwards
from xaiserve.runtime.forward.config import ForwardConfig
from xaiserve.runtime.forward.counted import Budget
from xaiserve.runtime.forward.incremental.run import IncrementalOcclusion
from xaiserve.runtime.model import ModelConfig, PixelSpaceModel, ServedModel, load_model_dir

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from support import resnets  # noqa: E402  (the test networks)

NETS = ("demo", "resnet18", "resnet50")
REQUEST_MAPS = 4
"""A request's maps for the APEM rows: occlusion, adaptive occlusion, saliency, Grad-CAM."""
MASKING_NETS = ("demo", "resnet18")
"""Networks with the Score-CAM and RISE rows (ResNet-50's Score-CAM alone would take one
pass per channel of its 2048-channel CAM layer, 50 s per repeat on 2 cores)."""
ONE_BY_ONE = f"APEM, {REQUEST_MAPS} maps one by one"
TOGETHER = f"APEM, {REQUEST_MAPS} maps together"
MASKING_ROWS = {"score_cam": "Score-CAM", "rise": "RISE"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Net:
    """One benchmarked network: its forwards (torch module + checked ONNX session),
    inputs (each 1 x C x H x W) and occlusion settings."""

    name: str
    forwards: ModelForwards
    images: list[torch.Tensor]
    window: int
    stride: int
    batch_sizes: tuple[int, ...]
    note: str = ""
    held_out: int = 0  # held-out images of the adaptive Spearman figure (0: the timed ones)

    @property
    def served(self) -> ServedModel:
        return self.forwards.served


@dataclass
class Row:
    method: str
    backend: str
    passes: int
    seconds: float
    forward_seconds: float | None = None
    extra: str = ""
    gradient_seconds: float = 0.0  # APEM's torch gradients (not forward-only), timed aside
    gradients: int = 1  # torch gradient passes per image in ``passes``


class Calls:
    """Wraps a forward, counting its calls (the rounds of the APEM searches)."""

    def __init__(self, forward: Callable[[torch.Tensor, str], torch.Tensor]) -> None:
        self.forward, self.calls = forward, 0

    def __call__(self, x: torch.Tensor, stage: str) -> torch.Tensor:
        self.calls += 1
        return self.forward(x, stage)


@dataclass
class Report:
    net: Net
    best: dict[str, tuple[float, int]] = field(default_factory=dict)  # backend -> (img/s, B)
    probes: dict[str, tuple[float, float]] = field(default_factory=dict)  # before, after
    rows: list[Row] = field(default_factory=list)


# ------------------------------------------------------------------------------ networks


def demo_net(directory: Path, images: int, config: ForwardConfig, held_out: int = 0) -> Net:
    served = load_model_dir(ensure_demo_model(directory))
    xs = [
        torch.from_numpy(synthetic.make_sample(synthetic.TEST_SEED, i).image)[None]
        for i in range(images)
    ]
    return Net(
        "demo",
        prepare_forwards(served, config),
        xs,
        8,
        4,
        (16, 64, 128, 256),
        f"trained, {images} held-out images",
        held_out,
    )


def resnet_net(name: str, window: int, stride: int, config: ForwardConfig) -> Net:
    torch.manual_seed(0)
    net = getattr(resnets, name)(num_classes=1000).eval()
    model_config = ModelConfig(
        name=name,
        version="1",
        model_file="",
        model_class=name,
        model_kwargs={},
        weights="",
        input_shape=(3, 224, 224),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        labels=tuple(str(i) for i in range(1000)),
        cam_layer=resnets.RESNET_CAM_LAYER,
    )
    module = PixelSpaceModel(net, model_config.mean, model_config.std).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    served = ServedModel(model_config, module, net.get_submodule(model_config.cam_layer), Path("."))
    image = torch.from_numpy(synthetic.make_sample(synthetic.TEST_SEED, 0, 224).image)[None]
    sizes = (1, 4, 8, 16, 32) if name == "resnet18" else (1, 4, 8, 16)
    return Net(
        name,
        prepare_forwards(served, config),
        [image],
        window,
        stride,
        sizes,
        "random weights, 1 image",
    )


# ---------------------------------------------------------------------------- measuring


def images_per_second(
    run: Callable[[torch.Tensor], object], x: torch.Tensor, min_seconds: float
) -> float:
    run(x)  # warm-up
    calls, start = 0, time.perf_counter()
    while True:
        run(x)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and calls >= 2:
            return calls * x.shape[0] / elapsed


def best_throughput(net: Net, min_seconds: float) -> dict[str, tuple[float, int]]:
    """backend -> (best images/s, its batch size)."""
    shape = net.served.config.input_shape
    session, module = net.forwards.session, net.served.module

    def torch_run(x: torch.Tensor) -> object:
        with torch.no_grad():
            return module(x)

    def ort_run(x: torch.Tensor) -> object:
        return session.run(["logits"], {"x": x.numpy()})

    best: dict[str, tuple[float, int]] = {}
    for backend, run in (("torch", torch_run), ("onnxruntime", ort_run)):
        rates = {}
        for size in net.batch_sizes:
            x = torch.rand(size, *shape, generator=torch.Generator().manual_seed(size))
            rates[size] = images_per_second(run, x, min_seconds)
        size = max(rates, key=rates.get)
        best[backend] = (rates[size], size)
        shown = ", ".join(f"B={b}: {r:.1f}" for b, r in rates.items())
        log.info("%s %s throughput (images/s): %s", net.name, backend, shown)
    return best


def context(net: Net, backend: str, incremental: bool = False) -> MethodContext:
    """A context on ``backend``; occlusion incremental only when asked (the server's
    default is on: the benchmark shows both)."""
    budget = Budget(10**9)
    forward = net.forwards.forward(budget, backend)
    if not incremental:
        forward.occluders = None
    return MethodContext(net.served, forward, budget, 64)


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def captum_occlusion(net: Net, x: torch.Tensor, y: int, per_eval: int) -> tuple[int, float]:
    from captum.attr import Occlusion as CaptumOcclusion

    passes = [0]
    module = net.served.module

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        passes[0] += inputs.shape[0]
        return module(inputs)

    c, w, s = x.shape[1], net.window, net.stride
    with torch.no_grad():
        _, seconds = timed(
            lambda: CaptumOcclusion(forward).attribute(
                x,
                sliding_window_shapes=(c, w, w),
                strides=(c, s, s),
                baselines=0.5,
                target=y,
                perturbations_per_eval=per_eval,
            )
        )
    return passes[0], seconds


def held_out_correlations(net: Net, full: dict, adaptive: dict) -> list[float]:
    """Spearman rank correlation of adaptive with full occlusion (ONNX Runtime, the
    server's defaults) on each of the first ``net.held_out`` held-out demo images
    (``synthetic.TEST_SEED``): the data set of the adaptive target, larger than the few
    timed images."""
    occlusion, correlations = Occlusion(), []
    for i in range(net.held_out):
        x = torch.from_numpy(synthetic.make_sample(synthetic.TEST_SEED, i).image)[None]
        target = net.forwards.forward(Budget(10), "onnxruntime")(x, "predict").argmax(1)
        maps = [
            occlusion.attribute(context(net, "onnxruntime", incremental=True), x, target, params)[
                0, 0
            ]
            for params in (full, adaptive)
        ]
        correlations.append(rank_correlation(*maps))
    return correlations


def head_seconds(
    occluder: IncrementalOcclusion, x: torch.Tensor, windows: int, batch: int
) -> float:
    """The time of the incremental plan's head (the layers after its last cut, which run on
    whole activations) for ``windows`` occluded copies of x in batches of ``batch``: the
    part of incremental occlusion no crop makes smaller (the original's activations stand
    in for the occluded ones; the arithmetic is the same)."""
    activations, _ = occluder.original(x)
    head = occluder.runners[-1]
    inputs = np.repeat(activations[-1], batch, axis=0)
    sizes = [min(batch, windows - start) for start in range(0, windows, batch)]
    return sum(timed(lambda: head(inputs[:size]))[1] for size in sizes)


def run_net(net: Net, min_seconds: float, repeats: int = 1) -> Report:
    report = Report(net)
    before = best_throughput(net, min_seconds)
    per_eval = before["torch"][1]
    occlusion = Occlusion()
    shape = net.served.config.input_shape
    full_params = occlusion.resolve_params(
        {"window": net.window, "stride": net.stride}, shape, "occlusion"
    )
    adaptive_params = occlusion.resolve_params(
        {"window": net.window, "stride": net.stride, "adaptive": {"enabled": True}},
        shape,
        "occlusion",
    )
    totals: dict[tuple[str, str], list[float]] = {}
    correlations: list[float] = []
    eps_agree, same_records = [], []
    forward_calls = {ONE_BY_ONE: 0, TOGETHER: 0}  # over every repeat
    masks: dict[str, int | None] = {}
    plans, map_difference = {}, {}
    axes = [window_starts(side, net.window, net.stride) for side in shape[1:]]
    for backend in ("torch", "onnxruntime"):  # built once per model and window, then cached
        occluder, seconds = timed(lambda: net.forwards.occluder(backend, net.window, axes))
        plans[backend] = (occluder, seconds)

    def add(
        method: str,
        backend: str,
        passes: int,
        seconds: float,
        ctx: MethodContext | None = None,
        gradient: float = 0.0,
        forward_seconds: float | None = None,
    ) -> None:
        entry = totals.setdefault((method, backend, repeat), [0, 0.0, 0.0, 0.0])
        entry[0] += passes
        entry[1] += seconds
        if forward_seconds is None:
            forward_seconds = ctx.forward.seconds if ctx is not None else math.nan
        entry[2] += forward_seconds
        entry[3] += gradient

    def gradient_seconds(x: torch.Tensor, y: int) -> float:
        """The time of APEM's one torch gradient for x (best of 2, right after the
        method: the same machine state)."""
        return min(
            timed(lambda: gradient_sign_and_logits(net.served.module, x[0], y, Budget(10), "apem"))[
                1
            ]
            for _ in range(2)
        )

    # round robin: each method's best repeat counts (add() files each entry under `repeat`)
    for repeat in range(repeats):  # noqa: B007
        for x in net.images:
            y = int(net.forwards.forward(Budget(10), "onnxruntime")(x, "predict").argmax())
            target = torch.tensor([y])
            passes, seconds = captum_occlusion(net, x, y, per_eval)
            add(f"Captum Occlusion (ppe={per_eval})", "torch", passes, seconds)
            maps = {}
            for incremental in (False, True):
                for backend in ("torch", "onnxruntime"):
                    ctx = context(net, backend, incremental)
                    maps[backend, incremental], seconds = timed(
                        lambda: occlusion.attribute(ctx, x, target, full_params)
                    )
                    name = "occlusion incremental" if incremental else "occlusion"
                    add(name, backend, ctx.budget.spent, seconds, ctx)
                    difference = (maps[backend, incremental] - maps["torch", False]).abs().max()
                    map_difference[name] = max(map_difference.get(name, 0.0), float(difference))
            ctx = context(net, "onnxruntime", incremental=True)
            adaptive, seconds = timed(lambda: occlusion.attribute(ctx, x, target, adaptive_params))
            add("occlusion adaptive", "onnxruntime", ctx.budget.spent, seconds, ctx)
            correlations.append(rank_correlation(maps["onnxruntime", False][0, 0], adaptive[0, 0]))

            relevance = relevance_from_map(
                apply_stage(maps["onnxruntime", False], x, "one_channel")[0]
            )
            records = {}
            for backend in ("torch", "onnxruntime"):
                ctx = context(net, backend)
                records[backend], seconds = timed(
                    lambda: apem(Probe.of(ctx.forward, ctx.model, x[0], y, ctx.budget), relevance)
                )
                add("APEM per map", backend, ctx.budget.spent, seconds, ctx, gradient_seconds(x, y))
            a, b = records["torch"], records["onnxruntime"]
            eps_agree.append((a.eps_minus, a.eps_plus) == (b.eps_minus, b.eps_plus))

            # a request's maps: their APEMs one by one (each its own gradient and rounds)
            # and together (the engine: one gradient, every map's searches in one call)
            maps = [relevance, relevance_from_map(apply_stage(adaptive, x, "one_channel")[0])]
            for name in ("saliency", "grad_cam"):
                method = get_method(name)
                params = method.resolve_params({}, shape, name)
                raw = method.attribute(context(net, "torch"), x, target, params)
                maps.append(relevance_from_map(apply_stage(raw, x, "one_channel")[0]))
            ctx = context(net, "onnxruntime")
            counted = Calls(ctx.forward)
            alone, seconds = timed(
                lambda: [apem(Probe.of(counted, ctx.model, x[0], y, ctx.budget), r) for r in maps]
            )
            add(
                ONE_BY_ONE,
                "onnxruntime",
                ctx.budget.spent,
                seconds,
                ctx,
                len(maps) * gradient_seconds(x, y),
            )
            forward_calls[ONE_BY_ONE] += counted.calls
            ctx = context(net, "onnxruntime")
            counted = Calls(ctx.forward)
            together, seconds = timed(
                lambda: apem_many(
                    Probe.of(counted, ctx.model, x[0], y, ctx.budget),
                    maps,
                    [default_options(x[0].numel())] * len(maps),
                )
            )
            add(TOGETHER, "onnxruntime", ctx.budget.spent, seconds, ctx, gradient_seconds(x, y))
            forward_calls[TOGETHER] += counted.calls
            same_records.append(
                all(
                    (t.record.eps_minus, t.record.eps_plus) == (a.eps_minus, a.eps_plus)
                    for t, a in zip(together, alone, strict=True)
                )
            )
            if net.name == "demo":
                for backend in ("torch", "onnxruntime"):
                    ctx = context(net, backend)
                    _, seconds = timed(
                        lambda: filter_map(
                            Probe.of(ctx.forward, ctx.model, x[0], y, ctx.budget),
                            relevance,
                            default_options(x[0].numel()),
                            default_filter_options("fast"),
                        )
                    )
                    add(
                        "APEM filter (fast)",
                        backend,
                        ctx.budget.spent,
                        seconds,
                        ctx,
                        gradient_seconds(x, y),
                    )
            if net.name in MASKING_NETS:  # forward-only over masks, default options
                for name in MASKING_ROWS:
                    method = get_method(name)
                    params = method.resolve_params({}, shape, name)
                    masks[name] = params.get("masks")
                    ctx = context(net, "onnxruntime")
                    _, seconds = timed(lambda: method.attribute(ctx, x, target, params))
                    add(MASKING_ROWS[name], "onnxruntime", ctx.budget.spent, seconds, ctx)

    if net.held_out:
        correlations = held_out_correlations(net, full_params, adaptive_params)
    windows = math.prod(len(a) for a in axes)
    heads = {  # the layers after the last cut, for every window of every timed image
        backend: len(net.images)
        * head_seconds(occluder, net.images[0], windows, net.forwards.batch_size)
        for backend, (occluder, _) in plans.items()
        if occluder is not None
    }
    captum = next(m for m, _, _ in totals if m.startswith("Captum"))
    after = best_throughput(net, min_seconds)
    report.best = {b: max(before[b], after[b]) for b in before}
    report.probes = {b: (before[b][0], after[b][0]) for b in before}
    best_repeat: dict[tuple[str, str], list[float]] = {}
    for (method, backend, _), entry in totals.items():
        kept = best_repeat.setdefault((method, backend), entry)
        if entry[1] < kept[1]:
            best_repeat[method, backend] = entry
    for (method, backend), (passes, seconds, forward_seconds, gradient) in best_repeat.items():
        extra = ""
        if method == "occlusion adaptive":
            images = (
                f"{net.held_out} held-out images (not timed)"
                if net.held_out
                else f"the {len(net.images)} timed image(s)"
            )
            extra = (
                f"Spearman vs full {statistics.mean(correlations):.3f} (mean), "
                f"{min(correlations):.3f} (min) over {images}"
            )
        if method == "APEM per map" and backend == "onnxruntime":
            extra = f"same eps as torch on {sum(eps_agree)}/{len(eps_agree)} maps"
        if method == TOGETHER:
            extra = (
                f"same eps as one by one in {sum(same_records)}/{len(same_records)} "
                f"runs; {forward_calls[TOGETHER]} forward calls vs "
                f"{forward_calls[ONE_BY_ONE]} one by one (all repeats)"
            )
        if method == MASKING_ROWS["score_cam"]:
            extra = "one pass per image on torch (the CAM layer's activations)"
        if method == MASKING_ROWS["rise"]:
            extra = f"{masks['rise']} masks per image"
        if method in map_difference:
            extra = f"max |map - torch full map| {map_difference[method]:.1e}"
        if method == "occlusion incremental":
            occluder, build = plans[backend]
            extra += (
                f"; ~{occluder.cost_fraction:.0%} of a full pass per image (a window "
                f"changes {occluder.plan.changed_fraction:.0%}), plan built in {build:.1f} s"
                f"; its head alone {heads[backend]:.2f} s"
                if occluder
                else "; no plan: full passes"
            )
            if repeats > 1:
                ratios = (
                    totals[captum, "torch", r][1] / totals[method, backend, r][1]
                    for r in range(repeats)
                )
                extra += "; vs Captum per repeat " + ", ".join(f"{q:.2f}x" for q in ratios)
        gradients = REQUEST_MAPS if method == ONE_BY_ONE else 1
        report.rows.append(
            Row(method, backend, int(passes), seconds, forward_seconds, extra, gradient, gradients)
        )
    return report


# ----------------------------------------------------------------------------- printing


def print_report(report: Report) -> None:
    net = report.net
    best_rate = max(rate for rate, _ in report.best.values())
    shape = "x".join(map(str, net.served.config.input_shape))
    forwards = net.forwards
    print(
        f"\n== {net.name} ({shape}, {net.note}); occlusion window {net.window}, "
        f"stride {net.stride}; forward batch {forwards.batch_size} "
        f"({forwards.bytes_per_image / 2**20:.1f} MiB/image, budget 1024 MiB); calls of "
        f"at most {forwards.call_batches.get('onnxruntime')} images on onnxruntime (the "
        f"fastest measured at load), {forwards.call_batches['torch']} on torch"
    )
    for backend, (rate, size) in report.best.items():
        first, last = report.probes[backend]
        print(
            f"   best throughput {backend:<11} {rate:8.1f} images/s (batch {size}; "
            f"{first:.1f} before, {last:.1f} after the methods)"
        )
    captum = next(r for r in report.rows if r.method.startswith("Captum"))
    header = (
        f"   {'method':<28} {'backend':<11} {'passes':>7} {'seconds':>9} "
        f"{'vs Captum':>9} {'eff':>5} {'own':>5} {'in fwd':>6}"
    )
    print(header)
    for row in report.rows:
        own_rate = report.best[row.backend][0]
        eff = row.passes / best_rate / row.seconds
        own = row.passes / own_rate / row.seconds
        speed = captum.seconds / row.seconds
        inside = row.forward_seconds
        share = "" if math.isnan(inside) else f"{inside / row.seconds:.0%}"
        extra = row.extra
        if row.gradient_seconds:  # the forward-only part: the searches without the gradient
            searches = (row.passes - row.gradients * len(net.images)) / best_rate
            extra = (
                f"without the torch gradient ({row.gradient_seconds:.2f} s): eff "
                f"{searches / (row.seconds - row.gradient_seconds):.0%}; {extra}"
            )
        print(
            f"   {row.method:<28} {row.backend:<11} {row.passes:>7} {row.seconds:>9.2f} "
            f"{speed:>8.2f}x {eff:>5.0%} {own:>5.0%} {share:>6}  {extra}".rstrip("; ")
        )
    occ = {r.backend: r for r in report.rows if r.method == "occlusion"}
    incremental = {r.backend: r for r in report.rows if r.method == "occlusion incremental"}
    adaptive = next(r for r in report.rows if r.method == "occlusion adaptive")
    print(
        f"   adaptive: {occ['onnxruntime'].passes / adaptive.passes:.2f}x fewer forward "
        f"passes than full occlusion; occlusion onnxruntime vs torch: "
        f"{occ['torch'].seconds / occ['onnxruntime'].seconds:.2f}x; incremental vs full "
        f"passes: torch {occ['torch'].seconds / incremental['torch'].seconds:.2f}x, "
        f"onnxruntime {occ['onnxruntime'].seconds / incremental['onnxruntime'].seconds:.2f}x"
    )
    rows = {r.method: r for r in report.rows}
    print(
        f"   APEM of {REQUEST_MAPS} maps together vs one by one: "
        f"{rows[ONE_BY_ONE].seconds / rows[TOGETHER].seconds:.2f}x faster, "
        f"{rows[ONE_BY_ONE].passes - rows[TOGETHER].passes} fewer forward passes"
    )


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) CPU ticks since boot from /proc/stat, or None where there is none."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields]
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks)


def steal_share(start: tuple[int, int] | None) -> str:
    """The share of CPU time stolen by the hypervisor since ``start``."""
    end = cpu_times()
    if start is None or end is None or end[1] == start[1]:
        return "n/a"
    return f"{(end[0] - start[0]) / (end[1] - start[1]):.0%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nets", default=",".join(NETS), help=f"comma-separated subset of {', '.join(NETS)}"
    )
    parser.add_argument(
        "--demo-dir",
        type=Path,
        default=ROOT / "var" / "models" / "demo",
        help="the demo model directory (trained there first if missing)",
    )
    parser.add_argument("--demo-images", type=int, default=8)
    parser.add_argument(
        "--held-out",
        type=int,
        default=100,
        help="held-out demo images of the adaptive Spearman figure (0: the timed images)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads and ONNX Runtime intra-op threads (0: defaults)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of every method, in turn; each method's fastest counts",
    )
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=1.5,
        help="time per throughput measurement (per batch size)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = set(names) - set(NETS)
    if unknown:
        parser.error(f"unknown nets {sorted(unknown)}")
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ForwardConfig(onnx_threads=args.threads)
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
        f"intra-op threads {args.threads or 'default'}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    builders = {
        "demo": lambda: demo_net(args.demo_dir, args.demo_images, config, args.held_out),
        "resnet18": lambda: resnet_net("resnet18", 15, 8, config),
        "resnet50": lambda: resnet_net("resnet50", 31, 16, config),
    }
    for name in names:
        net = builders[name]()
        if net.forwards.session is None:
            print(f"{name}: no ONNX Runtime forward: {net.forwards.onnx_status}")
            continue
        ticks = cpu_times()
        print_report(run_net(net, args.min_seconds, args.repeats))
        print(f"   CPU time stolen by the hypervisor during {name}: {steal_share(ticks)}")
        sys.stdout.flush()
    print(
        f"\nload average {os.getloadavg()[0]:.2f} at the end; total "
        f"{time.perf_counter() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
