"""Offline evaluation of explanation methods by APEM (seed 004, chapters 4 and 5).

``select_images`` picks the images to evaluate (all, correctly classified or misclassified,
as the seed's separate sets of section 5.3); ``evaluate_images`` runs the engine on every
image for every method and visualization stage and returns one ``MapRow`` per map; the
table functions in ``tables`` aggregate the rows into the seed's tables. Everything runs
in-process on the same engine the service uses, so the numbers are those a client would
get.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from xaiserve.api.types import ExplainRequest, MethodRequest, RawTensor, ReliabilityRequest
from xaiserve.engine.engine import Engine
from xaiserve.reliability.apem import apem
from xaiserve.reliability.options import resolve_options
from xaiserve.reliability.probe import Probe
from xaiserve.reliability.score import relevance_from_map, shuffled
from xaiserve.runtime.forward.counted import Budget


@dataclass(frozen=True)
class EvalImage:
    """One image to evaluate. image: C x H x W float32 in [0, 1] at the model's size;
    label: the true class when known; mask: H x W object mask when known."""

    name: str
    image: np.ndarray
    label: int | None = None
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class MapRow:
    """The APEM record of one map (method x stage x image) and its context.

    Times: ``seconds`` is the wall time of the engine call that ran this method alone on
    this image (its attribution once, then every stage's map and APEM record), divided by
    the method's stages; ``attribute_seconds`` the attribution alone (the engine's
    ``attribute`` timing of the stage that computed it); ``apem_seconds`` this map's share
    of the APEM searches by forward passes (the engine's ``apem`` timing)."""

    image: str
    method: str
    stage: str
    label: int | None
    predicted: int
    correct: bool | None
    loss: float  # cross-entropy at the true label (NaN without a label)
    eps_minus: float
    eps_plus: float
    apem: float
    apem_norm: float  # NaN when not computed or undefined
    shuffled_apem_norm: float  # APEM_norm of a shuffled copy of the map (seed table 5.1)
    resolution: float
    eps_minus_censored: bool
    eps_plus_censored: bool
    undefined_reason: str
    forward_passes: int
    seconds: float
    mask_mass: float  # fraction of the map's mass inside the object mask (NaN without mask)
    confidence: float = math.nan  # softmax probability of the predicted class
    attribute_seconds: float = math.nan
    apem_seconds: float = math.nan

    @property
    def censored(self) -> bool:
        """A search saw no flip up to eps_max: eps and APEM are bounds, not values."""
        return self.eps_minus_censored or self.eps_plus_censored

    @property
    def usable(self) -> bool:
        """Defined and uncensored: the maps whose APEM enters means, medians and tests."""
        return not self.undefined_reason and not self.censored


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else float(value)


def mask_mass(attr_map: np.ndarray, mask: np.ndarray | None) -> float:
    """Fraction of |map| inside the mask: map C' x H x W, mask H x W. NaN without a mask
    or for an all-zero map. A uniform map scores mask.mean()."""
    if mask is None:
        return math.nan
    mass = np.abs(attr_map).sum(axis=0)
    total = float(mass.sum())
    return float(mass[mask].sum() / total) if total > 0 else math.nan


SELECTIONS = ("all", "correct", "misclassified")


@dataclass(frozen=True)
class Selection:
    """The images ``select_images`` kept, and how many it looked at to find them."""

    images: list[EvalImage]
    scanned: int
    misclassified_seen: int


def select_images(
    module: torch.nn.Module,
    images: Iterable[EvalImage],
    select: str,
    n: int,
    *,
    scan_limit: int,
    batch_size: int = 256,
) -> Selection:
    """The first ``n`` images of ``images`` (at most ``scan_limit`` looked at) that the
    model classifies as ``select`` asks: ``all`` (every image), ``correct`` or
    ``misclassified`` (argmax of ``module`` against the label; the seed's two sets of
    section 5.3). ValueError for an image without a label when the selection needs one."""
    if select not in SELECTIONS:
        raise ValueError(f"select is one of {', '.join(SELECTIONS)}, got {select!r}")
    kept: list[EvalImage] = []
    scanned = wrong = 0
    source = iter(images)
    while len(kept) < n and scanned < scan_limit:
        chunk = list(itertools.islice(source, min(batch_size, scan_limit - scanned)))
        if not chunk:
            break
        scanned += len(chunk)
        if select == "all":
            kept.extend(chunk)
            continue
        unlabelled = [item.name for item in chunk if item.label is None]
        if unlabelled:
            raise ValueError(f"--select {select} needs labels; {unlabelled[0]} has none")
        with torch.no_grad():
            batch = torch.stack([torch.from_numpy(item.image) for item in chunk])
            predicted = module(batch).argmax(dim=1).tolist()
        for item, p in zip(chunk, predicted, strict=True):
            correct = p == item.label
            wrong += not correct
            if correct == (select == "correct"):
                kept.append(item)
    return Selection(kept[:n], scanned, wrong)


def evaluate_images(
    engine: Engine,
    model: str,
    images: Iterable[EvalImage],
    methods: Sequence[str],
    stages: Sequence[str],
    *,
    shuffles: int = 4,
    resolution: float = 0.01,
    progress: Callable[[Iterator[EvalImage]], Iterator[EvalImage]] = lambda it: it,
) -> list[MapRow]:
    """One row per (image, method, stage); the explained class is the predicted one. Each
    method runs in its own engine call (its stages together), so its time is its own; its
    first call runs once untimed before (warm-up), so the first image's time is not the
    start-up's."""
    served = engine.models[model]
    rows: list[MapRow] = []
    options = ReliabilityRequest(resolution=resolution, shuffles=shuffles)
    resolved = resolve_options(options, math.prod(served.config.input_shape))
    warm: set[str] = set()
    for item in progress(iter(images)):
        x = torch.from_numpy(item.image).unsqueeze(0)
        with torch.no_grad():
            logits = served.module(x)[0]
        predicted = int(logits.argmax())
        confidence = float(torch.softmax(logits, dim=0)[predicted])
        loss = (
            float(F.cross_entropy(logits[None], torch.tensor([item.label])))
            if item.label is not None
            else math.nan
        )
        raw = RawTensor(tuple(item.image.shape), item.image.astype("<f4").tobytes())
        budget = Budget(10**12)
        forward = engine.forward(model, budget)  # the model's forward-only backend
        generator = torch.Generator().manual_seed(len(rows))
        for method in methods:
            requests = tuple(
                MethodRequest(method, stage=stage, reliability=options, field=f"methods[{i}]")
                for i, stage in enumerate(stages)
            )
            if method not in warm:  # untimed first call: sessions, caches, allocators
                engine.explain(ExplainRequest(model=model, image=raw, methods=requests))
                warm.add(method)
            t0 = time.perf_counter()
            result = engine.explain(ExplainRequest(model=model, image=raw, methods=requests))
            seconds = (time.perf_counter() - t0) / max(len(requests), 1)
            attribute = max(e.timings.get("attribute", 0.0) for e in result.explanations)
            for explanation in result.explanations:
                record = explanation.reliability
                if record is None:  # every request above asks for one
                    raise RuntimeError(f"no reliability record for {explanation.method}")
                shuffled_norm = math.nan
                relevance = relevance_from_map(torch.from_numpy(explanation.map))
                if shuffles and not record.undefined_reason:
                    copy = shuffled(relevance, generator)
                    probe = Probe.of(forward, served.module, x[0], predicted, budget)
                    shuffled_record = apem(probe, copy, resolved)
                    shuffled_norm = _nan_if_none(shuffled_record.apem_norm)
                rows.append(
                    MapRow(
                        image=item.name,
                        method=explanation.method,
                        stage=explanation.stage,
                        label=item.label,
                        predicted=predicted,
                        correct=None if item.label is None else predicted == item.label,
                        loss=loss,
                        eps_minus=record.eps_minus,
                        eps_plus=record.eps_plus,
                        apem=record.apem,
                        apem_norm=_nan_if_none(record.apem_norm),
                        shuffled_apem_norm=shuffled_norm,
                        resolution=record.resolution,
                        eps_minus_censored=record.eps_minus_censored,
                        eps_plus_censored=record.eps_plus_censored,
                        undefined_reason=record.undefined_reason,
                        forward_passes=explanation.forward_passes + record.forward_passes,
                        seconds=seconds,
                        mask_mass=mask_mass(explanation.map, item.mask),
                        confidence=confidence,
                        attribute_seconds=attribute,
                        apem_seconds=explanation.timings.get("apem", math.nan),
                    )
                )
    return rows
