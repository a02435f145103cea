"""Offline evaluation of explanation methods by APEM (seed 004, chapters 4 and 5).

``evaluate_images`` runs the engine on every image for every method and visualization stage
and returns one ``MapRow`` per map; the table functions in ``evaluation_tables`` aggregate
the rows into the seed's tables. Everything runs in-process on the same engine the service
uses, so the numbers are those a client would get.
"""

from __future__ import annotations

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
    """The APEM record of one map (method x stage x image) and its context."""

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
    """One row per (image, method, stage); the explained class is the predicted one."""
    served = engine.models[model]
    rows: list[MapRow] = []
    options = ReliabilityRequest(resolution=resolution, shuffles=shuffles)
    resolved = resolve_options(options, math.prod(served.config.input_shape))
    requests = tuple(
        MethodRequest(name, stage=stage, reliability=options, field=f"methods[{i}]")
        for i, (name, stage) in enumerate((m, s) for m in methods for s in stages)
    )
    for item in progress(iter(images)):
        x = torch.from_numpy(item.image).unsqueeze(0)
        with torch.no_grad():
            logits = served.module(x)[0]
        predicted = int(logits.argmax())
        loss = (
            float(F.cross_entropy(logits[None], torch.tensor([item.label])))
            if item.label is not None
            else math.nan
        )
        t0 = time.perf_counter()
        raw = RawTensor(tuple(item.image.shape), item.image.astype("<f4").tobytes())
        result = engine.explain(ExplainRequest(model=model, image=raw, methods=requests))
        seconds = (time.perf_counter() - t0) / max(len(requests), 1)
        budget = Budget(10**12)
        forward = engine.forward(model, budget)  # the model's forward-only backend
        generator = torch.Generator().manual_seed(len(rows))
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
                )
            )
    return rows
