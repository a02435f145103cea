"""GAD support models stored with a model (seed 002, gradient artificial distancing).

``xaiserve gad-train`` writes them into the model directory's ``gad/`` folder:

    gad/index.json                      format, SHA-256 of the original weights, and per
                                        class pair: the two class indices and labels, the
                                        alphas, one file per alpha, the training settings
    gad/pair_<a>_<b>_alpha_<alpha>.pt   a support model's state dict (same network class),
                                        loaded with torch.load(weights_only=True)

alpha = 0 asks for no shift: the regression target is the original model's own output, so
its support model is the original model; it is listed in the index but has no file.

Support models are loaded with the model (``load_gad_support``) and kept in memory: one
extra copy of the network per stored alpha.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xaiserve.api.errors import ModelLoadError
from xaiserve.runtime.artifacts import write_json_atomic
from xaiserve.runtime.pixel_space import PixelSpaceModel

log = logging.getLogger(__name__)

GAD_DIR = "gad"
INDEX_FILE = "index.json"
FORMAT = 1


@dataclass(frozen=True)
class SupportPair:
    """The support models of one class pair. modules: pixel-space support networks, one per
    stored alpha > 0, in ``alphas`` order (alpha 0, the original model, has none)."""

    classes: tuple[int, int]
    alphas: tuple[float, ...]
    modules: tuple[PixelSpaceModel, ...]

    def name(self, labels: Sequence[str]) -> str:
        """``"A,B"``: the pair's labels."""
        return ",".join(labels[c] for c in self.classes)


@dataclass(frozen=True)
class GadSupport:
    """The class pairs a model has support models for, in the order they were trained."""

    pairs: tuple[SupportPair, ...]

    def pair_for(self, target: int) -> SupportPair | None:
        """The first pair that contains class ``target`` (None when none does)."""
        return next((p for p in self.pairs if target in p.classes), None)

    def names(self, labels: Sequence[str]) -> tuple[str, ...]:
        return tuple(p.name(labels) for p in self.pairs)


def support_file_name(classes: tuple[int, int], alpha: float) -> str:
    """``pair_0_1_alpha_2.pt`` (alpha written with ``%g``)."""
    return f"pair_{classes[0]}_{classes[1]}_alpha_{alpha:g}.pt"


def read_index(directory: Path) -> dict[str, Any] | None:
    """``gad/index.json`` of a model directory, or None when there is none."""
    path = Path(directory) / GAD_DIR / INDEX_FILE
    if not path.exists():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path}: {err}") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ModelLoadError(f"{path}: unknown format")
    return index


def write_index(directory: Path, index: dict[str, Any]) -> Path:
    path = Path(directory) / GAD_DIR / INDEX_FILE
    write_json_atomic(path, index)
    return path


def index_files(index: dict[str, Any]) -> list[str]:
    """Paths, relative to the model directory, of the index and every support model file."""
    files = [f"{GAD_DIR}/{INDEX_FILE}"]
    for pair in index.get("pairs", []):
        files += [f"{GAD_DIR}/{name}" for name in pair.get("files", []) if name]
    return files


def load_gad_support(
    directory: Path,
    make_module: Callable[[dict[str, torch.Tensor]], PixelSpaceModel],
    weights_sha256: str,
    n_classes: int,
) -> GadSupport | None:
    """The support models stored in ``directory/gad``, or None when there are none.

    ``make_module(state_dict)`` builds a pixel-space module from a state dict. An index
    made for other weights is stale: ignored with a warning. Malformed entries or files
    raise ModelLoadError.
    """
    index = read_index(directory)
    if index is None or not index.get("pairs"):
        return None
    gad_dir = Path(directory) / GAD_DIR
    if index.get("weights_sha256") != weights_sha256:
        log.warning(
            "%s: support models were trained from other weights; ignored "
            "(run `xaiserve gad-train` again)",
            gad_dir,
        )
        return None
    pairs = []
    for entry in index["pairs"]:
        classes = tuple(int(c) for c in entry.get("classes", ()))
        alphas = tuple(float(a) for a in entry.get("alphas", ()))
        files = list(entry.get("files", ()))
        if (
            len(classes) != 2
            or not all(0 <= c < n_classes for c in classes)
            or (classes[0] == classes[1] or len(files) != len(alphas))
        ):
            raise ModelLoadError(f"{gad_dir / INDEX_FILE}: malformed pair {entry!r}")
        modules: list[PixelSpaceModel] = []
        kept: list[float] = []
        for alpha, name in zip(alphas, files, strict=True):
            if alpha == 0:
                continue  # the original model
            path = (gad_dir / name).resolve()
            if gad_dir.resolve() not in path.parents or not path.is_file():
                raise ModelLoadError(f"{gad_dir}: support model {name!r} missing")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                modules.append(make_module(state))
            except ModelLoadError:
                raise
            except Exception as err:  # unreadable, pickled objects refused, shape mismatch
                raise ModelLoadError(f"{path}: {err}") from err
            kept.append(alpha)
        pairs.append(SupportPair(classes, tuple(kept), tuple(modules)))
    return GadSupport(tuple(pairs))
