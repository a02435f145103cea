"""``xaiserve evaluate``: scores methods by APEM over a data set (seed 004's tables), and
with ``--sections`` seed 003's consistency and accuracy tables (ifa) and seed 002's
complexity and sensitivity tables (gad)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from xaiserve.api.errors import ModelLoadError, XaiError
from xaiserve.api.types import STAGES
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.methods.registry import METHODS
from xaiserve.offline.cli.common import (
    add_store,
    add_threads,
    demo_images,
    floats,
    folder_images,
    load_served,
    method_names,
)
from xaiserve.offline.evaluate import (
    SELECTIONS,
    EvalImage,
    MapRow,
    evaluate_images,
    select_images,
)
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
from xaiserve.offline.report import format_table, read_rows, write_csv, write_report
from xaiserve.offline.stats import Bootstrap
from xaiserve.offline.tables import loss_correlation, ranking, stage_order

DEFAULT_METHODS = ("saliency", "smoothgrad", "lrp", "integrated_gradients", "grad_cam", "occlusion")
SECTIONS = ("apem", "ifa", "gad")
RANKING_COLUMNS = ["rank", "method", "maps", "censored", "apem_median", "apem_ci_low"]
RANKING_COLUMNS += ["apem_ci_high", "apem_mean", "apem_norm_median", "seconds_per_map"]
RANKING_COLUMNS += ["forward_passes_per_map"]


def _stages(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(n not in STAGES for n in names):
        raise argparse.ArgumentTypeError(f"stages are {', '.join(STAGES)}")
    return names


def configure(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``xaiserve evaluate``."""
    add_store(parser)
    parser.add_argument(
        "--data", default="demo", help="'demo' (the held-out synthetic set) or an image folder"
    )
    parser.add_argument(
        "--n",
        type=int,
        default=20,
        help="number of images to evaluate, after --select (default 20: a minute or two "
        "on 2 cores with the default methods; the seed used 5,000 per set)",
    )
    parser.add_argument(
        "--select",
        choices=SELECTIONS,
        default="all",
        help="which images: all, or only those the model classifies correctly or "
        "misclassifies (the seed's two sets, tables 5.2 and 5.3; needs labels). The demo "
        "model misclassifies about 2.4%% of held-out images, so '--select misclassified "
        "--n N' looks at about 42 N images (default all)",
    )
    parser.add_argument(
        "--scan-limit",
        type=int,
        default=None,
        help="the most images --select looks at to find --n (default max(1000, 100 n))",
    )
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
        type=method_names,
        default=list(DEFAULT_METHODS),
        help="comma-separated methods, or 'all' (default: %(default)s)",
    )
    parser.add_argument(
        "--stages",
        type=_stages,
        default=[s for s in STAGES if s != "raw"],
        help="comma-separated visualization stages (default: the seed's three, "
        "three_channel,one_channel,times_image; raw is the method's own signed output)",
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
        "--bootstrap",
        type=int,
        default=2000,
        help="bootstrap resamples for the medians' 95%% intervals (default 2000)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)"
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
        type=method_names,
        default=list(SEED_METHODS),
        help="gradient methods of the gad section (default: the seed's five)",
    )
    parser.add_argument(
        "--principal-fractions",
        type=floats,
        default=[0.05, 0.1, 0.25],
        help="fractions of principal features in the ifa section's accuracy "
        "table (default 0.05,0.1,0.25)",
    )
    add_threads(parser)


def _sections(text: str) -> list[str]:
    names = list(SECTIONS) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(n not in SECTIONS for n in names):
        raise argparse.ArgumentTypeError(f"sections are {', '.join(SECTIONS)} or all")
    return names


def run(args: argparse.Namespace) -> int:
    """Runs ``xaiserve evaluate``; returns the exit status (2: the model or data cannot be
    used)."""
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
        scan_limit = args.scan_limit or (
            args.n if args.select == "all" else max(1000, 100 * args.n)
        )
        if args.data == "demo":
            source = demo_images(scan_limit, args.offset)
        else:
            source = folder_images(Path(args.data), cfg, limits, scan_limit)
        chosen = select_images(served.module, source, args.select, args.n, scan_limit=scan_limit)
        images = chosen.images
        print(
            f"{len(images)} images ({args.select}) of {chosen.scanned} looked at"
            + (f", {chosen.misclassified_seen} misclassified" if args.select != "all" else "")
        )
        if len(images) < args.n:
            print(
                f"xaiserve: only {len(images)} of --n {args.n} found; raise --scan-limit",
                file=sys.stderr,
            )
        written = 0
        if "apem" in args.sections:
            written += _apem_section(args, engine, images)
        if "ifa" in args.sections:
            written += _ifa_section(args, engine, images)
        if "gad" in args.sections:
            written += _gad_section(args, engine, images)
    except (ModelLoadError, XaiError, ValueError) as err:
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
        progress=lambda it: iter(tqdm(it, total=len(images), desc="evaluate", unit="image")),
    )
    return _print_apem_report(args, rows)


def _print_apem_report(args: argparse.Namespace, rows: list[MapRow]) -> int:
    """Writes the APEM tables and plots of ``rows`` and prints the rankings and table
    5.3."""
    boot = Bootstrap(resamples=args.bootstrap, seed=args.seed)
    written = write_report(args.out, rows, boot)
    for stage in sorted({r.stage for r in rows}, key=stage_order):
        print(
            f"\nAPEM ranking, stage {stage} (uncensored maps; median with its 95% "
            f"bootstrap interval, {boot.resamples} resamples, seed {boot.seed}):"
        )
        print(
            format_table(
                ranking(rows, stage, boot),
                RANKING_COLUMNS,
            )
        )
    if any(r.label is not None for r in rows):
        print("\nSpearman of APEM with the loss (seed 004 table 5.3; p two-sided):")
        columns = [
            f"{k}_{g}" for g in ("correct", "misclassified", "all") for k in ("n", "spearman", "p")
        ]
        print(format_table(loss_correlation(rows), ["method", "stage", *columns]))
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
        progress=lambda it: iter(tqdm(it, total=len(images), desc="ifa consistency", unit="image")),
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
        progress=lambda it: iter(tqdm(it, total=len(images), desc="gad regions", unit="image")),
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
