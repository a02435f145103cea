"""What the eps search finds when flips are not monotone in eps: the smallest flipped point
of its grid, every flipped window of relative width WINDOW seen, censored only when no
first-round point flips, and agreement with a dense scan of the grid."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from support.apem_reference import (
    CountingForward,
    dense_first_flip,
    dense_grid,
    loss_gradient_sign,
    predicted,
    probe_of,
    saliency_map,
)
from support.tiny_models import make_context, tiny_served
from xaiserve.reliability.lattice import WINDOW, Lattice
from xaiserve.reliability.options import DEFAULT_RESOLUTION as RES
from xaiserve.reliability.score import directed, irrelevance
from xaiserve.reliability.search import search_first_flips

X = torch.zeros(1, 2, 2)  # x' = eps * D: eps reads back to float32 precision
D = torch.tensor([0.4, -0.3, 0.2, -0.1]).view(1, 2, 2)  # ||D||_1 = 1: eps is the L1 size
LATTICE = Lattice(8.0, RES)


def window_forward(lattice: Lattice, flipped: set[int]):
    """A toy model whose prediction is class 1 exactly at the grid points ``flipped`` of
    ``lattice`` along X + eps * D, class 0 elsewhere (eps read back as ||x' - X||_1 and
    rounded to the nearest grid index)."""

    def forward(images: torch.Tensor, stage: str) -> torch.Tensor:
        eps = (images.double() - X.double()).abs().flatten(1).sum(1)
        logits = torch.zeros(len(images), 2)
        logits[:, 0] = 1.0
        for i, e in enumerate(eps.tolist()):
            j = lattice.top - round(math.log(e / lattice.eps_max) / lattice.log_q)
            if j in flipped:
                logits[i, 1] = 2.0
        return logits

    return forward


def search(flipped: set[int], lattice: Lattice = LATTICE):
    counting = CountingForward(window_forward(lattice, flipped))
    (found,) = search_first_flips(probe_of(counting, None, X, 0), lattice, D[None])
    return found, counting


def old_first_round(top: int, batch: int = 12) -> list[int]:
    """The first round of the search this one replaced: 12 points over the grid, about
    3.5x apart in eps at 1% resolution."""
    return sorted({round(top * i / (batch - 1)) for i in range(batch)})


def test_window_between_the_old_first_round_points_is_found():
    """Class 1 on a window of 40 grid points (eps x 1.5) and again from far above: the old
    first round tried no point of the window and reported the later flip; this search
    reports the window's first point."""
    top = LATTICE.top
    old = old_first_round(top)
    start = old[5] + 30
    window = set(range(start, start + 40))
    assert not window & set(old)  # the old first round stepped over the window
    later = set(range(old[8], top + 1))
    found, counting = search(window | later)
    assert found.eps == pytest.approx(LATTICE.eps(start), rel=1e-12)
    assert found.lower == pytest.approx(LATTICE.eps(start - 1), rel=1e-12)
    assert not found.censored and found.resolution_reached == RES
    assert counting.calls == found.forward_calls == 2
    assert counting.images == found.forward_passes <= LATTICE.search_bound()


def test_every_window_of_stride_points_is_found_wherever_it_lies():
    """A run of ``stride`` flipped points (relative width WINDOW) at every offset of the
    grid: the search reports its first point, in at most ``search_bound`` images."""
    stride, top = LATTICE.stride, LATTICE.top
    assert 1 - math.exp(stride * LATTICE.log_q) <= WINDOW  # the run spans at most WINDOW
    assert 1 - math.exp((stride + 1) * LATTICE.log_q) > WINDOW
    worst = 0
    for start in range(0, top - stride + 2):
        found, _ = search(set(range(start, start + stride)))
        assert not found.censored, start
        assert found.eps == pytest.approx(LATTICE.eps(start), rel=1e-12), start
        worst = max(worst, found.forward_passes)
    assert worst == LATTICE.search_bound()


def test_first_of_several_windows_is_reported():
    """Three flipped windows: the smallest flipped point wins, even when a narrow window
    (3 points) lies in the bracket the second round scans."""
    first = LATTICE.first_round()
    hi = first[30]
    narrow = {hi - 10, hi - 9, hi - 8}  # inside (first[29], first[30]): round two sees it
    found, _ = search(narrow | set(range(hi, hi + 30)) | set(range(first[50], LATTICE.top)))
    assert found.eps == pytest.approx(LATTICE.eps(hi - 10), rel=1e-12)


def test_censored_only_when_no_first_round_point_flips():
    first = LATTICE.first_round()
    never, counting = search(set())
    assert never.censored and never.eps == LATTICE.eps_max == never.lower
    assert counting.calls == 1 and never.forward_passes == len(first)
    # a flip at eps_max alone, and a window at the grid's lowest points, are not censored
    at_top, _ = search({LATTICE.top})
    assert not at_top.censored and at_top.eps == pytest.approx(LATTICE.eps_max)
    bottom, _ = search({0, 1, 2})
    assert not bottom.censored and bottom.eps == LATTICE.eps(0)
    assert bottom.lower == 0.0 and bottom.resolution_reached == 1.0
    # the guarantee is tight: stride - 1 flipped points between first-round points are
    # not seen, and then the search says censored (no window of relative width WINDOW)
    gap = set(range(first[40] + 1, first[41]))
    assert len(gap) == LATTICE.stride - 1
    missed, _ = search(gap)
    assert missed.censored


@pytest.mark.parametrize("resolution", [0.5, 0.1, 0.05, 0.001])
def test_other_resolutions_keep_the_window_guarantee(resolution):
    lattice = Lattice(8.0, resolution)
    stride = lattice.stride
    first = lattice.first_round()
    assert first[0] == 0 and first[-1] == lattice.top
    assert max(b - a for a, b in itertools.pairwise(first)) <= stride
    assert stride == 1 or 1 - math.exp(stride * lattice.log_q) <= WINDOW
    start = first[len(first) // 2] + 1  # just above a first-round point
    found, _ = search(set(range(start, start + stride)), lattice)
    assert found.eps == pytest.approx(lattice.eps(start), rel=1e-12)


def test_searches_agree_with_a_dense_scan_on_the_tiny_model():
    """20 images x (saliency, random map) x 2 directions: every search reports the dense
    1% scan's first flip (both on eps_max x 0.99^k), or both find none."""
    served = tiny_served()
    g = torch.Generator().manual_seed(23)
    agree, total, flips = 0, 0, 0
    for i in range(20):
        ctx = make_context(served, max_batch=256)
        x = torch.rand(3, 16, 16, generator=g)
        y = predicted(ctx.forward, x)
        sign = loss_gradient_sign(served.module, x, y, ctx.budget)
        relevance = saliency_map(served.module, x, y) if i % 2 else torch.rand(1, 16, 16)
        directions = torch.stack(
            [directed(relevance, sign), directed(irrelevance(relevance), sign)]
        )
        lattice = Lattice(float(x.numel()), RES)
        grid = dense_grid(lattice.eps_max)
        assert len(grid) in (lattice.top, lattice.top + 1)
        probe = probe_of(ctx.forward, served.module, x, y, ctx.budget)
        for found, d in zip(
            search_first_flips(probe, lattice, directions), directions, strict=True
        ):
            dense = dense_first_flip(ctx.forward, x, d, y, grid)
            total += 1
            flips += dense is not None
            if dense is None:
                agree += found.censored
            else:
                agree += not found.censored and abs(found.eps / dense - 1) <= RES
    print(f"\ndense agreement {agree}/{total}; {flips} flip on the grid")
    assert flips >= total // 2
    assert agree == total
