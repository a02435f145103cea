"""The eps grid APEM's searches report on, and the points each of their two rounds tries.

A search's grid is a geometric ``Lattice`` from about eps_max * GEOMETRIC_SPAN to eps_max
whose neighbours differ by the resolution. Its first round tries every ``stride``-th
point (both ends included), so any run of ``stride`` or more consecutive flipped points (a
flipped window of relative width WINDOW or more) holds one of them; its second round tries
every point between the last point of the first round that did not flip and the first that
did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

GEOMETRIC_SPAN = 1e-6
"""The grid covers [eps_max * GEOMETRIC_SPAN, eps_max] (its lowest point is at most one
step below)."""
WINDOW = 0.2
"""The narrowest flipped window a search is guaranteed to see, as a relative width
(hi - lo) / hi: every eps in [0.8 e, e] flips for some e on the grid. Narrower windows are
seen only when they lie in the bracket the second round scans (``docs/apem.md``)."""


@dataclass(frozen=True)
class Lattice:
    """The eps values a search may try and report: e_j = eps_max * q^(top - j), q = 1 -
    resolution, j = 0 .. top (e_top = eps_max, e_0 <= eps_max * GEOMETRIC_SPAN).

    Neighbours differ by the resolution (relative), so the first flipped point brackets
    the flip to it. Every search on one lattice tries the same points for the same
    outcomes, so searches of similar maps, alone or batched together, compare cleanly.
    """

    eps_max: float
    resolution: float

    @cached_property
    def log_q(self) -> float:
        return math.log1p(-self.resolution)

    @cached_property
    def top(self) -> int:
        return math.ceil(math.log(GEOMETRIC_SPAN) / self.log_q)

    @cached_property
    def stride(self) -> int:
        """Grid steps between the first round's points: the most with q^stride >= 1 -
        WINDOW, so a window of relative width WINDOW spans at least ``stride`` steps and
        holds ``stride`` consecutive points (at least 1)."""
        return max(1, math.floor(math.log1p(-WINDOW) / self.log_q * (1 + 1e-12)))

    def eps(self, j: int) -> float:
        return self.eps_max * math.exp((self.top - j) * self.log_q)

    def width(self, steps: int) -> float:
        """The relative width (hi - lo) / hi of a bracket ``steps`` indices wide."""
        return self.resolution if steps == 1 else -math.expm1(steps * self.log_q)

    def first_round(self) -> list[int]:
        """Indices of the first round, ascending: top, top - stride, ... down to 0, and 0
        (consecutive points at most ``stride`` apart)."""
        return sorted(set(range(self.top, -1, -self.stride)) | {0})

    def search_bound(self) -> int:
        """The most points one search tries: the first round and a full second round."""
        return len(self.first_round()) + self.stride - 1
