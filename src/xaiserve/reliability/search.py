"""The batched eps search: the first flip of argmax f(x + eps * d) away from y on a grid of
eps values, for many directions d in the same forward calls (seed 004, section 3.3).

The seed scans eps = step, 2 step, ... with one forward pass each. Along a direction the
prediction may change and change back, so what is searched for is defined on the grid
(a ``Lattice``): the smallest grid value at which the prediction differs from y. The
search reports it in two rounds, every unfinished direction's values in one forward call:

1. every ``stride``-th grid point (both ends), which sees every run of ``stride`` or more
   consecutive flipped points (a flipped window of relative width ``WINDOW`` or more);
2. every grid point between the last first-round point below the first one that flipped
   and that one.

The answer is the smallest flipped grid point unless a run of fewer than ``stride`` flipped
points lies wholly below the second round's bracket; ``censored`` means no first-round
point flipped (no flipped window of relative width ``WINDOW`` or more on the grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xaiserve.reliability.lattice import Lattice
from xaiserve.reliability.probe import Probe


@dataclass(frozen=True)
class SearchResult:
    """One eps search.

    eps: the smallest grid value seen to flip, eps_max when censored.
    censored: no first-round point flipped (no flipped window of relative width WINDOW on
        the grid).
    resolution_reached: (eps - lower) / eps: the resolution, or 1.0 when the grid's lowest
        point flipped; 0.0 when censored.
    forward_calls: forward calls (rounds) that evaluated images of this direction.
    forward_passes: images of this direction evaluated.
    lower: the grid value below ``eps`` (seen not to flip), 0.0 below the grid's lowest
        point; eps_max when censored.
    """

    eps: float
    censored: bool
    resolution_reached: float
    forward_calls: int
    forward_passes: int
    lower: float = 0.0


def _flips(
    probe: Probe, lattice: Lattice, directions: torch.Tensor, rounds: dict[int, list[int]]
) -> dict[int, list[bool]]:
    """One forward call (several past ``probe.max_images``) for the grid indices
    ``rounds[k]`` of every direction k: per k, whether each flipped."""
    # rows and eps values are CPU bookkeeping: the probe builds its images with numpy
    rows = torch.cat([torch.full((len(r),), k, device="cpu") for k, r in rounds.items()])
    values = [lattice.eps(j) for r in rounds.values() for j in r]
    flipped = probe.flips(
        directions, rows, torch.tensor(values, dtype=torch.float64, device="cpu")
    ).tolist()
    out, offset = {}, 0
    for k, indices in rounds.items():
        out[k] = flipped[offset : offset + len(indices)]
        offset += len(indices)
    return out


def search_first_flips(
    probe: Probe, lattice: Lattice, directions: torch.Tensor
) -> list[SearchResult]:
    """The smallest eps of ``lattice`` with argmax f(x + eps * d) != y, for K directions.

    directions: K x C x *spatial (x's shape). Two rounds (module docstring): the first tries
    ``lattice.first_round()`` for every direction; the second, for each direction that
    flipped above the grid's lowest point, every grid point inside its bracket. Each round
    is one forward call for all directions (several only past ``probe.max_images``).
    A direction costs at most ``lattice.search_bound()`` images.
    """
    x = probe.x
    if directions.shape[1:] != x.shape:
        raise ValueError(f"directions {tuple(directions.shape)} do not match x {tuple(x.shape)}")
    count = directions.shape[0]
    if count == 0:
        return []
    first = lattice.first_round()
    seen = _flips(probe, lattice, directions, dict.fromkeys(range(count), first))
    results: dict[int, SearchResult] = {}
    brackets: dict[int, list[int]] = {}
    for k, hits in seen.items():
        if True not in hits:
            eps_max = lattice.eps_max
            results[k] = SearchResult(eps_max, True, 0.0, 1, len(first), eps_max)
            continue
        at = hits.index(True)
        hi = first[at]
        if at == 0:  # the grid's lowest point flips: nothing below it is on the grid
            results[k] = SearchResult(lattice.eps(hi), False, 1.0, 1, len(first), 0.0)
        elif hi - first[at - 1] == 1:
            results[k] = _found(lattice, hi, 1, len(first))
        else:
            brackets[k] = list(range(first[at - 1] + 1, hi + 1))
    if brackets:
        inside = {k: indices[:-1] for k, indices in brackets.items()}
        for k, hits in _flips(probe, lattice, directions, inside).items():
            hits = [*hits, True]  # the bracket's upper end flipped in the first round
            passes = len(first) + len(hits) - 1
            results[k] = _found(lattice, brackets[k][hits.index(True)], 2, passes)
    return [results[k] for k in range(count)]


def _found(lattice: Lattice, hi: int, calls: int, passes: int) -> SearchResult:
    """A flip at grid index ``hi`` (> 0) whose lower neighbour was seen not to flip."""
    return SearchResult(
        lattice.eps(hi), False, lattice.resolution, calls, passes, lattice.eps(hi - 1)
    )
