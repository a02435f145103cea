"""``xaiserve gad-train``: trains and stores the GAD support models of a class pair
(seed 002)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from xaiserve.api.errors import ModelLoadError, XaiError
from xaiserve.engine.limits import EngineLimits
from xaiserve.offline.cli.common import (
    add_store,
    add_threads,
    demo_train_images,
    floats,
    folder_images,
    load_served,
)
from xaiserve.offline.gad_train import GadTrainSettings, train_pair
from xaiserve.offline.report import format_table
from xaiserve.runtime.model import ModelConfig


def configure(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``xaiserve gad-train``."""
    defaults = GadTrainSettings()
    add_store(parser)
    parser.add_argument(
        "--classes",
        required=True,
        metavar="A,B",
        help="the class pair, as labels or indices (e.g. circle,square)",
    )
    parser.add_argument(
        "--alphas",
        type=floats,
        default=[0.0, 2.0, 4.0, 6.0, 8.0],
        help="logit distances, one support model per alpha > 0 (0,2,4,6,8)",
    )
    parser.add_argument(
        "--data",
        default="demo",
        help="'demo' (the demo training split) or a folder of images in "
        "folders named after their labels",
    )
    parser.add_argument(
        "--n",
        type=int,
        default=2000,
        help="training images of the pair's two classes (default 2000)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=defaults.epochs,
        help=f"epochs per support model (the seed's {defaults.epochs})",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=defaults.learning_rate,
        help=f"Adam learning rate (the seed's {defaults.learning_rate:g})",
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    add_threads(parser)


def _pair(text: str, labels: tuple[str, ...]) -> tuple[int, int]:
    parts = [t.strip() for t in text.split(",")]
    if len(parts) != 2:
        raise ValueError(f"--classes: expected two classes A,B, got {text!r}")
    pair = []
    for part in parts:
        if part in labels:
            pair.append(labels.index(part))
        elif part.isdigit() and int(part) < len(labels):
            pair.append(int(part))
        else:
            raise ValueError(f"--classes: unknown class {part!r}; labels: {', '.join(labels)}")
    if pair[0] == pair[1]:
        raise ValueError("--classes: the two classes must differ")
    return pair[0], pair[1]


def _pair_images(
    data: str, cfg: ModelConfig, limits: EngineLimits, pair: tuple[int, int], n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n`` labeled images of the pair's classes: N x C x H x W and labels N."""
    if data == "demo":  # labels cycle through the classes: n x K images hold n of each
        source = demo_train_images(n * len(cfg.labels))
    else:
        source = folder_images(Path(data), cfg, limits, 10**9)
    chosen = []
    for item in source:
        if item.label in pair:
            chosen.append(item)
            if len(chosen) == n:
                break
    if not chosen:
        raise ValueError(f"no labeled images of classes {pair} in {data}")
    x = torch.from_numpy(np.stack([item.image for item in chosen]))
    return x, torch.tensor([int(item.label) for item in chosen])  # type: ignore[arg-type]


def _bar(unit: str) -> Callable[[int, str], Callable[[int], None]]:
    """A progress factory for ``train_pair``: one tqdm bar per call."""

    def progress(total: int, description: str) -> Callable[[int], None]:
        bar = tqdm(total=total, desc=description, unit=unit)

        def update(steps: int) -> None:
            bar.update(steps)
            if bar.n >= total:
                bar.close()

        return update

    return progress


def run(args: argparse.Namespace) -> int:
    """Trains and stores the GAD support models of one class pair (seed 002)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    limits = EngineLimits()
    try:
        _, served = load_served(args.model_store, args.model, limits)
        pair = _pair(args.classes, served.config.labels)
        x, labels = _pair_images(args.data, served.config, limits, pair, args.n)
        settings = GadTrainSettings(
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            seed=args.seed,
            threads=args.threads,
        )
        entry = train_pair(served, x, labels, pair, args.alphas, settings, progress=_bar("batch"))
    except (ModelLoadError, XaiError, ValueError) as err:
        print(f"xaiserve: {err}", file=sys.stderr)
        return 2
    rows = [
        {"alpha": a, "file": f or "(the original model)", "final_mse": m}
        for a, f, m in zip(entry["alphas"], entry["files"], entry["final_mse"], strict=True)
    ]
    print(format_table(rows, ["alpha", "file", "final_mse"]))
    print(
        f"pair {','.join(entry['labels'])}: {entry['images']} images, "
        f"{settings.epochs} epochs, {entry['seconds']:.1f} s; stored in "
        f"{served.directory / 'gad'}"
    )
    return 0
