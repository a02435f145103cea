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
from adding up, so the result's APEM is at least the original's minus what the brackets
blur, resolution * (eps_plus of the original + eps_minus of the result). A map whose APEM
is undefined (all zero) drops.

- ``filter_exact``: the path step by step, one APEM per distinct value (small inputs, tests).
- ``filter_fast`` (the served default): evaluates a subset of the steps, in rounds whose
  candidates are scored in the same forward calls (their eps searches start from the
  nearest evaluated step's eps), within a forward-pass budget. The first round is an
  exponential search from the start of the path (steps removing 1, r, r^2, ... entries);
  later rounds refine the gaps between evaluated steps below the first known drop, riskiest
  first (``next_steps``). The answer is chosen as the exact algorithm would on the steps
  seen: the last evaluated step before the first one that drops against the steps before
  it. With a budget that covers every step below the drop it is the exact answer (eps
  values lie on one lattice, so hinted and unhinted searches agree where flips are
  monotone in eps).

Maps are C x *spatial or 1 x *spatial in [0, 1] (``relevance_from_map`` of any stage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from xaiserve.api.errors import InvalidArgument, ResourceExhausted
from xaiserve.api.types import FilteredRecord, FilterRequest, ReliabilityRequest
from xaiserve.reliability.apem import (
    DEFAULT_BATCH,
    ApemOptions,
    Forward,
    MapScore,
    SharedGradient,
    check_relevance,
    map_cost_bound,
    resolve_options,
    score_maps,
    undefined_at,
    undefined_reason,
)
from xaiserve.runtime.forward.counted import Budget

STAGE = "apem_filter"
MODES = ("fast", "exact")
DEFAULT_FORWARD_BUDGET = 4096
"""Images the fast filter may evaluate, its gradient and original APEM included. A cap, not
a cost: on 12 x 12 test maps the fast filter spent about 1,200 on average; with a cap of
2048 one map in 16 ran out before matching the exact result (IoU 0.71), with 3072 and
4096 all 16 matched it."""
CANDIDATES_PER_ROUND = 8


@dataclass(frozen=True)
class FilterOptions:
    """Resolved filter options; ``forward_budget`` None: no cap of the filter's own."""

    mode: str
    forward_budget: int | None


def minimum_budget(options: ApemOptions, batch: int = DEFAULT_BATCH) -> int:
    """The gradient, the original's APEM and one candidate's, at their worst."""
    return 1 + 2 * map_cost_bound(options, batch)


def filter_cost_bound(
    filter_options: FilterOptions,
    options: ApemOptions,
    entries: int,
    batch: int = DEFAULT_BATCH,
) -> int:
    """The most images ``filter_map`` evaluates for a map of ``entries`` values, its
    gradient and the original's APEM included (when they are shared with the map's APEM
    record, the filter spends less).

    Either mode scores each step of the path at most once: the original and the distinct
    positive values but the last, at most ``entries`` APEMs in all. The gradient and the
    original's APEM (``1 + map_cost_bound``) run before the filter looks at its
    ``forward_budget``; after them neither mode passes the budget (fast stops, exact
    refuses), so a budget caps the rest.
    """
    cost = map_cost_bound(options, batch)
    path = 1 + max(1, entries) * cost
    cap = filter_options.forward_budget
    return path if cap is None else min(path, max(cap, 1 + cost))


def resolve_filter_options(
    request: FilterRequest | None,
    options: ApemOptions,
    *,
    batch: int = DEFAULT_BATCH,
    field: str = "methods[0]",
) -> FilterOptions:
    """Validates the mode and the budget; errors name ``<field>.filter.<option>``.

    fast: forward_budget defaults to ``DEFAULT_FORWARD_BUDGET``; exact: no cap unless given
    (the request's own forward-pass limit still applies).
    """
    request = request or FilterRequest()
    if request.mode not in MODES:
        raise InvalidArgument(
            f"{field}.filter.mode", f"unknown mode {request.mode!r}; use one of {MODES}"
        )
    given = request.forward_budget
    if given is None:
        default = DEFAULT_FORWARD_BUDGET if request.mode == "fast" else None
        return FilterOptions(request.mode, default)
    name = f"{field}.filter.forward_budget"
    if isinstance(given, bool) or not isinstance(given, int):
        raise InvalidArgument(name, f"must be an integer, got {given!r}")
    least = minimum_budget(options, batch)
    if given < least:
        raise InvalidArgument(
            name,
            f"must be at least {least} forward passes (the gradient, the original's APEM and "
            f"one candidate's at resolution {options.resolution:g}), got {given}",
        )
    return FilterOptions(request.mode, given)


# ---------------------------------------------------------------------------- path parts


def distinct_positive(relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_1 < ... < v_D, entries equal to each): the steps of Algorithm 2's path."""
    values, counts = torch.unique(relevance[relevance > 0], sorted=True, return_counts=True)
    return values, counts


def zero_through(relevance: torch.Tensor, value: float | torch.Tensor) -> torch.Tensor:
    """M_k: R with every entry <= value set to 0 (same shape)."""
    return torch.where(relevance > value, relevance, torch.zeros_like(relevance))


def dropped(score: MapScore | None, best_low: float) -> bool:
    """The drop rule: APEM certainly below the best accepted (undefined APEM drops)."""
    return score is None or score.apem_high < best_low


def quantile_steps(
    counts: torch.Tensor, open_steps: list[int], count: int, front_loaded: bool = False
) -> list[int]:
    """Up to ``count`` of ``open_steps`` at quantile levels of the entries they remove.

    counts: entries per distinct value (``distinct_positive``); step k removes the entries
    of v_k. Levels are equally spaced in removed entries, or, ``front_loaded``, geometric
    (1, r, r^2, ... entries: an exponential search from the start of the path). All of
    ``open_steps`` when there are at most ``count``.
    """
    if len(open_steps) <= count:
        return list(open_steps)
    cumulative = counts[torch.tensor(open_steps) - 1].double().cumsum(0)
    fractions = torch.arange(1, count + 1, dtype=torch.float64) / (count + 1)
    total = cumulative[-1]
    levels = total**fractions if front_loaded else total * fractions
    picks = torch.searchsorted(cumulative, levels).clamp(max=len(open_steps) - 1)
    return sorted({open_steps[int(i)] for i in picks})


def nearest_score(scores: dict[int, MapScore | None], step: int) -> MapScore | None:
    """The defined score of the evaluated step nearest ``step`` (a hint for its search)."""
    known = [k for k, score in scores.items() if score is not None]
    return scores[min(known, key=lambda k: (abs(k - step), k))] if known else None


def next_steps(
    scores: dict[int, MapScore | None], counts: torch.Tensor, end: int, count: int
) -> list[int]:
    """Up to ``count`` unevaluated steps below ``end`` (the first known drop), riskiest
    gaps first.

    A gap is a run of unevaluated steps between evaluated ones a < b. A step inside it
    changes the answer if it dips (its APEM certainly below the best accepted so far, T) or
    spikes (raising T above the APEM of an evaluated step after it, F = the smallest
    ``apem_high`` from b on). Its slack is the smaller distance of its ends from these:
    ``min(high(a), high(b)) - T`` and ``F - max(low(a), low(b))``; its risk is the entries it
    removes per unit of slack. The bracket before the known drop has infinite risk; the
    unexplored tail (no drop known) only dips. Points are dealt to gaps round-robin in order
    of risk and placed at quantile levels inside each gap, so gaps between comfortable
    neighbours are refined last.
    """
    ends = sorted(k for k in scores if k < end)
    floors = [math.inf] * (len(ends) + 1)
    for i in range(len(ends) - 1, -1, -1):
        floors[i] = min(floors[i + 1], scores[ends[i]].apem_high)
    gaps = []
    best_low = -math.inf
    for i, a in enumerate(ends):
        score_a = scores[a]
        best_low = max(best_low, score_a.apem_low)
        b = ends[i + 1] if i + 1 < len(ends) else end
        if b - a <= 1:
            continue
        if b < end:
            score_b = scores[b]
            dip = min(score_a.apem_high, score_b.apem_high) - best_low
            spike = floors[i + 1] - max(score_a.apem_low, score_b.apem_low)
            slack = min(dip, spike)
        elif end in scores:  # the bracket before the first known drop
            slack = -math.inf
        else:  # the tail: nothing evaluated after it
            slack = score_a.apem_high - best_low
        entries = float(counts[a : b - 1].sum())
        risk = math.inf if slack <= 0 else entries / slack
        gaps.append((-risk, a, b))
    gaps.sort()
    dealt = [0] * len(gaps)
    left = count
    while left > 0:
        before = left
        for i, (_, a, b) in enumerate(gaps):
            if left > 0 and dealt[i] < b - a - 1:
                dealt[i] += 1
                left -= 1
        if left == before:
            break
    steps = []
    for n, (_, a, b) in zip(dealt, gaps):
        if n:
            steps += quantile_steps(counts, list(range(a + 1, b)), n)
    return sorted(steps)


def first_known_drop(scores: dict[int, MapScore | None], end: int) -> int:
    """The first evaluated step that drops against the evaluated steps before it (``end``
    when none does). scores: step -> score, step 0 (the original) included."""
    best_low = -math.inf
    for k in sorted(scores):
        score = scores[k]
        if k > 0 and dropped(score, best_low):
            return k
        best_low = max(best_low, score.apem_low)
    return end


# ------------------------------------------------------------------------------ filters


@dataclass
class _Setup:
    options: ApemOptions
    filter_options: FilterOptions
    sign: torch.Tensor | None
    before: MapScore | None
    reason: str
    inherited: int = 0
    """Passes of the gradient and the original's searches done before the filter (by the
    map's APEM, ``Shared``): they count toward the filter's ``forward_budget`` as if it
    had spent them, so it answers the same with or without them."""


@dataclass(frozen=True)
class Shared:
    """Work the filter can take from the map's APEM in the same request instead of
    repeating it: the gradient of x and y (``apem.SharedGradient``), and ``before``, the
    map's own score from ``apem.apem_many`` with the same options (its searches are the
    ones the filter would run for the original)."""

    gradient: SharedGradient | None = None
    before: MapScore | None = None


def _setup(
    forward: Forward,
    module: nn.Module,
    x: torch.Tensor,
    y: int,
    relevance: torch.Tensor,
    options: ReliabilityRequest | None,
    request: FilterRequest | None,
    mode: str,
    budget: Budget,
    batch: int,
    field: str,
    shared: Shared,
) -> _Setup:
    """Options, the gradient sign and the original's score (or why it is undefined)."""
    resolved = resolve_options(options, x.numel(), field)
    request = replace(request or FilterRequest(), mode=mode)
    filter_options = resolve_filter_options(request, resolved, batch=batch, field=field)
    check_relevance(relevance, x)
    reason = undefined_reason(relevance)
    if reason:
        return _Setup(resolved, filter_options, None, None, reason)
    gradient = shared.gradient or SharedGradient(module, x, y, budget, STAGE)
    inherited = int(gradient.computed)
    sign, logits = gradient.get()
    reason = undefined_at(sign, logits, y)
    if reason:
        return _Setup(resolved, filter_options, None, None, reason)
    before = shared.before
    if before is None:
        (before,) = score_maps(forward, x, y, [relevance], sign, resolved, batch=batch, stage=STAGE)
    else:
        inherited += before.minus.forward_passes + before.plus.forward_passes
    return _Setup(resolved, filter_options, sign, before, "", inherited)


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
        map=kept.detach().numpy().astype(np.float32),
        kept_fraction=int((kept > 0).sum()) / positive if positive else 1.0,
        apem_before=before.apem if before is not None else math.nan,
        apem_after=after.apem if after is not None else math.nan,
        forward_passes=forward_passes,
    )


def filter_exact(
    forward: Forward,
    module: nn.Module,
    x: torch.Tensor,
    y: int,
    relevance: torch.Tensor,
    options: ReliabilityRequest | None = None,
    *,
    request: FilterRequest | None = None,
    budget: Budget,
    batch: int = DEFAULT_BATCH,
    field: str = "methods[0]",
    shared: Shared | None = None,
) -> FilteredRecord:
    """Algorithm 2 as written: one APEM per distinct positive value, until the first drop.

    x: C x *spatial; relevance: R in [0, 1] (C x *spatial or 1 x *spatial). Costs up to
    D APEMs (the original's and D - 1 steps', D distinct positive values): for small
    inputs and tests. A map whose APEM
    is undefined comes back unchanged (APEMs NaN). With a ``forward_budget``, running out
    raises ResourceExhausted naming ``<field>.filter.forward_budget``.
    """
    spent = budget.spent
    setup = _setup(
        forward,
        module,
        x,
        y,
        relevance,
        options,
        request,
        "exact",
        budget,
        batch,
        field,
        shared or Shared(),
    )
    if setup.reason:
        return _record(relevance, relevance, None, None, budget.spent - spent)
    cap = setup.filter_options.forward_budget
    cost = map_cost_bound(setup.options, batch)
    best_map, best = relevance, setup.before
    best_low = best.apem_low
    values, _ = distinct_positive(relevance)
    for value in values[:-1]:  # the last step, the all-zero map, drops by definition
        candidate = zero_through(relevance, value)
        if cap is not None and budget.spent - spent + setup.inherited + cost > cap:
            raise ResourceExhausted(
                f"{field}.filter.forward_budget",
                f"the exact filter needs more than {cap} forward passes; use mode 'fast'",
            )
        (score,) = score_maps(
            forward, x, y, [candidate], setup.sign, setup.options, batch=batch, stage=STAGE
        )
        if dropped(score, best_low):
            break
        best_map, best = candidate, score
        best_low = max(best_low, score.apem_low)
    return _record(relevance, best_map, setup.before, best, budget.spent - spent)


def filter_fast(
    forward: Forward,
    module: nn.Module,
    x: torch.Tensor,
    y: int,
    relevance: torch.Tensor,
    options: ReliabilityRequest | None = None,
    *,
    request: FilterRequest | None = None,
    budget: Budget,
    batch: int = DEFAULT_BATCH,
    field: str = "methods[0]",
    shared: Shared | None = None,
) -> FilteredRecord:
    """Algorithm 2 on a budgeted subset of its steps (module docstring).

    x: C x *spatial; relevance: R in [0, 1] (C x *spatial or 1 x *spatial). Each round
    scores up to ``CANDIDATES_PER_ROUND`` steps, as many as the remaining budget covers at
    their worst cost (``map_cost_bound``), so the filter's images, its gradient and the
    original's APEM included, never exceed ``forward_budget``. Stops when every step below
    the first known drop is evaluated or the budget is spent. A map whose APEM is undefined
    comes back unchanged (APEMs NaN).
    """
    spent = budget.spent
    setup = _setup(
        forward,
        module,
        x,
        y,
        relevance,
        options,
        request,
        "fast",
        budget,
        batch,
        field,
        shared or Shared(),
    )
    if setup.reason:
        return _record(relevance, relevance, None, None, budget.spent - spent)
    cap = setup.filter_options.forward_budget
    cost = map_cost_bound(setup.options, batch)
    values, counts = distinct_positive(relevance)
    scores: dict[int, MapScore | None] = {0: setup.before}
    drop = len(values)  # the first known drop; M_D (all zero) drops by definition
    while True:
        used = budget.spent - spent + setup.inherited
        room = math.inf if cap is None else (cap - used) // cost
        count = int(min(CANDIDATES_PER_ROUND, room))
        if len(scores) == 1:  # first round: an exponential search from the start
            steps = quantile_steps(counts, list(range(1, drop)), count, front_loaded=True)
        else:
            steps = next_steps(scores, counts, drop, count)
        if not steps:
            break
        candidates = [zero_through(relevance, values[k - 1]) for k in steps]
        found = score_maps(
            forward,
            x,
            y,
            candidates,
            setup.sign,
            setup.options,
            batch=batch,
            stage=STAGE,
            hints=[nearest_score(scores, k) for k in steps],
        )
        scores.update(zip(steps, found))
        drop = first_known_drop(scores, len(values))
    last = max(k for k in scores if k < drop)
    best_map = relevance if last == 0 else zero_through(relevance, values[last - 1])
    best = scores[last]
    return _record(relevance, best_map, setup.before, best, budget.spent - spent)


def filter_map(
    forward: Forward,
    module: nn.Module,
    x: torch.Tensor,
    y: int,
    relevance: torch.Tensor,
    options: ReliabilityRequest | None = None,
    *,
    request: FilterRequest | None = None,
    budget: Budget,
    batch: int = DEFAULT_BATCH,
    field: str = "methods[0]",
    shared: Shared | None = None,
) -> FilteredRecord:
    """``filter_fast`` or ``filter_exact`` as ``request.mode`` says (default fast).

    shared: the gradient and the original's score from the map's APEM in the same request
    (``Shared``), not computed again; the record's ``forward_passes`` then count the
    filter's own images only, while ``forward_budget`` still counts the shared ones, so
    the answer does not depend on whether the map's APEM was asked for too.
    """
    request = request or FilterRequest()
    if request.mode not in MODES:
        raise InvalidArgument(
            f"{field}.filter.mode", f"unknown mode {request.mode!r}; use one of {MODES}"
        )
    run = filter_exact if request.mode == "exact" else filter_fast
    return run(
        forward,
        module,
        x,
        y,
        relevance,
        options,
        request=request,
        budget=budget,
        batch=batch,
        field=field,
        shared=shared,
    )
