"""Evaluation of GAD maps by regions (seed 002, section 5): complexity RC and sensitivity RS.

For an image I, an explained class a of a GAD pair and a gradient method, the engine returns
the original map and the GAD map. The original map's important pixels are its most
important half (``gad.important_pixels``); the GAD map's are the pixels it keeps. Each set
becomes a region: the convex hull of its pixels (as unit squares), rasterized to a mask of
the pixels whose centres lie inside or on it.

    RC = A(CH_GAD) / A(CH_orig)                                   (seed eq. 1)
    RS(I, M, a) = |N_a(I) - N_a(I * (1 - M))| / sum(M)            (seed eq. 2)

N_a is the original model's logit of class a (pixel space; occluded pixels set to 0). RS is
computed for M_GAD and the supplementary mask M_orig - M_GAD. The GAD pixels are a subset of
the original map's important pixels, so CH_GAD lies inside CH_orig and RC <= 1; RC = 1
means the hulls coincide (counted for the original map, as the seed's RC >= 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import ConvexHull

from xaiserve.api.types import ExplainRequest, MethodRequest, RawTensor
from xaiserve.engine.engine import Engine
from xaiserve.engine.gad import important_pixels, pixel_relevance
from xaiserve.offline.evaluate import EvalImage

SEED_METHODS = (
    "saliency",
    "deconvolution",
    "input_x_gradient",
    "guided_backprop",
    "integrated_gradients",
)
"""The seed's five gradient methods (its tables 1 and 2)."""


def hull_region(pixels: np.ndarray) -> tuple[float, np.ndarray]:
    """Area of the convex hull of the True pixels of an H x W mask (each pixel a unit
    square) and the H x W mask of pixels whose centres lie in the hull. (0, empty) for no
    pixels."""
    rows, cols = np.nonzero(pixels)
    if len(rows) == 0:
        return 0.0, np.zeros_like(pixels, dtype=bool)
    corners = np.concatenate(
        [np.stack([rows + dr, cols + dc], axis=1) for dr in (0, 1) for dc in (0, 1)]
    ).astype(np.float64)
    hull = ConvexHull(corners)
    r0, c0 = corners.min(axis=0).astype(int)
    r1, c1 = corners.max(axis=0).astype(int)
    rr, cc = np.mgrid[r0:r1, c0:c1]
    centres = np.stack([rr.ravel() + 0.5, cc.ravel() + 0.5], axis=1)
    inside = (centres @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-9).all(axis=1)
    mask = np.zeros_like(pixels, dtype=bool)
    mask[rr.ravel()[inside], cc.ravel()[inside]] = True
    return float(hull.volume), mask


@torch.no_grad()
def region_sensitivity(
    module: torch.nn.Module, image: torch.Tensor, mask: np.ndarray, target: int
) -> float:
    """RS (seed eq. 2) of an H x W mask for image C x H x W; NaN for an empty mask."""
    size = int(mask.sum())
    if size == 0:
        return math.nan
    keep = torch.from_numpy(~mask).to(image.dtype)
    logits = module(torch.stack([image, image * keep]))
    return float((logits[0, target] - logits[1, target]).abs()) / size


@dataclass(frozen=True)
class RegionRow:
    """One image, explained class and method of a GAD pair."""

    image: str
    label: int | None
    pair: str
    position: int  # 1 or 2: which class of the pair is explained
    explained: int
    method: str
    area_orig: float
    area_gad: float
    rc: float
    rs_gad: float
    rs_sup: float
    kept_pixels: int
    important_pixels: int
    subset: bool  # every GAD pixel is an important pixel of the original map


