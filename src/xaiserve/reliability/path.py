"""Algorithm 2's path of maps and the choice of its steps (seed 004, section 3.2).

With the distinct positive values v_1 < ... < v_D of R, Algorithm 2's maps form one path

    M_0 = R,   M_k = R with every entry <= v_k set to 0   (M_D is all zero: a drop)

A step *drops* when its APEM is certainly lower than the best accepted one: its
``apem_high`` is below the largest ``apem_low`` of the maps accepted so far (``filter``'s
docstring says why). The fast filter evaluates a subset of the steps: ``quantile_steps``
for its first round, ``next_steps`` after, ``first_known_drop`` to read the answer.
"""

from __future__ import annotations

import math

import torch

from xaiserve.reliability.score import MapScore


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
    device = counts.device
    cumulative = counts[torch.tensor(open_steps, device=device) - 1].double().cumsum(0)
    fractions = torch.arange(1, count + 1, dtype=torch.float64, device=device) / (count + 1)
    total = cumulative[-1]
    levels = total**fractions if front_loaded else total * fractions
    picks = torch.searchsorted(cumulative, levels).clamp(max=len(open_steps) - 1)
    return sorted({open_steps[int(i)] for i in picks})


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
    neighbours are refined last. Steps below ``end`` have defined scores (an undefined one
    drops, so ``end`` is at most its step).
    """
    defined = {k: score for k, score in scores.items() if k < end and score is not None}
    ends = sorted(defined)
    floors = [math.inf] * (len(ends) + 1)
    for i in range(len(ends) - 1, -1, -1):
        floors[i] = min(floors[i + 1], defined[ends[i]].apem_high)
    gaps = []
    best_low = -math.inf
    for i, a in enumerate(ends):
        score_a = defined[a]
        best_low = max(best_low, score_a.apem_low)
        b = ends[i + 1] if i + 1 < len(ends) else end
        if b - a <= 1:
            continue
        if b < end:
            score_b = defined[b]
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
    for n, (_, a, b) in zip(dealt, gaps, strict=True):
        if n:
            steps += quantile_steps(counts, list(range(a + 1, b)), n)
    return sorted(steps)


def first_known_drop(scores: dict[int, MapScore | None], end: int) -> int:
    """The first evaluated step that drops against the evaluated steps before it (``end``
    when none does). scores: step -> score, step 0 (the original) included."""
    best_low = -math.inf
    for k in sorted(scores):
        score = scores[k]
        if score is None or (k > 0 and dropped(score, best_low)):
            return k
        best_low = max(best_low, score.apem_low)
    return end
