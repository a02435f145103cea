"""The eps lattice APEM's searches report on, and the indices each round tries.

A search evaluates many eps values per forward call on a geometric ``Lattice`` whose
neighbours differ by the resolution: a grid over [eps_max * GEOMETRIC_SPAN, eps_max] first,
then grids splitting the bracket [last not flipped, first flipped] until
(hi - lo) / hi <= resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

DEFAULT_BATCH = 12
"""eps values per direction per forward call: 12 reach 1% in 3 calls from a 1e-6 span."""
GEOMETRIC_SPAN = 1e-6
"""The first grid covers [eps_max * GEOMETRIC_SPAN, eps_max] geometrically (lower flips
are still found, one round later)."""
HINT_WIDTH = 1.5
"""A hinted search (an eps known for a similar map) starts over [hint / 1.5, hint * 1.5]."""


@dataclass(frozen=True)
class Lattice:
    """The eps values a search may report: e_j = eps_max * q^(top - j), q = 1 - resolution.

    e_top = eps_max; e_0 is about eps_max * GEOMETRIC_SPAN; j < 0 continue below. Neighbours
    differ by the resolution (relative), so the first flipped lattice value brackets the
    flip to it. Searches on one lattice report the same value for a flip that is monotone in
    eps whatever grids they tried (hinted or not), so APEMs of similar maps compare cleanly.
    """

    eps_max: float
    resolution: float

    @cached_property
    def log_q(self) -> float:
        return math.log1p(-self.resolution)

    @cached_property
    def top(self) -> int:
        return math.ceil(math.log(GEOMETRIC_SPAN) / self.log_q)

    def eps(self, j: int) -> float:
        return self.eps_max * math.exp((self.top - j) * self.log_q)

    def index(self, eps: float) -> int:
        """The lattice index nearest ``eps`` (> 0)."""
        return self.top - round(math.log(eps / self.eps_max) / self.log_q)

    def width(self, steps: int) -> float:
        """The relative width (hi - lo) / hi of a bracket ``steps`` indices wide."""
        return self.resolution if steps == 1 else -math.expm1(steps * self.log_q)

    def hint_width(self) -> int:
        """Indices spanning a factor HINT_WIDTH."""
        return math.ceil(math.log(HINT_WIDTH) / -self.log_q)


def calls_needed(resolution: float, batch: int = DEFAULT_BATCH) -> int:
    """Forward calls for a flip inside the first grid to reach ``resolution`` (worst case)."""
    gap = math.ceil(Lattice(1.0, resolution).top / (batch - 1))
    calls = 1
    while gap > 1:
        gap = 1 if gap - 1 <= batch else math.ceil(gap / (batch + 1))
        calls += 1
    return calls


def max_calls_for(resolution: float, batch: int = DEFAULT_BATCH) -> int:
    """The default cap on calls per direction: ``calls_needed`` plus one spare round (a flip
    below the first grid, or outside a hint's window, needs another wide grid)."""
    return calls_needed(resolution, batch) + 1


def spread(start: int, stop: int, count: int) -> list[int]:
    """Up to ``count`` distinct integers evenly spread over [start, stop], both included."""
    if stop - start + 1 <= count:
        return list(range(start, stop + 1))
    return sorted({start + round((stop - start) * i / (count - 1)) for i in range(count)})


def next_indices(
    lo: int | None, hi: int | None, top: int, batch: int, hint: int | None, width: int
) -> list[int]:
    """Lattice indices of the next round, ascending (lo: largest known not to flip; hi:
    smallest known to flip; None: not known).

    - first round with a hint: ``batch`` indices over [hint - width, min(hint + width, top)];
    - first round: ``batch`` indices over [0, top] (geometric over [eps_max * span, eps_max]);
    - no flip seen yet: over (lo, top];
    - flipped at hi, nothing below seen: over [hi - top, hi);
    - bracket (lo, hi): ``batch`` indices splitting it evenly, or all of its inside.
    """
    if hint is not None:
        return spread(min(hint, top) - width, min(hint + width, top), batch)
    if hi is None:
        return spread(0, top, batch) if lo is None else spread(lo + 1, top, batch)
    if lo is None:
        return spread(hi - top, hi - 1, batch)
    if hi - lo - 1 <= batch:
        return list(range(lo + 1, hi))
    return sorted({lo + round((hi - lo) * i / (batch + 1)) for i in range(1, batch + 1)})
