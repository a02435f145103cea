"""APEM's eps search and filter records checked against independent references.

    python bench/apem_search.py [--images 50] [--methods saliency,grad_cam,...]
                                [--resnet-images 6] [--cache FILE] [--no-filter]

For every map (held-out demo images x methods, one-channel stage, explained class = the
predicted one) it runs, on the demo model's ONNX Runtime forward (one thread):

- the served search (``apem``): eps_minus and eps_plus, censored flags, forward passes and
  forward calls per map (the gradient's pass left out);
- a dense reference scan (``support.apem_reference.dense_first_flip``): every value of a
  1% relative grid from eps_max x 1e-6 to eps_max up to the first that flips. A search
  agrees when both find no flip, or both flip and |eps / eps_dense - 1| <= resolution;
- the filter (``filter_map``, defaults) and an independent recomputation of the returned
  map's APEM by ``apem``: ``apem_after`` must lie within resolution x (eps_plus +
  eps_minus) of it, and the returned map's APEM must not be below the original's by more
  than resolution x (eps_plus of the original + eps_minus of the result).

The dense scans do not depend on the search, so ``--cache`` keeps them in a JSON file and a
second run (another commit's ``src`` on PYTHONPATH, e.g. ``git archive HEAD~1 src``) reuses
them. A ResNet-18-shaped network (``tests/support/resnets.py``, width 16, random weights,
3 x 64 x 64, torch) adds forward passes per search on a deeper network.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.apem_reference import CountingForward, dense_first_flip, dense_grid
from support.resnets import resnet18_served
from support.tiny_models import make_context
from xaiserve.engine.postprocess import apply_stage
from xaiserve.methods.registry import get_method
from xaiserve.model_store.build_demo import ensure_demo_model
from xaiserve.model_store.synthetic import TEST_SEED, make_sample
from xaiserve.reliability.apem import apem
from xaiserve.reliability.filter import filter_map
from xaiserve.reliability.options import default_options
from xaiserve.reliability.probe import Probe, gradient_sign_and_logits
from xaiserve.reliability.score import directed, irrelevance, relevance_from_map
from xaiserve.runtime.forward.backends import OnnxForward
from xaiserve.runtime.forward.counted import Budget, TorchForward
from xaiserve.runtime.forward.onnx_export import new_session
from xaiserve.runtime.model import ServedModel, load_model_dir

METHODS = "saliency,grad_cam,input_x_gradient,guided_backprop"
RESNET_METHODS = "saliency,grad_cam"
EPSILON = 1e-9  # float slack on relative comparisons


@dataclass
class Tally:
    """Counts over one model's maps."""

    maps: int = 0
    agree_maps: int = 0
    agree_searches: int = 0
    censored_where_dense_flips: int = 0
    censored: int = 0
    dense_censored: int = 0
    passes: list[int] | None = None
    calls: list[int] | None = None
    filtered: int = 0
    filter_agree: int = 0
    filter_drops: int = 0
    filter_passes: list[int] | None = None
    seconds_search: float = 0.0

    def __post_init__(self) -> None:
        self.passes, self.calls, self.filter_passes = [], [], []


