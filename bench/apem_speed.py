"""APEM per map and the fast filter, side by side with the seed's step-by-step search and
the exact filter (Algorithm 2) on the same inputs, in one run.

    python bench/apem_speed.py [--maps 8] [--demo-dir var/models/demo]

APEM: saliency maps (one-channel stage) of held-out demo images (3 x 64 x 64), and of random
images for the tiny 3 x 16 x 16 test model; the seed's scan runs at step = resolution x eps
(the same relative resolution, 1%) for both directions. The batched search takes two
forward calls per map (``reliability/search.py``). Filter: the tiny model at 12 x 12,
where the exact algorithm is feasible. Prints mean time per map, forward calls, forward
passes (images) and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.apem_reference import CountingForward, loss_gradient_sign, probe_of, reference_search
from support.tiny_models import make_context, tiny_served
from xaiserve.engine.postprocess import apply_stage
from xaiserve.methods.registry import get_method
from xaiserve.model_store.build_demo import ensure_demo_model
from xaiserve.model_store.synthetic import TEST_SEED, make_sample
from xaiserve.reliability.apem import apem
from xaiserve.reliability.filter import filter_exact, filter_fast
from xaiserve.reliability.score import directed, irrelevance
from xaiserve.runtime.model import load_model_dir

RES = 0.01


def saliency(served, x: torch.Tensor, y: int) -> torch.Tensor:
    ctx = make_context(served)
    raw = get_method("saliency").attribute(ctx, x[None], torch.tensor([y]), {})
    return apply_stage(raw, x[None], "one_channel")[0]


def apem_rows(served, images: list[torch.Tensor]) -> dict[str, float]:
    t_fast = t_scan = 0.0
    calls_fast = calls_scan = images_fast = images_scan = 0
    for x in images:
        ctx = make_context(served, max_batch=64)
        with torch.no_grad():
            y = int(served.module(x[None]).argmax())
        relevance = saliency(served, x, y)
        fast = CountingForward(ctx.forward)
        t0 = time.perf_counter()
        record = apem(probe_of(fast, served.module, x, y, ctx.budget), relevance)
        t_fast += time.perf_counter() - t0
        scan = CountingForward(ctx.forward)
        t0 = time.perf_counter()
        sign = loss_gradient_sign(served.module, x, y, ctx.budget)
        for r, eps in ((relevance, record.eps_minus), (irrelevance(relevance), record.eps_plus)):
            reference_search(scan, x, directed(r, sign), y, eps_max=x.numel(), step=RES * eps)
        t_scan += time.perf_counter() - t0
        calls_fast, calls_scan = calls_fast + fast.calls, calls_scan + scan.calls
        images_fast, images_scan = images_fast + fast.images, images_scan + scan.images
    n = len(images)
    return {
        "ms_fast": 1e3 * t_fast / n,
        "ms_scan": 1e3 * t_scan / n,
        "calls_fast": calls_fast / n,
        "calls_scan": calls_scan / n,
        "images_fast": images_fast / n,
        "images_scan": images_scan / n,
    }


def filter_rows(maps: int) -> dict[str, float]:
    served = tiny_served()
    g = torch.Generator().manual_seed(3)
    t_fast = t_exact = 0.0
    passes_fast = passes_exact = 0
    ious = []
    for _ in range(maps):
        ctx = make_context(served, max_batch=64)
        x = torch.rand(3, 12, 12, generator=g)
        with torch.no_grad():
            y = int(served.module(x[None]).argmax())
        relevance = saliency(served, x, y)
        t0 = time.perf_counter()
        exact = filter_exact(probe_of(ctx.forward, served.module, x, y, ctx.budget), relevance)
        t_exact += time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = filter_fast(probe_of(ctx.forward, served.module, x, y, ctx.budget), relevance)
        t_fast += time.perf_counter() - t0
        passes_fast, passes_exact = (
            passes_fast + fast.forward_passes,
            passes_exact + exact.forward_passes,
        )
        a, b = fast.map > 0, exact.map > 0
        ious.append(float((a & b).sum() / max((a | b).sum(), 1)))
    return {
        "ms_fast": 1e3 * t_fast / maps,
        "ms_exact": 1e3 * t_exact / maps,
        "passes_fast": passes_fast / maps,
        "passes_exact": passes_exact / maps,
        "iou_median": statistics.median(ious),
        "iou_min": min(ious),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=8)
    parser.add_argument("--demo-dir", type=Path, default=Path("var/models/demo"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    demo = load_model_dir(ensure_demo_model(args.demo_dir))
    demo_images = [torch.from_numpy(make_sample(TEST_SEED, i).image) for i in range(args.maps)]
    g = torch.Generator().manual_seed(1)
    tiny_images = [torch.rand(3, 16, 16, generator=g) for _ in range(args.maps)]
    print(
        f"APEM per map vs the seed's step-by-step search at {RES:.0%} resolution, "
        f"{args.maps} saliency maps each, torch, 1 thread"
    )
    print(
        f"{'model':14s} {'batched ms':>10s} {'scan ms':>9s} {'ratio':>6s} "
        f"{'calls':>6s} {'scan calls':>10s} {'images':>7s} {'scan images':>11s}"
    )
    for name, served, images in (
        ("demo 64x64", demo, demo_images),
        ("tiny 16x16", tiny_served(), tiny_images),
    ):
        r = apem_rows(served, images)
        print(
            f"{name:14s} {r['ms_fast']:10.1f} {r['ms_scan']:9.1f} "
            f"{r['ms_scan'] / r['ms_fast']:5.1f}x {r['calls_fast']:6.1f} {r['calls_scan']:10.1f} "
            f"{r['images_fast']:7.1f} {r['images_scan']:11.1f}"
        )
    f = filter_rows(args.maps)
    print(
        f"\nfilter, tiny model 12x12, {args.maps} saliency maps: fast {f['ms_fast']:.0f} ms "
        f"vs exact {f['ms_exact']:.0f} ms ({f['ms_exact'] / f['ms_fast']:.1f}x); forward passes "
        f"{f['passes_fast']:.0f} vs {f['passes_exact']:.0f}; IoU(fast, exact) median "
        f"{f['iou_median']:.3f}, min {f['iou_min']:.3f}"
    )


if __name__ == "__main__":
    main()
