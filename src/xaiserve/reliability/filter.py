"""The APEM explanation filter (seed 004, section 3.2, Algorithm 2).

Algorithm 2 zeroes all entries equal to the smallest positive relevance value, recomputes
APEM, and repeats until APEM drops; it returns the last map that did not drop. With the
distinct positive values v_1 < ... < v_D of R, its maps form one path

    M_0 = R,   M_k = R with every entry <= v_k set to 0   (M_D is all zero: a drop)

so the filter's answer is M_{k-1} for the first step k that drops.

Drop rule. APEM values are known only to the search resolution: each eps lies in its
search bracket (lower, eps], so APEM lies in [apem_low, apem_high] (``MapScore``). A step
*drops* when its APEM is certainly lower than the best accepted one: its ``apem_high`` is
below the largest ``apem_low`` of the maps accepted so far. At resolution 0 this is the
seed's ``apem < best_apem`` (accepted APEMs then never decrease, so the best is the
previous one); comparing with the best rather than the previous map keeps small decreases
from adding up. A map whose APEM is undefined (all zero) drops.

Records. Every map the filter scores, the original included, is scored by the standard
search (``score_maps``: the same grid points, no shortcut from a neighbour's eps), so
``apem_before`` and ``apem_after`` are the APEMs ``apem`` reports for the original and the
returned map. The returned map's APEM is never below the original's by more than
``drop_tolerance`` = resolution x (eps_plus of the original + eps_minus of the result), the
blur of the two brackets; a result that would be is replaced by the original.

- ``filter_exact``: the path step by step, one APEM per distinct value (small inputs, tests).
- ``filter_fast`` (the served default): evaluates a subset of the steps, in rounds whose
  candidates are scored in the same forward calls, within a forward-pass budget. The first
  round is an exponential search from the start of the path (steps removing 1, r, r^2, ...
  entries); later rounds refine the gaps between evaluated steps below the first known
  drop, riskiest first (``next_steps``). The answer is chosen as the exact algorithm would
  on the steps seen: the last evaluated step before the first one that drops against the
  steps before it. With a budget that covers every step below the drop it is the exact
  answer.

Maps are C x *spatial or 1 x *spatial in [0, 1] (``relevance_from_map`` of any stage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from xaiserve.api.errors import ResourceExhausted
from xaiserve.api.types import FilteredRecord
from xaiserve.reliability.options import (
    MODES,
    ApemOptions,
    FilterOptions,
    default_filter_options,
    default_options,
    map_cost_bound,
)
from xaiserve.reliability.path import (
    distinct_positive,
    dropped,
    first_known_drop,
    next_steps,
    quantile_steps,
    zero_through,
)
from xaiserve.reliability.probe import Probe
from xaiserve.reliability.score import (
    MapScore,
    check_relevance,
    score_maps,
    undefined_at,
    undefined_reason,
)

STAGE = "apem_filter"
CANDIDATES_PER_ROUND = 8


@dataclass(frozen=True)
class _Start:
    """Where a filter starts: its probe (at the filter's stage and the options' clamping),
    the original's score (None where APEM is undefined, with the reason), and ``inherited``:
    passes of the gradient and the original's searches done before the filter (by the map's
    APEM in the same request). They count toward the filter's ``forward_budget`` as if it
    had spent them, so it answers the same with or without them."""

    probe: Probe
    spent: int
    before: MapScore | None
    reason: str = ""
    inherited: int = 0

    def used(self) -> int:
        """Passes counted against the filter's ``forward_budget`` so far."""
        return self.probe.budget.spent - self.spent + self.inherited

    def own(self) -> int:
        """Passes the filter charged itself."""
        return self.probe.budget.spent - self.spent


def _start(
    probe: Probe, relevance: torch.Tensor, options: ApemOptions, before: MapScore | None
) -> _Start:
    """The gradient sign and the original's score (or why APEM is undefined)."""
    probe = replace(probe, stage=STAGE, clamp=options.clamp)
    spent = probe.budget.spent
    check_relevance(relevance, probe.x)
    reason = undefined_reason(relevance)
    if reason:
        return _Start(probe, spent, None, reason)
    inherited = int(probe.gradient_computed)
    reason = undefined_at(probe)
    if reason:
        return _Start(probe, spent, None, reason)
    if before is None:
        (before,) = score_maps(probe, options.lattice, [relevance])
    else:
        inherited += before.forward_passes
    return _Start(probe, spent, before, "", inherited)


def drop_tolerance(before: MapScore, after: MapScore, resolution: float) -> float:
    """How far the returned map's APEM may lie below the original's: resolution x
    (eps_plus of the original + eps_minus of the result), what the two brackets blur."""
    return resolution * (before.plus.eps + after.minus.eps)


def _checked(
    original: torch.Tensor,
    kept: torch.Tensor,
    before: MapScore,
    after: MapScore | None,
    resolution: float,
) -> tuple[torch.Tensor, MapScore]:
    """(kept, after), or (original, before) when ``after`` is undefined or its APEM lies
    below the original's by more than ``drop_tolerance``."""
    if after is None or after.apem < before.apem - drop_tolerance(before, after, resolution):
        return original, before
    return kept, after


def _record(
    original: torch.Tensor,
    kept: torch.Tensor,
    before: MapScore | None,
    after: MapScore | None,
    forward_passes: int,
) -> FilteredRecord:
    """kept_fraction: positive entries kept / positive entries of the original (1.0 when the
    original has none). APEMs are NaN when undefined."""
    positive = int((original > 0).sum())
    return FilteredRecord(
        map=kept.detach().cpu().numpy().astype(np.float32),
        kept_fraction=int((kept > 0).sum()) / positive if positive else 1.0,
        apem_before=before.apem if before is not None else math.nan,
        apem_after=after.apem if after is not None else math.nan,
        forward_passes=forward_passes,
    )


