"""APEM of the seed's visualization stages on held-out demo images (seed 004, section 4.4,
table 4.4): does each simplification lower APEM, image by image?

    python bench/stage_order.py [--n 100] [--methods saliency,smoothgrad,lrp]
        [--model-store var/models] [--stages raw,three_channel,one_channel,times_image]

For every held-out demo image the model classifies correctly (as the seed's table 4.4
uses), one engine call asks for every method at every stage with an APEM record (the
explained class is the prediction). Per method and pair of stages it prints how often the
first stage's APEM is higher, equal and lower, over the images where neither of the two
records is censored or undefined, and how many pairs a censored search left out; then the
mean and median APEM per stage over uncensored records (table 4.4's layout).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch

from xaiserve.api.types import ExplainRequest, MethodRequest, RawTensor, ReliabilityRequest
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.model_store.build_demo import ensure_demo_model
from xaiserve.model_store.synthetic import TEST_SEED, make_sample

SEED_STAGES = ("three_channel", "one_channel", "times_image")


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="held-out images drawn (default 100)")
    parser.add_argument("--methods", type=_names, default=["saliency", "smoothgrad", "lrp"])
    parser.add_argument("--stages", type=_names, default=["raw", *SEED_STAGES])
    parser.add_argument("--resolution", type=float, default=0.01)
    parser.add_argument("--model-store", type=Path, default=Path("var/models"))
    args = parser.parse_args()

    ensure_demo_model(args.model_store / "demo")
    engine = Engine.from_model_store(args.model_store, EngineLimits(max_methods=64))
    served = engine.models["demo"]
    reliability = ReliabilityRequest(resolution=args.resolution)
    cells = [(m, s) for m in args.methods for s in args.stages]
    methods = tuple(
        MethodRequest(m, stage=s, reliability=reliability, field=f"methods[{i}]")
        for i, (m, s) in enumerate(cells)
    )
    apem: dict[tuple[str, str], list[float | None]] = {cell: [] for cell in cells}
    used = 0
    t0 = time.perf_counter()
    for i in range(args.n):
        sample = make_sample(TEST_SEED, i)
        with torch.no_grad():
            predicted = int(served.module(torch.from_numpy(sample.image)[None]).argmax())
        if predicted != sample.label:
            continue
        used += 1
        raw = RawTensor(tuple(sample.image.shape), sample.image.astype("<f4").tobytes())
        result = engine.explain(ExplainRequest(model="demo", image=raw, methods=methods))
        for cell, explanation in zip(cells, result.explanations, strict=True):
            record = explanation.reliability
            ok = (
                record is not None
                and not record.undefined_reason
                and not (record.eps_minus_censored or record.eps_plus_censored)
            )
            apem[cell].append(record.apem if ok and record is not None else None)
    seconds = time.perf_counter() - t0
    print(f"{used} of {args.n} held-out images classified correctly; {seconds:.0f} s\n")
    print("| method | stages | first higher | equal | first lower | left out (censored) |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        for a, b in itertools.combinations(args.stages, 2):
            pairs = [
                (x, y)
                for x, y in zip(apem[method, a], apem[method, b], strict=True)
                if x is not None and y is not None
            ]
            higher = sum(x > y for x, y in pairs)
            equal = sum(x == y for x, y in pairs)
            n = len(pairs)
            share = f"{higher}/{n} ({higher / n:.0%})" if n else "-"
            lower = n - higher - equal
            print(f"| {method} | {a} > {b} | {share} | {equal} | {lower} | {used - n} |")
    print("\n| method | " + " | ".join(f"{s} mean / median (n)" for s in args.stages) + " |")
    print("|---|" + "---|" * len(args.stages))
    for method in args.methods:
        parts = []
        for stage in args.stages:
            values = [v for v in apem[method, stage] if v is not None]
            parts.append(
                f"{statistics.fmean(values):.1f} / {statistics.median(values):.1f} ({len(values)})"
                if values
                else "-"
            )
        print(f"| {method} | " + " | ".join(parts) + " |")


if __name__ == "__main__":
    main()
