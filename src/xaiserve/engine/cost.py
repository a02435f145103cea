"""The worst-case forward passes of a request, known before any work starts.

Each part of a planned request states the most forward passes it can spend, from the same
resolved parameters and constants the running code uses: a method's
``max_forward_passes``, ``options.record_cost_bound`` for a reliability record and
``options.filter_cost_bound`` for a filter. The engine adds them up in its plan, with
the prediction's pass and the gradient APEM's searches share, and refuses a request whose
sum exceeds ``--max-forward-passes`` before it decodes the image, naming the request field
that costs most and what to lower. While the work runs, ``forward.Budget`` still checks
every charge against the same limit.

Counts are in the budget's unit: one per image the model evaluates, a forward with its
backward counting once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from xaiserve.api.errors import ResourceExhausted
from xaiserve.methods.base import AttributionMethod
from xaiserve.reliability.options import (
    ApemOptions,
    FilterOptions,
    filter_cost_bound,
    record_cost_bound,
)
from xaiserve.runtime.model import ServedModel

PREDICTION_PASSES = 1
"""The unperturbed image's forward pass that gives the prediction."""
GRADIENT_PASSES = 1
"""APEM's loss gradient, one per request, shared by every record and filter (a filter's
bound counts it too, as its ``forward_budget`` does)."""


@dataclass(frozen=True)
class Cost:
    """The most forward passes one part of a request may spend, the request field that
    sets it and what to lower."""

    passes: int
    field: str
    advice: str


def method_cost(
    method: AttributionMethod,
    params: dict[str, Any],
    served: ServedModel,
    field: str,
    advice: str = "",
) -> Cost:
    """One map's attribution; ``field`` names its parameters (``methods[0].occlusion``)."""
    passes = method.max_forward_passes(params, served)
    fallback = f"{method.name} costs {passes} per image; ask for fewer methods"
    return Cost(passes, field, advice or method.cost_advice or fallback)


def gad_cost(attribution: Cost, served: ServedModel, field: str) -> Cost:
    """GAD: the method again on each support model of the explained class's pair (known
    after the prediction, so the pair with the most support models counts)."""
    pairs = served.gad.pairs if served.gad is not None else ()
    supports = max((len(pair.modules) for pair in pairs), default=0)
    return Cost(
        attribution.passes * supports,
        f"{field}.gad",
        f"GAD runs the method again on each of the model's {supports} support models; "
        f"ask without gad, or lower the method's cost ({attribution.advice})",
    )


def reliability_cost(options: ApemOptions, field: str) -> Cost:
    """One map's APEM record, the shared gradient left out."""
    if options.shuffles:
        return Cost(
            record_cost_bound(options),
            f"{field}.reliability.shuffles",
            f"each of the {options.shuffles} shuffles may cost as much as the map's own "
            "APEM; ask for fewer shuffles",
        )
    return Cost(
        record_cost_bound(options),
        f"{field}.reliability.resolution",
        "ask for a coarser resolution",
    )


def filter_cost(
    filter_options: FilterOptions, options: ApemOptions, entries: int, field: str
) -> Cost:
    """One map's APEM filter; ``entries``: the values of the map (C x *spatial or
    1 x *spatial), which bound its distinct values."""
    passes = filter_cost_bound(filter_options, options, entries)
    if filter_options.forward_budget is None:
        return Cost(
            passes,
            f"{field}.filter.mode",
            f"the EXACT filter scores one APEM per distinct value of the map (up to "
            f"{entries:,}); use mode FAST, or give filter.forward_budget",
        )
    return Cost(passes, f"{field}.filter.forward_budget", "lower filter.forward_budget")


def map_entries(input_shape: Sequence[int], stage: str) -> int:
    """Values of a map at ``stage``: C x *spatial for ``raw`` and ``three_channel`` (CAM maps
    have one channel, fewer), 1 x *spatial otherwise."""
    keeps_channels = stage in ("raw", "three_channel")
    return math.prod(input_shape) if keeps_channels else math.prod(input_shape[1:])


def check_within(costs: Sequence[Cost], limit: int) -> int:
    """The request's worst case, the prediction's pass and ``costs``; ResourceExhausted
    naming the costliest part's field when it exceeds ``limit``."""
    total = PREDICTION_PASSES + sum(cost.passes for cost in costs)
    if total <= limit:
        return total
    if not costs:
        raise ResourceExhausted(
            "methods",
            f"the prediction alone needs more than the {limit:,} forward passes allowed per call",
        )
    worst = max(costs, key=lambda cost: cost.passes)
    raise ResourceExhausted(
        worst.field,
        f"the request could need up to {total:,} forward passes, more than the {limit:,} "
        f"allowed per call; up to {worst.passes:,} of them here: {worst.advice}",
    )
