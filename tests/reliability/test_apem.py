"""APEM (seed 004, chapter 3 and section 5.2): closed forms, the seed's search, properties.

Run with ``-s`` to see the measured figures (agreement, forward calls, timings).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace

import pytest
import torch
from torch import nn

from support.apem_reference import (
    CountingForward,
    loss_gradient_sign,
    probe_of,
    reference_search,
    search_first_flip,
)
from support.tiny_models import make_context, tiny_served
from xaiserve.api.errors import InvalidArgument
from xaiserve.api.types import ReliabilityRequest
from xaiserve.reliability.apem import apem, apem_many
from xaiserve.reliability.lattice import DEFAULT_BATCH, GEOMETRIC_SPAN, Lattice, max_calls_for
from xaiserve.reliability.options import (
    DEFAULT_RESOLUTION,
    ApemOptions,
    resolve_options,
)
from xaiserve.reliability.score import directed, irrelevance, relevance_from_map, shuffled
from xaiserve.reliability.search import search_first_flips
from xaiserve.runtime.forward.counted import Budget, TorchForward

RES = DEFAULT_RESOLUTION


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny batches run several times faster on one thread (and the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ helpers


class Linear2:
    """f(x) = W x + b with 2 classes; the margin m(x) = logit_0 - logit_1 = u . x + c.

    Class 0 is predicted with margin ``margin``. sign(grad CE) = -sign(u), so along
    R_dir the margin falls at rate sum(R_norm * |u|): the first flip is at
    eps* = margin / sum(R_norm * |u|) (argmax keeps class 0 at a tie).
    """

    def __init__(self, u: torch.Tensor, x: torch.Tensor, margin: float) -> None:
        self.u, self.x, self.margin = u, x, margin
        n = u.numel()
        linear = nn.Linear(n, 2)
        with torch.no_grad():
            linear.weight.copy_(torch.stack([u.reshape(-1), torch.zeros(n)]))
            linear.bias.copy_(torch.tensor([margin - float((u * x).sum()), 0.0]))
        self.module = nn.Sequential(nn.Flatten(), linear).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def eps_star(self, relevance: torch.Tensor) -> float:
        full = relevance.expand_as(self.u)
        return self.margin / float((full / full.sum() * self.u.abs()).sum())

    def context(self, max_batch: int = 64) -> tuple[TorchForward, Budget]:
        budget = Budget(10**7)
        return TorchForward(self.module, budget, max_batch), budget


def linear_case(seed: int = 0, shape: tuple[int, ...] = (3, 4, 4)) -> Linear2:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g)
    x = torch.rand(shape, generator=g)
    return Linear2(u, x, margin=1.0)


def saliency_map(module: nn.Module, x: torch.Tensor, y: int) -> torch.Tensor:
    """|d logit_y / d x| summed over channels, scaled to [0, 1]: 1 x *spatial."""
    xb = x.unsqueeze(0).clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(module(xb)[0, y], xb)
    return relevance_from_map(grad[0].abs().sum(0, keepdim=True))


def predicted(forward, x: torch.Tensor) -> int:
    return int(forward(x.unsqueeze(0), "predict").argmax())


# ---------------------------------------------------------------------- relevance parts


def test_relevance_from_map_scales_magnitude():
    raw = torch.tensor([[[-2.0, 1.0], [0.5, 0.0]], [[0.0, 4.0], [-1.0, 2.0]]])
    got = relevance_from_map(raw)
    assert torch.equal(got, raw.abs() / 4.0)
    unit = torch.tensor([[[0.0, 0.25], [1.0, 0.5]]])
    assert torch.equal(relevance_from_map(unit), unit)
    assert torch.equal(relevance_from_map(torch.zeros(1, 2, 2)), torch.zeros(1, 2, 2))


def test_directed_is_l1_normalized_over_the_broadcast():
    relevance = torch.tensor([[[0.0, 0.5], [1.0, 0.5]]])  # 1 x 2 x 2
    sign = torch.tensor([1.0, -1.0, 1.0]).view(3, 1, 1).expand(3, 2, 2)
    d = directed(relevance, sign)
    assert d.shape == (3, 2, 2)
    assert d.abs().sum().item() == pytest.approx(1.0)
    assert torch.allclose(d, relevance / (3 * 2.0) * sign)
    assert directed(torch.zeros(1, 2, 2), sign) is None


def test_loss_gradient_sign_matches_closed_form_and_is_charged():
    case = linear_case()
    _, budget = case.context()
    sign = loss_gradient_sign(case.module, case.x, 0, budget)
    assert torch.equal(sign, -case.u.sign())
    assert budget.spent == 1 and budget.by_stage == {"apem": 1}


# ---------------------------------------------------------------------------- searches


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
        assert got.resolution_reached <= RES and got.forward_calls <= 4
        step = star / 37.37  # the seed's scan: the first multiple of step past eps*
        ref, censored = reference_search(forward, case.x, d, 0, eps_max=case.x.numel(), step=step)
        assert not censored and ref == pytest.approx(38 * step, rel=1e-9)


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


def test_flip_below_the_first_grid_is_found():
    """eps* far below eps_max * 1e-6: one more geometric round finds it."""
    case = linear_case(seed=4)
    forward, budget = case.context()
    sign = loss_gradient_sign(case.module, case.x, 0, budget)
    relevance = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(5))
    star = case.eps_star(relevance)
    eps_max = star / GEOMETRIC_SPAN * 50
    probe = probe_of(forward, case.module, case.x, 0, budget)
    got = search_first_flip(probe, Lattice(eps_max, RES), directed(relevance, sign))
    assert got.lower <= star * (1 + 1e-5) and star <= got.eps * (1 + 1e-5)
    assert got.resolution_reached <= RES
    assert got.forward_calls <= max_calls_for(RES)


def test_hinted_and_batched_searches_report_the_same_lattice_values():
    """On a monotone model every search on one lattice reports the same eps."""
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
    hinted = search_first_flips(probe, lattice, directions, hints=[r.eps * 1.2 for r in alone])
    assert [r.eps for r in together] == [r.eps for r in alone] == [r.eps for r in hinted]
    assert counting.calls == max(r.forward_calls for r in together)  # one call per round
    assert counting.images == sum(r.forward_passes for r in together)
    assert all(r.forward_calls <= 2 for r in hinted)


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
    assert max(calls) <= 4


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
        assert batched.calls <= 8  # at most 4 per direction
        assert scan.calls >= 10 * batched.calls


# -------------------------------------------------------------------------- the record


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
    assert record.forward_passes == 1 + 2 * DEFAULT_BATCH  # the gradient, one round each


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


@pytest.mark.parametrize(
    "options, name, message",
    [
        (ReliabilityRequest(eps_max=0.0), "eps_max", "must be > 0"),
        (ReliabilityRequest(eps_max=-3.0), "eps_max", "must be > 0"),
        (ReliabilityRequest(eps_max=float("nan")), "eps_max", "finite"),
        (ReliabilityRequest(resolution=0.0), "resolution", "(0, 0.5]"),
        (ReliabilityRequest(resolution=0.75), "resolution", "(0, 0.5]"),
        (ReliabilityRequest(shuffles=-1), "shuffles", "between 0 and 64"),
        (ReliabilityRequest(shuffles=65), "shuffles", "between 0 and 64"),
        (ReliabilityRequest(shuffles=1.5), "shuffles", "integer"),
    ],
)
def test_invalid_options_name_the_field(served, images, options, name, message):
    ctx = make_context(served)
    with pytest.raises(InvalidArgument) as err:
        resolve_options(options, images[0].numel(), field="methods[2]")
    assert err.value.field == f"methods[2].reliability.{name}"
    assert message in err.value.message
    assert ctx.budget.spent == 0


def test_defaults():
    resolved = resolve_options(None, 3 * 16 * 16)
    assert resolved == ApemOptions(eps_max=768.0, resolution=0.01, shuffles=0, clamp=False)


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
