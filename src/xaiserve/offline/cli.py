"""Offline commands of the ``xaiserve`` command-line tool that run the engine in-process
(no server; command-line code, so it prints and shows progress bars):
``xaiserve evaluate`` scores methods by APEM over a data set (seed 004's tables);
``xaiserve calibrate`` measures the S-CAM calibration (seed 003) and ``xaiserve gad-train``
trains GAD support models (seed 002), both stored in the model directory.

    xaiserve evaluate --model demo --data demo --n 500 --out var/eval
    xaiserve evaluate --model mynet --data images/ --methods saliency,grad_cam
    xaiserve calibrate --model demo --data demo --n 2000
    xaiserve gad-train --model demo --classes circle,square --alphas 0,2,4,6,8
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from xaiserve.api.errors import ModelLoadError, XaiError
from xaiserve.api.types import STAGES, EncodedImage
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.engine.preprocess import decode_image
from xaiserve.methods.registry import METHODS
from xaiserve.offline.calibrate import LabeledImage, calibrate
from xaiserve.offline.evaluate import EvalImage, MapRow, evaluate_images
from xaiserve.offline.evaluate_gad import (
    SEED_METHODS,
    complexity_table,
    region_rows,
    sensitivity_table,
)
from xaiserve.offline.evaluate_ifa import (
    cam_pairs,
    class_activations,
    consistency,
    principal_accuracy,
    scatter_plot,
    table_one,
)
from xaiserve.offline.gad_train import GadTrainSettings, train_pair
from xaiserve.offline.report import format_table, read_rows, write_csv, write_report
from xaiserve.offline.tables import ranking
from xaiserve.runtime.calibration import IMPORTANCE_MODES, save_calibration
from xaiserve.runtime.model import ModelConfig, ServedModel

DEFAULT_METHODS = ("saliency", "smoothgrad", "lrp", "integrated_gradients", "grad_cam", "occlusion")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SECTIONS = ("apem", "ifa", "gad")


def demo_images(n: int, offset: int = 0) -> Iterator[EvalImage]:
    """Held-out images of the demo data set, with labels and object masks."""
    from xaiserve.model_store.synthetic import TEST_SEED, make_sample

    for i in range(offset, offset + n):
        sample = make_sample(TEST_SEED, i)
        yield EvalImage(f"demo-{i}", sample.image, sample.label, sample.mask)


def folder_images(
    root: Path, cfg: ModelConfig, limits: EngineLimits, n: int
) -> Iterator[EvalImage]:
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


def load_served(model_store: Path, model: str, limits: EngineLimits) -> tuple[Engine, ServedModel]:
    """The engine (``load_engine``) and its model ``model``; ModelLoadError when the store
    does not hold it."""
    engine = load_engine(model_store, model, limits)
    served = engine.models.get(model)
    if served is None:
        raise ModelLoadError(f"model {model!r} not in {model_store}")
    return engine, served


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
    parser.add_argument(
        "--model-store",
        type=Path,
        default=Path("var/models"),
        help="directory of model directories (default var/models)",
    )
    parser.add_argument(
        "--data", default="demo", help="'demo' (the held-out synthetic set) or an image folder"
    )
    parser.add_argument("--n", type=int, default=100, help="number of images (default 100)")
    parser.add_argument(
        "--offset",
        type=int,
        default=0,
        help="first demo image index, to split a long run into shards (default 0)",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="instead of evaluating, merge the maps.csv of earlier runs "
        "(shards) and write the tables of all of them to --out",
    )
    parser.add_argument(
        "--methods",
        type=_names,
        default=list(DEFAULT_METHODS),
        help="comma-separated methods, or 'all' (default: %(default)s)",
    )
    parser.add_argument(
        "--stages",
        type=_stages,
        default=list(STAGES),
        help="comma-separated visualization stages (default: all three)",
    )
    parser.add_argument(
        "--shuffles", type=int, default=4, help="shuffled maps for APEM_norm (default 4)"
    )
    parser.add_argument(
        "--resolution",
        type=float,
        default=0.01,
        help="relative resolution of the eps searches (default 0.01)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("var/eval"),
        help="output folder for CSV tables and PNG plots (default var/eval)",
    )
    parser.add_argument(
        "--sections",
        type=_sections,
        default=["apem"],
        help="report sections: apem (seed 004), ifa (seed 003 tables I and "
        "II; needs `xaiserve calibrate`), gad (seed 002 tables 1 and 2; "
        "needs `xaiserve gad-train`), or all (default apem)",
    )
    parser.add_argument(
        "--gad-methods",
        type=_names,
        default=list(SEED_METHODS),
        help="gradient methods of the gad section (default: the seed's five)",
    )
    parser.add_argument(
        "--principal-fractions",
        type=_floats,
        default=[0.05, 0.1, 0.25],
        help="fractions of principal features in the ifa section's accuracy "
        "table (default 0.05,0.1,0.25)",
    )
    _add_threads(parser)


def _sections(text: str) -> list[str]:
    names = list(SECTIONS) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(n not in SECTIONS for n in names):
        raise argparse.ArgumentTypeError(f"sections are {', '.join(SECTIONS)} or all")
    return names


def run_evaluate(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.merge:
        rows = [row for directory in args.merge for row in read_rows(directory / "maps.csv")]
        _print_apem_report(args, rows)
        return 0
    per_call = max(
        len(args.methods) * len(args.stages), 2 * len(args.gad_methods), 2 * len(cam_pairs())
    )
    limits = EngineLimits(max_methods=per_call, max_forward_passes=10**9)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        engine, served = load_served(args.model_store, args.model, limits)
        cfg = served.config
        missing = _missing_for_sections(
            args.sections, served.calibration is not None, served.gad is not None, args.model
        )
        if missing:
            print(f"xaiserve: {missing}", file=sys.stderr)
            return 2
        if args.data == "demo":
            images = list(demo_images(args.n, args.offset))
        else:
            images = list(folder_images(Path(args.data), cfg, limits, args.n))
        written = 0
        if "apem" in args.sections:
            written += _apem_section(args, engine, images)
        if "ifa" in args.sections:
            written += _ifa_section(args, engine, images)
        if "gad" in args.sections:
            written += _gad_section(args, engine, images)
    except (ModelLoadError, XaiError) as err:
        print(f"xaiserve: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    print(f"\ntables and plots in {args.out}/ ({written} files)")
    return 0


def _missing_for_sections(sections: list[str], calibrated: bool, gad: bool, model: str) -> str:
    if "ifa" in sections and not calibrated:
        return f"the ifa section needs a calibrated model: run `xaiserve calibrate --model {model}`"
    if "gad" in sections and not gad:
        return (
            f"the gad section needs GAD support models: run "
            f"`xaiserve gad-train --model {model} --classes A,B`"
        )
    return ""


def _apem_section(args: argparse.Namespace, engine: Engine, images: list[EvalImage]) -> int:
    """Seed 004: APEM tables and plots."""
    served = engine.models[args.model]
    methods = [m for m in args.methods if METHODS[m]().unsupported_reason(served) is None]
    for name in sorted(set(args.methods) - set(methods)):
        print(f"skipping {name}: {METHODS[name]().unsupported_reason(served)}", file=sys.stderr)
    rows = evaluate_images(
        engine,
        args.model,
        images,
        methods,
        args.stages,
        shuffles=args.shuffles,
        resolution=args.resolution,
        progress=lambda it: tqdm(it, total=len(images), desc="evaluate", unit="image"),
    )
    return _print_apem_report(args, rows)


def _print_apem_report(args: argparse.Namespace, rows: list[MapRow]) -> int:
    """Writes the APEM tables and plots of ``rows`` and prints the rankings."""
    written = write_report(args.out, rows)
    for stage in sorted({r.stage for r in rows}):
        print(f"\nAPEM ranking, stage {stage}:")
        print(
            format_table(
                ranking(rows, stage),
                [
                    "rank",
                    "method",
                    "maps",
                    "apem_median",
                    "apem_mean",
                    "censored_fraction",
                    "apem_norm_median",
                    "mask_mass_mean",
                    "forward_passes_per_map",
                ],
            )
        )
    print(f"\n{len(rows)} maps")
    return len(written)


def _ifa_section(args: argparse.Namespace, engine: Engine, images: list[EvalImage]) -> int:
    """Seed 003: consistency of the CAMs with the logits (table I, figure 9) and accuracy
    with principal features only (table II)."""
    served = engine.models[args.model]
    methods = [m for pair in cam_pairs() for m in pair]
    rows = class_activations(
        engine,
        args.model,
        images,
        methods,
        progress=lambda it: tqdm(it, total=len(images), desc="ifa consistency", unit="image"),
    )
    labels = served.config.labels
    table = consistency(rows, labels)
    calibration = served.calibration  # present: checked by _missing_for_sections
    accuracy = (
        principal_accuracy(served, images, calibration, args.principal_fractions)
        if calibration is not None
        else []
    )
    tables = {
        "ifa_consistency": table,
        "ifa_table1": table_one(table),
        "ifa_table1_pearson": table_one(table, "pearson"),
        "ifa_table1_spearman": table_one(table, "spearman"),
        "ifa_table2_principal_accuracy": accuracy,
        "ifa_activations": [dict(vars(r)) for r in rows],
    }
    for name, content in tables.items():
        write_csv(args.out / f"{name}.csv", content)
    scatter_plot(args.out / "ifa_scatter.png", rows, labels)
    print(
        "\nConsistency of class activation with the logit (seed 003 table I; coefficient "
        "= Pearson if both look normal, else Spearman):"
    )
    pairs = [m for pair in cam_pairs() for m in pair]
    print(format_table(tables["ifa_table1"], ["selected", *pairs, "ave_inc_percent"]))
    print("\nAccuracy with principal features only (seed 003 table II):")
    print(
        format_table(
            accuracy,
            [
                "cam",
                "fraction",
                "features",
                "of_features",
                "acc_all",
                "acc_principal",
                "acc_non_principal",
            ],
        )
    )
    return len(tables) + 1


def _gad_section(args: argparse.Namespace, engine: Engine, images: list[EvalImage]) -> int:
    """Seed 002: complexity RC (table 1) and sensitivity RS (table 2) of GAD maps."""
    rows = region_rows(
        engine,
        args.model,
        images,
        args.gad_methods,
        progress=lambda it: tqdm(it, total=len(images), desc="gad regions", unit="image"),
    )
    tables = {
        "gad_regions": [dict(vars(r)) for r in rows],
        "gad_table1_complexity": complexity_table(rows),
        "gad_table2_sensitivity": sensitivity_table(rows),
    }
    for name, content in tables.items():
        write_csv(args.out / f"{name}.csv", content)
    print("\nComplexity RC = A(CH_GAD) / A(CH_orig) (seed 002 table 1):")
    print(
        format_table(
            tables["gad_table1_complexity"],
            [
                "pair",
                "explained",
                "method",
                "images",
                "gad_smaller",
                "orig",
                "rc_mean",
                "gad_subset_of_orig",
            ],
        )
    )
    print("\nSensitivity RS, x 100 (seed 002 table 2):")
    print(
        format_table(
            tables["gad_table2_sensitivity"],
            [
                "pair",
                "explained",
                "method",
                "compared",
                "rs_sup_x100",
                "rs_gad_x100",
                "gad_higher_fraction",
            ],
        )
    )
    return len(tables)


# ------------------------------------------------------------ calibrate, gad-train


def demo_train_images(n: int) -> Iterator[EvalImage]:
    """The first ``n`` images of the demo model's training split, with labels."""
    from xaiserve.model_store.synthetic import TRAIN_SEED, make_sample

    for i in range(n):
        sample = make_sample(TRAIN_SEED, i)
        yield EvalImage(f"train-{i}", sample.image, sample.label, sample.mask)


