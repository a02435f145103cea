"""The batched first-flip search (seed 004, section 5.2): closed forms and the seed's scan.

Run with ``-s`` to see the measured figures (agreement, forward calls, timings).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import pytest
import torch

from support.apem_reference import (
    CountingForward,
    linear_case,
    loss_gradient_sign,
    predicted,
    probe_of,
    reference_search,
    search_first_flip,
)
from support.tiny_models import make_context, tiny_served
from xaiserve.reliability.lattice import GEOMETRIC_SPAN, Lattice
from xaiserve.reliability.options import DEFAULT_RESOLUTION as RES
from xaiserve.reliability.score import directed, irrelevance
from xaiserve.reliability.search import search_first_flips


def test_search_matches_closed_form_on_linear_model():
    case = linear_case()
    forward, budget = case.context()
    sign = loss_gradient_sign(case.module, case.x, 0, budget)
    relevance = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(1))
    for r in (relevance, irrelevance(relevance)):
        star = case.eps_star(r)
        d = directed(r, sign)
        probe = probe_of(forward, case.module, case.x, 0, budget)
        got = search_first_flip(probe, Lattice(case.x.numel(), RES), d)
        assert not got.censored
        assert got.lower <= star * (1 + 1e-5) and star <= got.eps * (1 + 1e-5)
        assert got.resolution_reached <= RES and got.forward_calls <= 2
        step = star / 37.37  # the seed's scan: the first multiple of step past eps*
        ref, censored = reference_search(forward, case.x, d, 0, eps_max=case.x.numel(), step=step)
        assert not censored and ref == pytest.approx(38 * step, rel=1e-9)


def test_flip_below_the_grid_reports_its_lowest_point():
    """eps* far below eps_max * 1e-6: the grid's lowest point is the first that flips, and
    the bracket is (0, e_0] (resolution 1.0), in one round."""
    case = linear_case(seed=4)
    forward, budget = case.context()
    sign = loss_gradient_sign(case.module, case.x, 0, budget)
    relevance = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(5))
    star = case.eps_star(relevance)
    eps_max = star / GEOMETRIC_SPAN * 50
    lattice = Lattice(eps_max, RES)
    probe = probe_of(forward, case.module, case.x, 0, budget)
    got = search_first_flip(probe, lattice, directed(relevance, sign))
    assert star < got.eps == lattice.eps(0) and got.lower == 0.0
    assert got.resolution_reached == 1.0 and got.forward_calls == 1 and not got.censored


def test_batched_searches_report_what_each_reports_alone():
    """Directions searched together try the same grid points as alone: the same eps, one
    forward call per round for all."""
    case = linear_case(seed=6)
    forward, budget = case.context()
    sign = loss_gradient_sign(case.module, case.x, 0, budget)
    g = torch.Generator().manual_seed(7)
    maps = [torch.rand(1, 4, 4, generator=g) for _ in range(4)]
    directions = torch.stack([directed(r, sign) for r in maps])
    lattice = Lattice(float(case.x.numel()), RES)
    probe = probe_of(forward, case.module, case.x, 0, budget)
    alone = [search_first_flip(probe, lattice, d) for d in directions]
    counting = CountingForward(forward)
    together = search_first_flips(replace(probe, forward=counting), lattice, directions)
    assert [r.eps for r in together] == [r.eps for r in alone]
    assert [r.forward_passes for r in together] == [r.forward_passes for r in alone]
    assert counting.calls == max(r.forward_calls for r in together) == 2  # one per round
    assert counting.images == sum(r.forward_passes for r in together)


def test_batched_search_agrees_with_the_seeds_scan_on_tiny_model():
    """40 random maps x images: brackets overlap the step-by-step scan's in >= 95%."""
    served = tiny_served()
    g = torch.Generator().manual_seed(11)
    agree, calls, passes, t_batched, t_reference, ref_calls = 0, [], [], 0.0, 0.0, 0
    total = 40
    for _ in range(total):
        ctx = make_context(served, max_batch=64)
        x = torch.rand(3, 16, 16, generator=g)
        relevance = torch.rand(1, 16, 16, generator=g)
        y = predicted(ctx.forward, x)
        sign = loss_gradient_sign(served.module, x, y, ctx.budget)
        d = directed(relevance, sign)
        t0 = time.perf_counter()
        probe = probe_of(ctx.forward, served.module, x, y, ctx.budget)
        got = search_first_flip(probe, Lattice(x.numel(), RES), d)
        t_batched += time.perf_counter() - t0
        calls.append(got.forward_calls)
        passes.append(got.forward_passes)
        assert not got.censored and got.resolution_reached <= RES
        step = RES * got.eps / 2
        counting = CountingForward(ctx.forward)
        t0 = time.perf_counter()
        ref, censored = reference_search(counting, x, d, y, eps_max=x.numel(), step=step)
        t_reference += time.perf_counter() - t0
        ref_calls += counting.calls
        # brackets (lower, eps] and (ref - step, ref] overlap
        agree += not censored and ref > got.lower * (1 - 1e-9) and ref - step < got.eps
    print(
        f"\nsearch agreement {agree}/{total} = {agree / total:.0%}; forward calls per "
        f"direction max {max(calls)} mean {statistics.mean(calls):.2f}; images per direction "
        f"mean {statistics.mean(passes):.1f}; seed's scan at step {RES / 2:g} * eps: "
        f"{ref_calls / total:.0f} calls per direction; time batched {t_batched:.3f} s, "
        f"scan {t_reference:.3f} s ({t_reference / t_batched:.1f}x)"
    )
    assert agree / total >= 0.95
    assert max(calls) <= 2