def resnet_served() -> ServedModel:
    """The ResNet-18-shaped network at 3 x 64 x 64, width 16, 10 classes, random weights."""
    return resnet18_served(64, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def relevance_of(served: ServedModel, method: str, x: torch.Tensor, y: int) -> torch.Tensor:
    ctx = make_context(served)
    m = get_method(method)
    params = m.resolve_params({}, served.config.input_shape, method)
    raw = m.attribute(ctx, x[None], torch.tensor([y]), params)
    return relevance_from_map(apply_stage(raw, x[None], "one_channel")[0].detach())


def agrees(eps: float, censored: bool, dense: float | None, resolution: float) -> bool:
    if dense is None:
        return censored
    return not censored and abs(eps / dense - 1.0) <= resolution + EPSILON


def run_model(
    name: str,
    served: ServedModel,
    make_forward,
    images: list[torch.Tensor],
    methods: list[str],
    cache: dict[str, float | None],
    with_filter: bool,
) -> Tally:
    tally = Tally()
    shape = served.config.input_shape
    options = default_options(int(torch.Size(shape).numel()))
    grid = dense_grid(options.eps_max)
    for i, x in enumerate(images):
        with torch.no_grad():
            y = int(served.module(x[None]).argmax())
        sign = gradient_sign_and_logits(served.module, x, y, Budget(10), "apem")[0]
        for method in methods:
            relevance = relevance_of(served, method, x, y)
            budget = Budget(10**9)
            counting = CountingForward(make_forward(budget))
            t0 = time.perf_counter()
            record = apem(Probe.of(counting, served.module, x, y, budget), relevance, options)
            tally.seconds_search += time.perf_counter() - t0
            if record.undefined_reason:
                continue
            tally.maps += 1
            tally.passes.append((record.forward_passes - 1) / 2)  # the gradient left out
            tally.calls.append(counting.calls)  # both searches share the calls
            both = True
            pairs = (
                ("minus", relevance, record.eps_minus, record.eps_minus_censored),
                ("plus", irrelevance(relevance), record.eps_plus, record.eps_plus_censored),
            )
            for side, r, eps, censored in pairs:
                key = f"{name}/{i}/{method}/{side}"
                if key not in cache:
                    forward = make_forward(Budget(10**9))
                    cache[key] = dense_first_flip(forward, x, directed(r, sign), y, grid)
                dense = cache[key]
                ok = agrees(eps, censored, dense, options.resolution)
                tally.agree_searches += ok
                tally.censored += censored
                tally.dense_censored += dense is None
                tally.censored_where_dense_flips += censored and dense is not None
                both = both and ok
            tally.agree_maps += both
            if with_filter:
                check_filter(served, make_forward, x, y, relevance, record, options, tally)
    return tally


def check_filter(served, make_forward, x, y, relevance, record, options, tally: Tally) -> None:
    """The filter's record against ``apem`` of the map it returned."""
    budget = Budget(10**9)
    result = filter_map(Probe.of(make_forward(budget), served.module, x, y, budget), relevance)
    budget = Budget(10**9)
    probe = Probe.of(make_forward(budget), served.module, x, y, budget)
    after = apem(probe, torch.from_numpy(result.map), options)
    res = options.resolution
    tally.filtered += 1
    tally.filter_passes.append(result.forward_passes)
    tolerance = res * (after.eps_plus + after.eps_minus) * (1 + EPSILON)
    tally.filter_agree += abs(result.apem_after - after.apem) <= tolerance
    drop = res * (record.eps_plus + after.eps_minus) * (1 + EPSILON)
    tally.filter_drops += after.apem < record.apem - drop


def report(name: str, tally: Tally, methods: list[str], images: int, with_filter: bool) -> None:
    n = tally.maps
    print(f"\n{name}: {images} images x {len(methods)} methods ({','.join(methods)}): {n} maps")
    print(
        f"  agreement with the dense scan: maps {tally.agree_maps}/{n} "
        f"({tally.agree_maps / max(n, 1):.2%}), searches {tally.agree_searches}/{2 * n}"
    )
    print(
        f"  censored: reported {tally.censored}, dense scan finds no flip {tally.dense_censored}"
        f", reported censored where the dense scan flips {tally.censored_where_dense_flips}"
    )
    if n:
        print(
            f"  forward passes per search: mean {statistics.mean(tally.passes):.1f}, max "
            f"{max(tally.passes):.0f}; forward calls per map (its two searches share "
            f"them): mean {statistics.mean(tally.calls):.2f}, max {max(tally.calls):.0f}; "
            f"search time {1e3 * tally.seconds_search / n:.1f} ms per map"
        )
    if with_filter and tally.filtered:
        print(
            f"  filter: apem_after within tolerance of the recomputation "
            f"{tally.filter_agree}/{tally.filtered}; drops beyond tolerance "
            f"{tally.filter_drops}/{tally.filtered}; forward passes per filter mean "
            f"{statistics.mean(tally.filter_passes):.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--resnet-images", type=int, default=6)
    parser.add_argument("--resnet-methods", default=RESNET_METHODS)
    parser.add_argument("--demo-dir", type=Path, default=Path("var/models/demo"))
    parser.add_argument("--cache", type=Path, help="JSON file of dense scans, read and written")
    parser.add_argument("--no-filter", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache: dict[str, float | None] = {}
    if args.cache and args.cache.is_file():
        cache = json.loads(args.cache.read_text())
    start = time.perf_counter()
    demo = load_model_dir(ensure_demo_model(args.demo_dir))
    session = new_session(demo.directory / "model.onnx", threads=1)

    def onnx(budget: Budget) -> OnnxForward:
        return OnnxForward(session, budget, 512)

    print(
        f"APEM search and filter vs independent references; load average before "
        f"{os.getloadavg()[0]:.2f}"
    )
    methods = args.methods.split(",")
    demo_images = [torch.from_numpy(make_sample(TEST_SEED, i).image) for i in range(args.images)]
    tally = run_model("demo", demo, onnx, demo_images, methods, cache, not args.no_filter)
    report("demo (ONNX Runtime)", tally, methods, args.images, not args.no_filter)
    if args.resnet_images:
        resnet = resnet_served()
        rmethods = args.resnet_methods.split(",")
        images = demo_images[: args.resnet_images]

        def torch_forward(budget: Budget) -> TorchForward:
            return TorchForward(resnet.module, budget, 256)

        rtally = run_model("resnet18", resnet, torch_forward, images, rmethods, cache, False)
        report("ResNet-18-shaped, width 16 (torch)", rtally, rmethods, len(images), False)
    if args.cache:
        args.cache.write_text(json.dumps(cache))
    print(
        f"\nwall clock {time.perf_counter() - start:.0f} s; load average after "
        f"{os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
