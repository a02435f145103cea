"""Adaptive occlusion: a coarse grid of windows first, then finer grid positions only where
the coarse map is high; every other window's drop is interpolated.

Full occlusion evaluates a window at every grid position g (``window_starts`` per axis,
n_1 x ... x n_d positions) and averages each pixel's covering drops. The drops D(g) vary
smoothly with g, so the adaptive mode evaluates a subset and estimates the rest:

1. coarse: every k-th position per axis (k = coarse spacing / stride, the last position
   always included): the level-0 lattice;
2. refinement, level by level (k/2, k/4, ..., 1 positions apart): the unevaluated
   positions of the next lattice are ranked by their interpolated drop and the highest
   are evaluated, in one batch per level, until ``refine_fraction`` of the positions off
   the coarse lattice are spent;
3. the map: evaluated drops where known, interpolated ones elsewhere, accumulated over the
   windows exactly as full occlusion does (a full-resolution map).

The interpolation is hierarchical (piecewise multilinear, as adaptive sparse grids): a
position of level l contributes its surplus (its drop minus the interpolation from the
positions of lower levels) times the multilinear hat of the level-l lattice, which is 1 at
the position and 0 at every other position of level <= l. So the interpolant equals every
evaluated drop, and with the coarse lattice alone it is plain multilinear interpolation.

Forward passes: 1 (the unoccluded input) + coarse positions + refined positions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

Index = tuple[int, ...]


def lattice(n: int, step: int) -> list[int]:
    """Every ``step``-th index of range(n), the last index always included."""
    indices = list(range(0, n, step))
    if indices[-1] != n - 1:
        indices.append(n - 1)
    return indices


def level_steps(coarse_step: int) -> list[int]:
    """Lattice spacings from the coarse one down to 1, halving (rounded up)."""
    steps = [coarse_step]
    while steps[-1] > 1:
        steps.append((steps[-1] + 1) // 2)
    return steps


class Hierarchy:
    """Levels and hats of an n_1 x ... x n_d grid of window positions.

    counts: positions per axis; coarse_step: spacing (in positions) of the level-0 lattice.
    """

    def __init__(self, counts: Sequence[int], coarse_step: int) -> None:
        if coarse_step < 1:
            raise ValueError(f"coarse_step must be >= 1, got {coarse_step}")
        self.counts = tuple(counts)
        steps = level_steps(coarse_step)
        self.levels = len(steps)
        self.axis_level: list[np.ndarray] = []
        self.nodes: list[list[list[int]]] = []  # [axis][level] -> nodes of level <= lev
        for n in self.counts:
            level = np.full(n, -1)
            for lev, step in enumerate(steps):
                for i in lattice(n, step):
                    if level[i] < 0:
                        level[i] = lev
            self.axis_level.append(level)
            self.nodes.append([np.flatnonzero(level <= lev).tolist() for lev in range(len(steps))])
        self._hats: dict[tuple[int, int, int], np.ndarray] = {}
        self.grid = functools.reduce(np.maximum, np.ix_(*self.axis_level))
        """The level of every position, n_1 x ... x n_d."""

    def level(self, index: Index) -> int:
        """The level of a position: the coarsest lattice holding it."""
        return int(self.grid[index])

    def positions(self, level: int) -> list[Index]:
        """Every position of exactly ``level``, in index order."""
        return [tuple(int(i) for i in p) for p in np.argwhere(self.grid == level)]

    def _hat(self, axis: int, level: int, i: int) -> np.ndarray:
        """The 1-D hat of node i on the level's nodes of ``axis`` (n values)."""
        key = (axis, level, i)
        if key not in self._hats:
            self._hats[key] = self._make_hat(axis, level, i)
        return self._hats[key]

    def _make_hat(self, axis: int, level: int, i: int) -> np.ndarray:
        n, nodes = self.counts[axis], self.nodes[axis][level]
        hat = np.zeros(n)
        hat[i] = 1.0
        k = nodes.index(i)
        if k > 0:
            a = nodes[k - 1]
            hat[a + 1 : i] = (np.arange(a + 1, i) - a) / (i - a)
        if k < len(nodes) - 1:
            b = nodes[k + 1]
            hat[i + 1 : b] = (b - np.arange(i + 1, b)) / (b - i)
        return hat

    def interpolate(self, known: dict[Index, float]) -> np.ndarray:
        """The hierarchical interpolant (module docstring) of ``known`` drops on the grid,
        n_1 x ... x n_d float64; exact at every known position."""
        estimate = np.zeros(self.counts)
        for index in sorted(known, key=lambda p: (self.level(p), p)):
            surplus = known[index] - estimate[index]
            if surplus == 0.0:
                continue
            level = self.level(index)
            hats = [self._hat(axis, level, i) for axis, i in enumerate(index)]
            estimate += surplus * functools.reduce(np.multiply.outer, hats)
        return estimate


def refined_count(off_coarse: int, refine_fraction: float) -> int:
    """Positions refined: ``refine_fraction`` of the ``off_coarse`` positions off the
    coarse lattice."""
    return round(refine_fraction * off_coarse)


def positions_evaluated(counts: Sequence[int], coarse_step: int, refine_fraction: float) -> int:
    """The positions ``adaptive_drops`` evaluates on a grid of ``counts`` positions per
    axis: the coarse lattice (``lattice`` of every axis at ``coarse_step``) and
    ``refined_count`` of the rest (the refinement levels end at spacing 1, which holds
    every position, so the refinement spends all of its count)."""
    total = math.prod(counts)
    coarse = math.prod(len(lattice(n, coarse_step)) for n in counts)
    return coarse + refined_count(total - coarse, refine_fraction)


def adaptive_drops(
    evaluate: Callable[[list[Index]], torch.Tensor],
    counts: Sequence[int],
    coarse_step: int,
    refine_fraction: float,
) -> tuple[np.ndarray, int]:
    """Drops of every window position, evaluated on the coarse lattice and where refined,
    interpolated elsewhere (module docstring).

    evaluate: positions -> their drops (one counted forward batch per call); counts:
    positions per axis. Returns (drops n_1 x ... x n_d, positions evaluated).
    """
    hierarchy = Hierarchy(counts, coarse_step)
    coarse = hierarchy.positions(0)
    known = dict(zip(coarse, evaluate(coarse).tolist(), strict=True))
    evaluated = hierarchy.grid == 0
    left = refined_count(int((~evaluated).sum()), refine_fraction)
    for level in range(1, hierarchy.levels):
        if left <= 0:
            break
        open_ = ~evaluated & (hierarchy.grid <= level)
        take = min(left, int((open_ & (hierarchy.grid == level)).sum()))
        if take == 0:
            continue
        candidates = np.argwhere(open_)  # index order
        estimate = hierarchy.interpolate(known)[open_]
        order = np.argsort(-estimate, kind="stable")[:take]  # highest first, ties in order
        chosen = [tuple(int(i) for i in candidates[k]) for k in order]
        known.update(zip(chosen, evaluate(chosen).tolist(), strict=True))
        for p in chosen:
            evaluated[p] = True
        left -= take
    return hierarchy.interpolate(known), len(known)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two maps of the same shape (ties: average ranks)."""
    return float(torch.corrcoef(torch.stack([_ranks(a.flatten()), _ranks(b.flatten())]))[0, 1])


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of ``values`` (float64), tied values sharing their average rank."""
    values = values.double()
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() + 1) / 2  # 0-based average rank of each distinct value
    return average[inverse]
