"""``xaiserve calibrate``: measures and stores the S-CAM calibration of a model (seed 003)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from xaiserve.api.errors import ModelLoadError, XaiError
from xaiserve.engine.limits import EngineLimits
from xaiserve.offline.calibrate import LabeledImage, calibrate
from xaiserve.offline.cli.common import add_store, add_threads, load_served, training_images
from xaiserve.offline.report import format_table
from xaiserve.runtime.calibration import IMPORTANCE_MODES, save_calibration


def configure(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``xaiserve calibrate``."""
    add_store(parser)
    parser.add_argument(
        "--data", default="demo", help="'demo' (the demo training split) or an image folder"
    )
    parser.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (32)")
    parser.add_argument(
        "--importance",
        choices=["auto", *IMPORTANCE_MODES],
        default="auto",
        help="importance matrix from every class per image (seed eq. 3) or "
        "each image's true class (eq. 4); auto: eq. 3 up to 32 classes",
    )
    add_threads(parser)


def run(args: argparse.Namespace) -> int:
    """Measures and stores the S-CAM calibration of one model (seed 003)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    limits = EngineLimits()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        _, served = load_served(args.model_store, args.model, limits)
        images = (
            LabeledImage(item.image, item.label)
            for item in training_images(args.data, served.config, limits, args.n)
        )
        calibration = calibrate(
            served,
            images,
            importance_mode=args.importance,
            batch_size=args.batch_size,
            data=args.data if args.data == "demo" else str(Path(args.data).resolve()),
            progress=lambda it: iter(
                tqdm(it, total=math.ceil(args.n / args.batch_size), desc="calibrate", unit="batch")
            ),
        )
    except (ModelLoadError, XaiError, ValueError) as err:
        print(f"xaiserve: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    written = save_calibration(served.directory, calibration)
    rows = [
        {"cam": key, "p10": cam.p10, "p90": cam.p90, "maps": cam.maps, "features": cam.features}
        for key, cam in calibration.cams.items()
    ]
    print(format_table(rows, ["cam", "p10", "p90", "maps", "features"]))
    print(
        f"{calibration.images} images, importance {calibration.importance_mode}, "
        f"{calibration.seconds:.1f} s; wrote {', '.join(str(p) for p in written)}"
    )
    return 0