def _data_images(data: str, cfg: ModelConfig, limits: EngineLimits, n: int) -> Iterator[EvalImage]:
    """``demo``: the training split (the data set the model learned from); else a folder."""
    return demo_train_images(n) if data == "demo" else folder_images(Path(data), cfg, limits, n)


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: steady on shared machines)",
    )


def _add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help="model name in the store (default demo)")
    parser.add_argument(
        "--model-store",
        type=Path,
        default=Path("var/models"),
        help="directory of model directories (default var/models)",
    )


def configure_calibrate(parser: argparse.ArgumentParser) -> None:
    _add_store(parser)
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
    _add_threads(parser)


def run_calibrate(args: argparse.Namespace) -> int:
    """Measures and stores the S-CAM calibration of one model (seed 003)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    limits = EngineLimits()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        _, served = load_served(args.model_store, args.model, limits)
        images = (
            LabeledImage(item.image, item.label)
            for item in _data_images(args.data, served.config, limits, args.n)
        )
        calibration = calibrate(
            served,
            images,
            importance_mode=args.importance,
            batch_size=args.batch_size,
            data=args.data if args.data == "demo" else str(Path(args.data).resolve()),
            progress=lambda it: tqdm(
                it, total=math.ceil(args.n / args.batch_size), desc="calibrate", unit="batch"
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


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def configure_gad_train(parser: argparse.ArgumentParser) -> None:
    defaults = GadTrainSettings()
    _add_store(parser)
    parser.add_argument(
        "--classes",
        required=True,
        metavar="A,B",
        help="the class pair, as labels or indices (e.g. circle,square)",
    )
    parser.add_argument(
        "--alphas",
        type=_floats,
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
    _add_threads(parser)


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


def run_gad_train(args: argparse.Namespace) -> int:
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