def region_rows(
    engine: Engine,
    model: str,
    images: Iterable[EvalImage],
    methods: Sequence[str] = SEED_METHODS,
    progress: Callable[[Iterator[EvalImage]], Iterator[EvalImage]] = lambda it: it,
) -> list[RegionRow]:
    """RC and RS for every image of a GAD pair's classes (its label, or its predicted class
    when unlabeled), both classes of the pair explained, every method. 2-D models only
    (the regions are polygons); none for other models or without support models."""
    served = engine.models[model]
    support = served.gad
    if support is None or len(served.config.spatial) != 2:
        return []
    labels = served.config.labels
    requests = tuple(
        MethodRequest(name, stage="one_channel", gad=gad, field=f"methods[{2 * i + gad}]")
        for i, name in enumerate(methods)
        for gad in (False, True)
    )
    rows: list[RegionRow] = []
    for item in progress(iter(images)):
        x = torch.from_numpy(item.image)
        klass = item.label
        if klass is None:
            with torch.no_grad():
                klass = int(served.module(x[None]).argmax())
        pair = support.pair_for(klass)
        if pair is None:
            continue
        raw = RawTensor(tuple(item.image.shape), item.image.astype("<f4").tobytes())
        for position, explained in enumerate(pair.classes, start=1):
            if support.pair_for(explained) is not pair:
                continue  # the engine explains this class with an earlier pair
            result = engine.explain(
                ExplainRequest(model=model, image=raw, methods=requests, target=explained)
            )
            maps = result.explanations
            for i, name in enumerate(methods):
                original, gad = maps[2 * i].map, maps[2 * i + 1].map
                important = important_pixels(pixel_relevance(torch.from_numpy(original))).numpy()
                kept = pixel_relevance(torch.from_numpy(gad)).numpy() > 0
                area_orig, mask_orig = hull_region(important)
                area_gad, mask_gad = hull_region(kept)
                rows.append(
                    RegionRow(
                        image=item.name,
                        label=item.label,
                        pair=pair.name(labels),
                        position=position,
                        explained=explained,
                        method=name,
                        area_orig=area_orig,
                        area_gad=area_gad,
                        rc=area_gad / area_orig if area_orig > 0 else math.nan,
                        rs_gad=region_sensitivity(served.module, x, mask_gad, explained),
                        rs_sup=region_sensitivity(
                            served.module, x, mask_orig & ~mask_gad, explained
                        ),
                        kept_pixels=int(kept.sum()),
                        important_pixels=int(important.sum()),
                        subset=bool((kept <= important).all()),
                    )
                )
    return rows


def _groups(rows: Sequence[RegionRow]) -> dict[tuple[str, int, str], list[RegionRow]]:
    groups: dict[tuple[str, int, str], list[RegionRow]] = {}
    for row in rows:
        groups.setdefault((row.pair, row.position, row.method), []).append(row)
    return groups


def _mean(values: Iterable[float]) -> float:
    array = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    return float(array.mean()) if array.size else math.nan


def complexity_table(rows: Sequence[RegionRow]) -> list[dict[str, object]]:
    """Seed table 1: per pair, explained class and method, the images where GAD's region is
    smaller (RC < 1) and where it is not (RC >= 1), with the mean and median RC."""
    out = []
    for (pair, position, method), group in sorted(_groups(rows).items()):
        rcs = [r.rc for r in group if math.isfinite(r.rc)]
        out.append(
            {
                "pair": pair,
                "explained": f"{position} ({pair.split(',')[position - 1]})",
                "method": method,
                "images": len(group),
                "gad_smaller": sum(rc < 1.0 for rc in rcs),
                "orig": sum(rc >= 1.0 for rc in rcs),
                "undefined": len(group) - len(rcs),
                "rc_mean": _mean(rcs),
                "rc_median": float(np.median(rcs)) if rcs else math.nan,
                "gad_subset_of_orig": sum(r.subset for r in group),
                "kept_fraction_mean": _mean(
                    r.kept_pixels / max(r.important_pixels, 1) for r in group
                ),
            }
        )
    return out


def sensitivity_table(rows: Sequence[RegionRow]) -> list[dict[str, object]]:
    """Seed table 2: mean RS of the supplementary and the GAD masks (x 100, the seed's
    scale), and the fraction of images where occluding GAD's region costs more per pixel."""
    out = []
    for (pair, position, method), group in sorted(_groups(rows).items()):
        both = [r for r in group if math.isfinite(r.rs_gad) and math.isfinite(r.rs_sup)]
        out.append(
            {
                "pair": pair,
                "explained": f"{position} ({pair.split(',')[position - 1]})",
                "method": method,
                "images": len(group),
                "rs_sup_x100": 100 * _mean(r.rs_sup for r in group),
                "rs_gad_x100": 100 * _mean(r.rs_gad for r in group),
                "gad_higher_fraction": (
                    sum(r.rs_gad > r.rs_sup for r in both) / len(both) if both else math.nan
                ),
                "compared": len(both),
            }
        )
    return out
