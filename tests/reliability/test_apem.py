"""APEM (seed 004, chapter 3 and section 5.2): the record, alone and for several maps.

Run with ``-s`` to see the measured figures (agreement, forward calls, timings).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import pytest
import torch
from torch import nn

from support.apem_reference import (
    CountingForward,
    linear_case,
    loss_gradient_sign,
    predicted,
    probe_of,
    reference_search,
    saliency_map,
)
from support.tiny_models import make_context, tiny_served
from xaiserve.api.types import ReliabilityRequest
from xaiserve.reliability.apem import apem, apem_many
from xaiserve.reliability.lattice import Lattice
from xaiserve.reliability.options import DEFAULT_RESOLUTION as RES
from xaiserve.reliability.options import resolve_options
from xaiserve.reliability.score import directed, irrelevance, shuffled
from xaiserve.runtime.forward.counted import Budget, TorchForward


def test_apem_record_matches_closed_form_on_linear_model():
    case = linear_case(seed=2)
    forward, budget = case.context()
    relevance = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(3))
    record = apem(probe_of(forward, case.module, case.x, 0, budget), relevance)
    minus, plus = case.eps_star(relevance), case.eps_star(irrelevance(relevance))
    assert minus <= record.eps_minus * (1 + 1e-5) <= minus / (1 - RES) * (1 + 1e-5)
    assert plus <= record.eps_plus * (1 + 1e-5) <= plus / (1 - RES) * (1 + 1e-5)
    assert record.apem == pytest.approx(record.eps_plus - record.eps_minus)
    assert record.resolution <= RES
    assert not record.eps_minus_censored and not record.eps_plus_censored
    assert record.undefined_reason == "" and record.apem_norm is None


def test_apem_needs_fewer_forward_calls_than_the_seeds_scan():
    """One map's APEM (two directions) vs the seed's scan at step = 1% of each eps, counted
    in forward calls (the machine-independent cost; wall-clock ratios are in
    bench/apem_speed.py)."""
    served = tiny_served()
    g = torch.Generator().manual_seed(12)
    for _ in range(8):
        ctx = make_context(served, max_batch=64)
        x = torch.rand(3, 16, 16, generator=g)
        relevance = torch.rand(1, 16, 16, generator=g)
        y = predicted(ctx.forward, x)
        batched = CountingForward(ctx.forward)
        record = apem(probe_of(batched, served.module, x, y, ctx.budget), relevance)
        scan = CountingForward(ctx.forward)
        sign = loss_gradient_sign(served.module, x, y, ctx.budget)
        for r, eps in ((relevance, record.eps_minus), (irrelevance(relevance), record.eps_plus)):
            reference_search(scan, x, directed(r, sign), y, eps_max=x.numel(), step=RES * eps)
        assert batched.calls <= 2  # two rounds, both directions in each
        assert scan.calls >= 10 * batched.calls


def test_apem_norm_of_shuffled_maps_is_near_zero():
    """Shuffled maps: median APEM_norm within +-0.08; saliency maps score clearly higher."""
    served = tiny_served()
    g = torch.Generator().manual_seed(5)
    shuffled_norms, saliency_norms = [], []
    options = ReliabilityRequest(shuffles=3)
    for _ in range(20):
        ctx = make_context(served, max_batch=64)
        x = torch.rand(3, 16, 16, generator=g)
        y = predicted(ctx.forward, x)
        relevance = saliency_map(served.module, x, y)
        for target, r in ((shuffled_norms, shuffled(relevance, g)), (saliency_norms, relevance)):
            probe = probe_of(ctx.forward, served.module, x, y, ctx.budget)
            record = apem(probe, r, resolve_options(options, x.numel()))
            assert record.apem_norm is not None and math.isfinite(record.apem_norm)
            target.append(record.apem_norm)
    med_shuffled = statistics.median(shuffled_norms)
    med_saliency = statistics.median(saliency_norms)
    print(f"\nAPEM_norm median: shuffled maps {med_shuffled:+.3f}, saliency {med_saliency:+.3f}")
    assert abs(med_shuffled) <= 0.08
    assert med_saliency >= med_shuffled + 0.1


def test_censored_when_eps_max_is_tiny(served, images):
    ctx = make_context(served, max_batch=64)
    x = images[0]
    y = predicted(ctx.forward, x)
    relevance = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))
    probe = probe_of(ctx.forward, served.module, x, y, ctx.budget)
    record = apem(probe, relevance, resolve_options(ReliabilityRequest(eps_max=1e-3), x.numel()))
    assert record.eps_minus_censored and record.eps_plus_censored
    assert record.eps_minus == record.eps_plus == 1e-3 and record.apem == 0.0
    first_round = len(Lattice(1e-3, RES).first_round())
    assert record.forward_passes == 1 + 2 * first_round  # the gradient, one round each


def test_undefined_cases_name_the_reason(served, images):
    ctx = make_context(served, max_batch=64)
    x = images[0]
    y = predicted(ctx.forward, x)
    spent = ctx.budget.spent
    zero = apem(probe_of(ctx.forward, served.module, x, y, ctx.budget), torch.zeros(1, 16, 16))
    assert "zero everywhere" in zero.undefined_reason and math.isnan(zero.apem)
    ones = apem(probe_of(ctx.forward, served.module, x, y, ctx.budget), torch.ones(1, 16, 16))
    assert "1 - R is zero" in ones.undefined_reason and math.isnan(ones.eps_plus)
    assert zero.forward_passes == ones.forward_passes == 0 and ctx.budget.spent == spent
    other = (y + 1) % 3
    probe = probe_of(ctx.forward, served.module, x, other, ctx.budget)
    wrong = apem(probe, torch.rand(1, 16, 16))
    assert f"predicts class {y}, not the explained class {other}" in wrong.undefined_reason
    assert math.isnan(wrong.eps_minus) and wrong.forward_passes == 1


def test_saturated_model_is_undefined():
    flat = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        flat[1].weight.zero_()
        flat[1].bias.copy_(torch.tensor([1.0, 0.0]))
    budget = Budget(100)
    probe = probe_of(TorchForward(flat, budget, 8), flat, torch.rand(1, 2, 2), 0, budget)
    record = apem(probe, torch.rand(1, 2, 2))
    assert "gradient is zero" in record.undefined_reason


def test_forward_passes_match_the_budget(served, images):
    ctx = make_context(served, max_batch=16)
    x = images[1]
    y = predicted(ctx.forward, x)
    before, by_stage = ctx.budget.spent, ctx.budget.by_stage.get("apem", 0)
    record = apem(
        probe_of(ctx.forward, served.module, x, y, ctx.budget),
        saliency_map(served.module, x, y),
        resolve_options(ReliabilityRequest(shuffles=2, clamp=True), x.numel()),
    )
    assert record.forward_passes == ctx.budget.spent - before
    assert record.forward_passes == ctx.budget.by_stage["apem"] - by_stage
    assert record.apem_norm is not None and record.resolution <= RES


def test_maps_scored_together_equal_maps_scored_alone(served, images):
    """apem_many: every record as apem gives it alone (each search sees the same eps
    values), in fewer forward calls, with one gradient for all; the records' passes add
    up to what the call charged."""
    x = images[1]
    y = predicted(make_context(served).forward, x)
    g = torch.Generator().manual_seed(3)
    maps = [
        saliency_map(served.module, x, y),
        torch.rand(1, 16, 16, generator=g),
        torch.rand(3, 16, 16, generator=g),
        torch.zeros(1, 16, 16),
    ]
    options = [
        ReliabilityRequest(shuffles=2),
        None,
        ReliabilityRequest(resolution=0.05, shuffles=1),
        None,
    ]
    alone, calls_alone = [], 0
    for relevance, o in zip(maps, options, strict=True):
        ctx = make_context(served, max_batch=64)
        counting = CountingForward(ctx.forward)
        probe = probe_of(counting, served.module, x, y, ctx.budget)
        alone.append(apem(probe, relevance, resolve_options(o, x.numel())))
        calls_alone += counting.calls
    ctx = make_context(served, max_batch=64)
    counting = CountingForward(ctx.forward)
    together = apem_many(
        probe_of(counting, served.module, x, y, ctx.budget),
        maps,
        [resolve_options(o, x.numel(), f"methods[{i}]") for i, o in enumerate(options)],
    )
    print(f"\n4 maps: {calls_alone} forward calls alone, {counting.calls} together")
    assert [t.record.forward_passes for t in together] == [
        alone[0].forward_passes,
        *(a.forward_passes - 1 for a in alone[1:3]),
        0,
    ]  # the gradient's pass is counted once, on the first map
    assert sum(t.record.forward_passes for t in together) == ctx.budget.spent
    assert ctx.budget.by_stage["apem"] == ctx.budget.spent
    for a, t in zip(alone[:3], together[:3], strict=True):
        assert replace(t.record, forward_passes=0) == replace(a, forward_passes=0)
        assert t.score.apem == t.record.apem
    assert together[2].record.resolution <= 0.05 and together[0].record.resolution <= RES
    assert (
        together[3].score is None
        and together[3].record.undefined_reason == (alone[3].undefined_reason) != ""
    )
    assert alone[0].apem_norm is not None and alone[2].apem_norm is not None
    assert counting.calls < calls_alone


def test_maps_scored_together_share_one_undefined_prediction(served, images):
    """A wrong target makes every map's APEM undefined, after one gradient."""
    x = images[0]
    ctx = make_context(served, max_batch=64)
    other = (predicted(ctx.forward, x) + 1) % 3
    maps = [torch.rand(1, 16, 16), torch.rand(1, 16, 16)]
    spent = ctx.budget.spent
    together = apem_many(
        probe_of(ctx.forward, served.module, x, other, ctx.budget),
        maps,
        [resolve_options(None, x.numel())] * 2,
    )
    assert ctx.budget.spent - spent == 1  # the one gradient, no search
    assert [t.record.forward_passes for t in together] == [1, 0]
    assert all("not the explained class" in t.record.undefined_reason for t in together)
