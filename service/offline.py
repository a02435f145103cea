"""Offline commands of the ``xaiserve`` tool that run the engine in-process (no server):
``xaiserve evaluate`` scores methods by APEM over a data set (seed 004's tables).

    xaiserve evaluate --model demo --data demo --n 500 --out var/eval
    xaiserve evaluate --model mynet --data images/ --methods saliency,grad_cam
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from xaiserve.handlers.engine import Engine
from xaiserve.handlers.errors import ModelLoadError, XaiError
from xaiserve.handlers.evaluation import EvalImage, evaluate_images
from xaiserve.handlers.evaluation_report import format_table, write_report
from xaiserve.handlers.evaluation_tables import ranking
from xaiserve.handlers.limits import EngineLimits
from xaiserve.handlers.methods.registry import METHODS
from xaiserve.handlers.model import ModelConfig
from xaiserve.handlers.preprocess import decode_image
from xaiserve.handlers.types import STAGES, EncodedImage

DEFAULT_METHODS = ("saliency", "smoothgrad", "lrp", "integrated_gradients", "grad_cam", "occlusion")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def demo_images(n: int, offset: int = 0) -> Iterator[EvalImage]:
    """Held-out images of the demo data set, with labels and object masks."""
    from xaiserve.model_store.synthetic import TEST_SEED, make_sample

    for i in range(offset, offset + n):
        sample = make_sample(TEST_SEED, i)
        yield EvalImage(f"demo-{i}", sample.image, sample.label, sample.mask)


def folder_images(root: Path, cfg: ModelConfig, limits: EngineLimits, n: int) -> Iterator[EvalImage]:
    """Images under ``root`` (sorted); a parent folder named like a label gives the label."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for path in files[:n]:
        x = decode_image(EncodedImage(path.read_bytes()), cfg, limits)[0].numpy()
        label = cfg.labels.index(path.parent.name) if path.parent.name in cfg.labels else None
        yield EvalImage(str(path.relative_to(root)), x, label)


def load_engine(model_store: Path, model: str, limits: EngineLimits) -> Engine:
    """The engine over ``model_store``; the demo model is built there first if missing."""
    if model == "demo" and not (model_store / "demo" / "config.yaml").exists():
        from xaiserve.model_store.build_demo import ensure_demo_model

        ensure_demo_model(model_store / "demo", progress=True)
    return Engine.from_model_store(model_store, limits)


def _names(text: str) -> list[str]:
    if text == "all":
        return [n for n, cls in METHODS.items() if not cls.composite]
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    return names


def _stages(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(n not in STAGES for n in names):
        raise argparse.ArgumentTypeError(f"stages are {', '.join(STAGES)}")
    return names


def configure_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help="model name in the store (default demo)")
    parser.add_argument("--model-store", type=Path, default=Path("var/models"),
                        help="directory of model directories (default var/models)")
    parser.add_argument("--data", default="demo",
                        help="'demo' (the held-out synthetic set) or an image folder")
    parser.add_argument("--n", type=int, default=100, help="number of images (default 100)")
    parser.add_argument("--methods", type=_names, default=list(DEFAULT_METHODS),
                        help="comma-separated methods, or 'all' (default: %(default)s)")
    parser.add_argument("--stages", type=_stages, default=list(STAGES),
                        help="comma-separated visualization stages (default: all three)")
    parser.add_argument("--shuffles", type=int, default=4,
                        help="shuffled maps for APEM_norm (default 4)")
    parser.add_argument("--resolution", type=float, default=0.01,
                        help="relative resolution of the eps searches (default 0.01)")
    parser.add_argument("--out", type=Path, default=Path("var/eval"),
                        help="output folder for CSV tables and PNG plots (default var/eval)")


def run_evaluate(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    limits = EngineLimits(max_methods=len(args.methods) * len(args.stages),
                          max_forward_passes=10**9)
    try:
        engine = load_engine(args.model_store, args.model, limits)
        if args.model not in engine.models:
            print(f"xaiserve: model {args.model!r} not in {args.model_store}", file=sys.stderr)
            return 2
        cfg = engine.models[args.model].config
        if args.data == "demo":
            images = demo_images(args.n)
        else:
            images = folder_images(Path(args.data), cfg, limits, args.n)
        rows = evaluate_images(
            engine, args.model, images, args.methods, args.stages,
            shuffles=args.shuffles, resolution=args.resolution,
            progress=lambda it: tqdm(it, total=args.n, desc="evaluate", unit="image"),
        )
    except (ModelLoadError, XaiError) as err:
        print(f"xaiserve: {err}", file=sys.stderr)
        return 2
    written = write_report(args.out, rows)
    for stage in args.stages:
        print(f"\nAPEM ranking, stage {stage}:")
        print(format_table(ranking(rows, stage), ["rank", "method", "maps", "apem_mean",
                                                   "apem_median", "apem_norm_median",
                                                   "mask_mass_mean", "seconds_per_map"]))
    print(f"\n{len(rows)} maps; tables and plots in {args.out}/ ({len(written)} files)")
    return 0
