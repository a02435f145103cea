"""``xaiserve``: the command line.

    xaiserve explain cat.png --model demo --methods saliency,grad_cam,occlusion --out maps/
    xaiserve models
    xaiserve evaluate --model-dir var/models/demo --n 100 --out var/eval
    xaiserve check-model var/models/demo

Each subcommand is a :class:`Subcommand` in :data:`SUBCOMMANDS`: a function that adds its
arguments, a function that runs it, and one entry in that tuple. The client's commands live in
:mod:`xaiserve.gateway.cli`, the in-process offline tools in :mod:`xaiserve.offline.cli`
(a module per command).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from xaiserve.gateway import cli as client
from xaiserve.model_store import check
from xaiserve.offline.cli import calibrate, evaluate, gad_train


@dataclass(frozen=True)
class Subcommand:
    """One ``xaiserve <name>`` command: ``configure`` adds its arguments, ``run`` returns
    the exit status."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand(
        "explain",
        "explain images, write maps and a JSON summary",
        client.configure_explain,
        client.run_explain,
    ),
    Subcommand("models", "list the served models", client.configure_models, client.run_models),
    Subcommand(
        "evaluate",
        "score methods by APEM over a data set (offline, in-process)",
        evaluate.configure,
        evaluate.run,
    ),
    Subcommand(
        "calibrate",
        "measure and store the S-CAM calibration of a model (offline)",
        calibrate.configure,
        calibrate.run,
    ),
    Subcommand(
        "check-model",
        "load a model directory as the server will and try every method on it",
        check.configure,
        check.run,
    ),
    Subcommand(
        "gad-train",
        "train and store GAD support models for a class pair (offline)",
        gad_train.configure,
        gad_train.run,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``xaiserve`` parser with one sub-parser per :data:`SUBCOMMANDS` entry."""
    parser = argparse.ArgumentParser(
        prog="xaiserve", description="Client of the xaiserve explanation service."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for sub in SUBCOMMANDS:
        sub_parser = commands.add_parser(sub.name, help=sub.help, description=sub.help)
        sub.configure(sub_parser)
        sub_parser.set_defaults(run=sub.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xaiserve`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