def filter_exact(
    probe: Probe,
    relevance: torch.Tensor,
    options: ApemOptions | None = None,
    filter_options: FilterOptions | None = None,
    *,
    field: str = "methods[0]",
    before: MapScore | None = None,
) -> FilteredRecord:
    """Algorithm 2 as written: one APEM per distinct positive value, until the first drop.

    probe: x (C x *spatial) and y; relevance: R in [0, 1] (C x *spatial or 1 x *spatial).
    Costs up to D APEMs (the original's and D - 1 steps', D distinct positive values): for
    small inputs and tests. A map whose APEM is undefined comes back unchanged (APEMs NaN).
    With a ``forward_budget`` (default none), running out raises ResourceExhausted naming
    ``<field>.filter.forward_budget``.
    """
    options = options or default_options(probe.x.numel())
    cap = (filter_options or default_filter_options("exact")).forward_budget
    start = _start(probe, relevance, options, before)
    if start.before is None:
        return _record(relevance, relevance, None, None, start.own())
    cost = map_cost_bound(options)
    best_map, best = relevance, start.before
    best_low = best.apem_low
    values, _ = distinct_positive(relevance)
    for value in values[:-1]:  # the last step, the all-zero map, drops by definition
        candidate = zero_through(relevance, value)
        if cap is not None and start.used() + cost > cap:
            raise ResourceExhausted(
                f"{field}.filter.forward_budget",
                f"the exact filter needs more than {cap} forward passes; use mode 'fast'",
            )
        (score,) = score_maps(start.probe, options.lattice, [candidate])
        if score is None or dropped(score, best_low):
            break
        best_map, best = candidate, score
        best_low = max(best_low, score.apem_low)
    best_map, best = _checked(relevance, best_map, start.before, best, options.resolution)
    return _record(relevance, best_map, start.before, best, start.own())


def filter_fast(
    probe: Probe,
    relevance: torch.Tensor,
    options: ApemOptions | None = None,
    filter_options: FilterOptions | None = None,
    *,
    before: MapScore | None = None,
) -> FilteredRecord:
    """Algorithm 2 on a budgeted subset of its steps (module docstring).

    probe: x (C x *spatial) and y; relevance: R in [0, 1] (C x *spatial or 1 x *spatial).
    Each round scores up to ``CANDIDATES_PER_ROUND`` steps, as many as the remaining
    budget covers at their worst cost (``map_cost_bound``), so the filter's images, its
    gradient and the original's APEM included, never exceed ``forward_budget`` (default
    ``DEFAULT_FORWARD_BUDGET``). Stops when every step below the first known drop is
    evaluated or the budget is spent. A map whose APEM is undefined comes back unchanged
    (APEMs NaN).
    """
    options = options or default_options(probe.x.numel())
    cap = (filter_options or default_filter_options("fast")).forward_budget
    start = _start(probe, relevance, options, before)
    if start.before is None:
        return _record(relevance, relevance, None, None, start.own())
    cost = map_cost_bound(options)
    values, counts = distinct_positive(relevance)
    scores: dict[int, MapScore | None] = {0: start.before}
    drop = len(values)  # the first known drop; M_D (all zero) drops by definition
    while True:
        room = math.inf if cap is None else (cap - start.used()) // cost
        count = int(min(CANDIDATES_PER_ROUND, room))
        if len(scores) == 1:  # first round: an exponential search from the start
            steps = quantile_steps(counts, list(range(1, drop)), count, front_loaded=True)
        else:
            steps = next_steps(scores, counts, drop, count)
        if not steps:
            break
        candidates = [zero_through(relevance, values[k - 1]) for k in steps]
        found = score_maps(start.probe, options.lattice, candidates)
        scores.update(zip(steps, found, strict=True))
        drop = first_known_drop(scores, len(values))
    last = max(k for k in scores if k < drop)
    best_map = relevance if last == 0 else zero_through(relevance, values[last - 1])
    best_map, best = _checked(relevance, best_map, start.before, scores[last], options.resolution)
    return _record(relevance, best_map, start.before, best, start.own())


def filter_map(
    probe: Probe,
    relevance: torch.Tensor,
    options: ApemOptions | None = None,
    filter_options: FilterOptions | None = None,
    *,
    field: str = "methods[0]",
    before: MapScore | None = None,
) -> FilteredRecord:
    """``filter_fast`` or ``filter_exact`` as ``filter_options.mode`` says (default fast).

    options, filter_options: resolved (``resolve_options``, ``resolve_filter_options``);
    field: the request field errors name. The probe's gradient, where another map's APEM of
    the same request computed it, and ``before``, the map's own score from ``apem_many``
    with the same options, are not computed again; the record's ``forward_passes`` then
    count the filter's own images only, while ``forward_budget`` still counts the shared
    ones, so the answer does not depend on whether the map's APEM was asked for too.
    """
    filter_options = filter_options or default_filter_options()
    if filter_options.mode not in MODES:
        raise ValueError(f"unknown filter mode {filter_options.mode!r}; one of {MODES}")
    if filter_options.mode == "exact":
        return filter_exact(probe, relevance, options, filter_options, field=field, before=before)
    return filter_fast(probe, relevance, options, filter_options, before=before)
