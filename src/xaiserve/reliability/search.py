"""The batched eps search: the first flip of argmax f(x + eps * d) away from y, for many
directions d in the same forward calls (seed 004, section 3.3, on a lattice).

The seed scans eps = step, 2 step, ... with one forward pass each. ``search_first_flips``
evaluates ``batch`` eps values per direction per round on a ``Lattice`` and puts every
unfinished direction's values into one forward call, so a request's maps, their
irrelevances, shuffles and filter candidates all search together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from xaiserve.reliability.lattice import Lattice, max_calls_for, next_indices
from xaiserve.reliability.probe import Probe


@dataclass(frozen=True)
class SearchResult:
    """One eps search.

    eps: the smallest eps seen to flip (the bracket's upper end), eps_max when censored.
    censored: no flip up to eps_max.
    resolution_reached: (eps - lower) / eps of the final bracket; 0.0 when censored.
    forward_calls: forward calls (rounds) that evaluated images of this direction.
    forward_passes: images of this direction evaluated.
    lower: the largest eps seen not to flip below ``eps`` (0.0 if none); eps_max if censored.
    """

    eps: float
    censored: bool
    resolution_reached: float
    forward_calls: int
    forward_passes: int
    lower: float = 0.0


@dataclass
class _Direction:
    """One direction's search so far: lattice indices ``lo`` (the largest seen not to flip)
    and ``hi`` (the smallest seen to flip), None while unknown; the rounds and images it
    took; the lattice index of its hint, used by its first round only."""

    hint: int | None
    lo: int | None = None
    hi: int | None = None
    calls: int = 0
    passes: int = 0

    def indices(self, lattice: Lattice, batch: int) -> list[int]:
        """The lattice indices of this direction's next round, ascending."""
        hint = self.hint if self.calls == 0 else None
        return next_indices(self.lo, self.hi, lattice.top, batch, hint, lattice.hint_width())

    def update(self, indices: list[int], hits: list[bool]) -> None:
        """Narrows the bracket with one round's outcomes (``hits[i]``: ``indices[i]``
        flipped)."""
        self.calls += 1
        self.passes += len(indices)
        if True in hits:
            first = hits.index(True)
            self.hi = indices[first]
            if first > 0:
                self.lo = indices[first - 1]
        else:
            self.lo = indices[-1]

    def unfinished(self, top: int, cap: int) -> bool:
        """No flip seen yet and eps_max not tried (after a hinted round), or a bracket wider
        than one lattice step with rounds left under ``cap``."""
        if self.hi is None:
            return self.lo != top
        return (self.lo is None or self.hi - self.lo > 1) and self.calls < cap

    def result(self, lattice: Lattice) -> SearchResult:
        if self.hi is None:
            eps_max = lattice.eps_max
            return SearchResult(eps_max, True, 0.0, self.calls, self.passes, eps_max)
        lower = 0.0 if self.lo is None else lattice.eps(self.lo)
        width = 1.0 if self.lo is None else lattice.width(self.hi - self.lo)
        return SearchResult(lattice.eps(self.hi), False, width, self.calls, self.passes, lower)


def search_first_flips(
    probe: Probe,
    lattice: Lattice,
    directions: torch.Tensor,
    hints: Sequence[float | None] | None = None,
    max_calls: int | None = None,
) -> list[SearchResult]:
    """The first flip of argmax f(x + eps * d) away from y, for K directions at once.

    directions: K x C x *spatial (x's shape). eps runs over ``lattice`` (relative spacing
    ``resolution``): the first round tries ``probe.batch`` values geometric over
    [eps_max * GEOMETRIC_SPAN, eps_max], later rounds split the bracket [last not flipped,
    first flipped] evenly until the two are neighbours, i.e. (hi - lo) / hi <= resolution.
    Every round puts all unfinished directions' values into one forward call (several only
    past ``probe.max_images`` images). A direction also stops when nothing flips up to
    eps_max (censored) or after ``max_calls`` rounds (default ``max_calls_for``; the bracket
    is then wider, as ``resolution_reached`` says). hints: per direction an eps expected
    near its flip (a similar map's), or None; a hinted first round searches a factor
    HINT_WIDTH around it instead.
    """
    batch, x = probe.batch, probe.x
    if batch < 2:
        raise ValueError(f"batch must be >= 2, got {batch}")
    if directions.shape[1:] != x.shape:
        raise ValueError(f"directions {tuple(directions.shape)} do not match x {tuple(x.shape)}")
    if hints is not None and len(hints) != directions.shape[0]:
        raise ValueError(f"{len(hints)} hints for {directions.shape[0]} directions")
    cap = max_calls if max_calls is not None else max_calls_for(lattice.resolution, batch)
    states = [
        _Direction(lattice.index(hint) if hint is not None and hint > 0 else None)
        for hint in (hints if hints is not None else [None] * directions.shape[0])
    ]
    active = list(range(len(states)))
    while active:
        rounds = [states[k].indices(lattice, batch) for k in active]
        # rows and eps values are CPU bookkeeping: the probe builds its images with numpy
        rows = torch.cat(
            [torch.full((len(r),), k, device="cpu") for k, r in zip(active, rounds, strict=True)]
        )
        values = [lattice.eps(j) for r in rounds for j in r]
        eps = torch.tensor(values, dtype=torch.float64, device="cpu")
        flipped = probe.flips(directions, rows, eps).tolist()
        offset = 0
        for k, indices in zip(active, rounds, strict=True):
            states[k].update(indices, flipped[offset : offset + len(indices)])
            offset += len(indices)
        active = [k for k in active if states[k].unfinished(lattice.top, cap)]
    return [state.result(lattice) for state in states]
