"""Worst-case forward passes known before work starts (``xaiserve/engine/cost.py``).

Each part of a request states the most forward passes it may spend; the engine adds them
up in its plan and refuses a request whose sum exceeds the limit before any forward pass.
Checked here: method by method (table-driven over the registry) the estimate against the
passes actually charged, the APEM search bound against a synthetic model that reaches it,
the adaptive-occlusion count, the filter in both modes, the engine's sum against whole
calls, and refusals naming the costliest field with no forward pass spent.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from support.apem_reference import probe_of
from support.calibrated_models import calibrated_tiny
from support.tiny_models import make_context, tiny_served
from support.vit_models import vit_served
from xaiserve.api.errors import ResourceExhausted
from xaiserve.api.types import (
    EncodedImage,
    ExplainRequest,
    FilterRequest,
    MethodRequest,
    RawTensor,
    ReliabilityRequest,
)
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.engine.postprocess import apply_stage
from xaiserve.methods.cam.score_cam import channel_masks, layer_activations
from xaiserve.methods.perturbation.occlusion_adaptive import adaptive_drops, positions_evaluated
from xaiserve.methods.registry import METHODS, get_method
from xaiserve.reliability.apem import apem_many
from xaiserve.reliability.filter import filter_map
from xaiserve.reliability.lattice import Lattice
from xaiserve.reliability.options import (
    filter_cost_bound,
    map_cost_bound,
    record_cost_bound,
    resolve_filter_options,
    resolve_options,
    search_cost_bound,
)
from xaiserve.reliability.score import relevance_from_map
from xaiserve.reliability.search import search_first_flips
from xaiserve.runtime.forward.config import ForwardConfig
from xaiserve.runtime.gad_store import GadSupport, SupportPair
from xaiserve.runtime.model import ServedModel, load_model_dir

SHAPE = (3, 16, 16)
TINY_CAM_CHANNELS = 8  # TinyNet's CAM layer: the ReLU after Conv2d(6, 8, ...)

CASES: list[tuple[str, dict]] = [
    ("smoothgrad", {"samples": 5}),
    ("vargrad", {"samples": 4}),
    ("integrated_gradients", {"steps": 6}),
    ("occlusion", {"window": 4, "stride": 3}),
    (
        "occlusion",
        {
            "window": 4,
            "stride": 2,
            "adaptive": {"enabled": True, "coarse_window": 8, "refine_fraction": 0.3},
        },
    ),
    ("lime", {"samples": 20, "segments": 8}),
    ("kernel_shap", {"samples": 20, "segments": 8}),
    ("rise", {"masks": 12, "cells": 4}),
]
"""Non-default parameters (small, and so the estimate is seen to follow them); every other
registered method but ``auto`` runs with its defaults."""

BY_HAND = {
    "smoothgrad": 5,
    "vargrad": 4,
    "integrated_gradients": 6,
    "occlusion": 1 + 5 * 5,  # starts 0, 3, 6, 9, 12 per axis, and the unoccluded image
    "lime": 20,
    "kernel_shap": 20,
    "rise": 12,
    "deeplift": 2,
    "guided_grad_cam": 2,  # the reference / Grad-CAM's pass
    "score_cam": 1 + TINY_CAM_CHANNELS,
}
"""Estimates worked out by hand; every other method: one gradient pass."""

TRANSFORMER_ONLY = {"attention_rollout"}
"""Methods the tiny CNN declines (no attention): they run on the small ViT (same input)."""


def image(seed: int = 3) -> torch.Tensor:
    return torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(seed))


def predicted(served: ServedModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return served.module(x).argmax(dim=1)


def table() -> list[tuple[str, dict]]:
    named = {name for name, _ in CASES}
    return CASES + [(name, {}) for name in METHODS if name not in named and name != "auto"]


def test_the_table_covers_every_registered_method():
    assert {name for name, _ in table()} | {"auto"} == set(METHODS)


@pytest.mark.parametrize(("name", "params"), table(), ids=lambda v: str(v)[:40])
def test_method_estimate_equals_the_passes_charged(name, params):
    """Every method charges exactly its estimate, except Score-CAM, which skips constant
    channels (its estimate counts every channel)."""
    served = vit_served() if name in TRANSFORMER_ONLY else calibrated_tiny()
    method = get_method(name)
    assert method.unsupported_reason(served) is None
    resolved = method.resolve_params(params, SHAPE, f"methods[0].{name}")
    estimate = method.max_forward_passes(resolved, served)
    if name == "occlusion" and resolved["adaptive"]:
        assert estimate == 1 + positions_evaluated([7, 7], 4, 0.3)
    else:
        assert estimate == BY_HAND.get(name, 1)
    x = image()
    ctx = make_context(served, max_batch=4)  # several batches wherever the work has them
    method.attribute(ctx, x, predicted(served, x), resolved)
    skipped = 0
    if name == "score_cam":
        acts = layer_activations(make_context(served), x)[0]
        skipped = int((channel_masks(acts, SHAPE[1:]).flatten(1).amax(1) == 0).sum())
    assert ctx.budget.spent == estimate - skipped


@pytest.mark.parametrize(
    ("counts", "step", "fraction"),
    [((7, 7), 4, 0.3), ((7, 7), 2, 0.0), ((13, 9), 3, 0.15), ((5, 6, 4), 2, 0.5), ((9, 9), 4, 1.0)],
)
def test_adaptive_occlusion_evaluates_the_positions_counted(counts, step, fraction):
    evaluated = []

    def evaluate(positions):
        evaluated.extend(positions)
        return torch.tensor([float(sum(p)) for p in positions])

    _, known = adaptive_drops(evaluate, counts, step, fraction)
    assert len(evaluated) == known == positions_evaluated(counts, step, fraction)
    assert len(set(evaluated)) == len(evaluated)


# ----------------------------------------------------------------------- APEM searches


def threshold_forward(x: torch.Tensor, flip_at: float):
    """A model that flips from class 0 to 1 once the L1 size of x' - x reaches flip_at."""

    def forward(images: torch.Tensor, stage: str) -> torch.Tensor:
        eps = (images.double() - x.double()).abs().flatten(1).sum(1)
        logits = torch.zeros(len(images), 2)
        logits[:, 0] = 1.0
        logits[eps >= flip_at, 1] = 2.0
        return logits

    return forward


@pytest.mark.parametrize("resolution", [0.5, 0.1, 0.01, 0.001])
def test_search_bound_holds_for_every_flip(resolution):
    """Flips from below the grid to above eps_max (censored): no search passes the bound,
    and the worst case reaches it (a flip inside a full bracket of the first round)."""
    x = torch.full((1, 4, 4), 0.5)
    d = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0))
    d = d / d.abs().sum()
    bound = search_cost_bound(resolution)
    lattice = Lattice(16.0, resolution)
    assert bound == len(lattice.first_round()) + lattice.stride - 1
    worst = 0
    for flip_at in np.geomspace(16e-9, 32.0, 240):
        (found,) = search_first_flips(
            probe_of(threshold_forward(x, flip_at), None, x, 0), lattice, d[None]
        )
        worst = max(worst, found.forward_passes)
    assert worst == bound
    if resolution == 0.01:
        assert bound == 64 + 21


def test_apem_record_with_shuffles_stays_within_its_bound():
    """Four maps with 0, 2 and 8 shuffles: the charged passes (one gradient for all) stay
    within 1 + the sum of ``record_cost_bound``; the ratio is printed by -s."""
    served = tiny_served()
    x = image(5)
    y = int(predicted(served, x)[0])
    ctx = make_context(served)
    maps = [
        relevance_from_map(
            apply_stage(
                get_method(name).attribute(
                    ctx, x, torch.tensor([y]), get_method(name).resolve_params({}, SHAPE, name)
                ),
                x,
                "one_channel",
            )[0]
        )
        for name in ("saliency", "grad_cam", "input_x_gradient", "saliency")
    ]
    options = [
        ReliabilityRequest(),
        ReliabilityRequest(shuffles=2),
        ReliabilityRequest(shuffles=8),
        ReliabilityRequest(shuffles=8, resolution=0.1),
    ]
    fields = [f"methods[{i}]" for i in range(len(maps))]
    spent = ctx.budget.spent
    resolved = [resolve_options(o, x.numel(), f) for o, f in zip(options, fields, strict=True)]
    records = apem_many(probe_of(ctx.forward, served.module, x[0], y, ctx.budget), maps, resolved)
    used = ctx.budget.spent - spent
    bound = 1 + sum(record_cost_bound(o) for o in resolved)
    assert used == sum(r.record.forward_passes for r in records)
    assert 0 < used <= bound
    print(f"APEM records: {used} passes of a bound of {bound} ({used / bound:.2f})")


@pytest.mark.parametrize("mode", ["fast", "exact"])
@pytest.mark.parametrize("levels", [6, 0])
@pytest.mark.parametrize("given", [None, 800])
def test_filter_stays_within_its_bound(mode, levels, given):
    """Both modes on a map quantized to 6 levels and on a full map, with and without a
    forward budget: the passes charged stay within ``filter_cost_bound``, and within the
    same bound computed from the map's distinct values instead of its entries (the exact
    filter refuses to pass a budget: it is then left at or below it)."""
    served = tiny_served()
    x = image(9)
    y = int(predicted(served, x)[0])
    ctx = make_context(served)
    saliency = get_method("saliency")
    staged = apply_stage(saliency.attribute(ctx, x, torch.tensor([y]), {}), x, "one_channel")[0]
    relevance = relevance_from_map(staged)
    if levels:
        relevance = torch.ceil(relevance * levels) / levels
    request = FilterRequest(mode, given)
    options = resolve_options(None, x.numel())
    filter_options = resolve_filter_options(request, options)
    spent = ctx.budget.spent
    try:
        probe = probe_of(ctx.forward, served.module, x[0], y, ctx.budget)
        record = filter_map(probe, relevance, options, filter_options)
    except ResourceExhausted as err:  # exact refuses to pass its budget (fast stops)
        assert (mode, err.field) == ("exact", "methods[0].filter.forward_budget")
        record = None
    used = ctx.budget.spent - spent
    distinct = int(torch.unique(relevance[relevance > 0]).numel())
    assert used > 0 and (record is None or used == record.forward_passes)
    assert used <= filter_cost_bound(filter_options, options, distinct)
    assert filter_cost_bound(filter_options, options, distinct) <= filter_cost_bound(
        filter_options, options, relevance.numel()
    )
    if given is not None:
        assert used <= given


def test_filter_bound_by_hand():
    options = resolve_options(None, 768)
    cost = map_cost_bound(options)
    assert cost == 2 * (64 + 21)
    exact = resolve_filter_options(FilterRequest("exact"), options)
    fast = resolve_filter_options(FilterRequest("fast"), options)
    capped = resolve_filter_options(FilterRequest("exact", 1000), options)
    assert filter_cost_bound(exact, options, 64 * 64) == 1 + 64 * 64 * cost
    assert filter_cost_bound(fast, options, 64 * 64) == 4096
    assert filter_cost_bound(fast, options, 10) == 1 + 10 * cost  # a short path ends first
    assert filter_cost_bound(capped, options, 64 * 64) == 1000


# ------------------------------------------------------------------------------ engine


class CallCounter:
    """Counts the images a module evaluates (forward pre-hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.images = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, _module, inputs) -> None:
        self.images += int(inputs[0].shape[0])


def tiny_engine(max_forward_passes: int = 200_000, served: ServedModel | None = None):
    served = served or calibrated_tiny()
    config = ForwardConfig(backend="torch", export_on_load=False)
    engine = Engine({"tiny": served}, EngineLimits(max_forward_passes=max_forward_passes), config)
    return engine, CallCounter(served.module)


def raw_image(seed: int = 3) -> RawTensor:
    return RawTensor(SHAPE, image(seed)[0].numpy().astype("<f4").tobytes())


def method(name: str, i: int = 0, params: dict | None = None, **kw) -> MethodRequest:
    return MethodRequest(name, params or {}, field=f"methods[{i}]", params_field=name, **kw)


def explain_request(*methods: MethodRequest, **kw) -> ExplainRequest:
    return ExplainRequest(model="tiny", image=raw_image(), methods=methods, **kw)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny_engine()[0]


@pytest.fixture(scope="module")
def vit_engine() -> Engine:
    vit = vit_served()
    return tiny_engine(served=replace(vit, config=replace(vit.config, name="tiny")))[0]


def engine_for(name: str, request: pytest.FixtureRequest) -> Engine:
    """The tiny CNN's engine, or the ViT's for a transformer-only method."""
    return request.getfixturevalue("vit_engine" if name in TRANSFORMER_ONLY else "engine")


@pytest.mark.parametrize(("name", "params"), table(), ids=lambda v: str(v)[:40])
def test_engine_estimate_equals_a_whole_call(name, params, request):
    """Prediction and map through the engine (the incremental occluder included): the
    passes of the call equal the estimate, but for Score-CAM's constant channels; the
    same method at a second stage is computed once and counted once."""
    engine = engine_for(name, request)
    request = explain_request(method(name, 0, params), method(name, 1, params, stage="raw"))
    estimate = engine.max_forward_passes(request)
    result = engine.explain(request)
    spent = sum(result.forward_passes.values())
    gap = estimate - spent
    assert gap == 0 or (name == "score_cam" and 0 < gap < TINY_CAM_CHANNELS)


@pytest.mark.parametrize("name", [name for name in METHODS if name != "auto"] + ["auto"])
def test_engine_estimate_bounds_apem_and_filters(name, request):
    """Every method with a reliability record (2 shuffles) and a fast filter, and the same
    map at the raw stage with a coarser record and its own fast filter: within the
    estimate (the ratio is printed by -s)."""
    engine = engine_for(name, request)
    request = explain_request(
        method(
            name, 0, reliability=ReliabilityRequest(shuffles=2), filter=FilterRequest("fast", 400)
        ),
        method(
            name,
            1,
            stage="raw",
            reliability=ReliabilityRequest(resolution=0.1),
            filter=FilterRequest("fast", 600),
        ),
    )
    estimate = engine.max_forward_passes(request)
    result = engine.explain(request)
    spent = sum(result.forward_passes.values())
    assert 0 < spent <= estimate
    print(f"{name}: {spent} of {estimate} ({spent / estimate:.2f})")


def test_engine_estimate_bounds_the_exact_filter(engine):
    """The exact filter through the engine, on an occlusion map of 2 x 2 windows (4
    distinct values): within the estimate, which counts one level per entry of the map
    (the map's distinct values are not known before it is computed)."""
    occlusion = {"window": 8, "stride": 8}
    request = explain_request(method("occlusion", params=occlusion, filter=FilterRequest("exact")))
    estimate = engine.max_forward_passes(request)
    assert estimate == 1 + (1 + 4) + 1 + 16 * 16 * 2 * (64 + 21)
    result = engine.explain(request)
    spent = sum(result.forward_passes.values())
    assert 0 < result.forward_passes["apem_filter"] <= 1 + 4 * 2 * (64 + 21)
    assert spent <= estimate
    print(f"exact filter: {spent} of {estimate} ({spent / estimate:.4f})")


def test_auto_counts_every_candidate(engine):
    request = explain_request(method("auto", params={"candidates": ["saliency", "rise"]}))
    # predict, saliency, RISE's 1000 masks, the gradient, two records at the default
    # resolution
    assert engine.max_forward_passes(request) == 1 + 1 + 1000 + 1 + 2 * 2 * (64 + 21)


REFUSED = [
    # (methods, limit, field, advice)
    (
        [method("occlusion", params={"window": 1, "stride": 1})],
        200,
        "methods[0].occlusion",
        "larger window or stride",
    ),
    (
        [method("saliency"), method("smoothgrad", 1, {"samples": 1024})],
        1000,
        "methods[1].smoothgrad",
        "fewer samples",
    ),
    (
        [method("saliency", filter=FilterRequest("exact"))],
        20_000,
        "methods[0].filter.mode",
        "use mode FAST",
    ),
    (
        [method("saliency", filter=FilterRequest("fast", 4096))],
        2_000,
        "methods[0].filter.forward_budget",
        "lower filter.forward_budget",
    ),
    (
        [method("grad_cam", reliability=ReliabilityRequest(shuffles=64))],
        5_000,
        "methods[0].reliability.shuffles",
        "fewer shuffles",
    ),
    (
        [method("auto", params={"candidates": ["saliency", "rise"]})],
        500,
        "methods[0].auto.candidates[1]",
        "leave it out of the candidates",
    ),
    (
        [method("integrated_gradients", params={"steps": 1024})],
        1_000,
        "methods[0].integrated_gradients",
        "fewer steps",
    ),
]


@pytest.mark.parametrize(
    ("methods", "limit", "field", "advice"), REFUSED, ids=[case[2] for case in REFUSED]
)
def test_refused_before_any_forward_pass(methods, limit, field, advice):
    engine, counter = tiny_engine(limit)
    request = explain_request(*methods)
    with pytest.raises(ResourceExhausted) as caught:
        engine.explain(request)
    assert caught.value.code == "RESOURCE_EXHAUSTED"
    assert caught.value.field == field
    assert f"more than the {limit:,} allowed per call" in caught.value.message
    assert advice in caught.value.message
    assert len(str(caught.value)) <= 512
    assert counter.images == 0
    plain = engine.explain(explain_request(method("saliency")))
    assert plain.forward_passes == {"predict": 1, "attribute": 1}
    assert counter.images == 2


def test_the_limit_is_the_estimate_exactly():
    """An occlusion of 7 x 7 windows: 51 passes with the prediction. Allowed at a limit of
    51, where it spends all of them; refused at 50 with nothing spent."""
    occlusion = method("occlusion", params={"window": 4, "stride": 2})
    engine, counter = tiny_engine(51)
    assert engine.max_forward_passes(explain_request(occlusion)) == 51
    result = engine.explain(explain_request(occlusion))
    assert sum(result.forward_passes.values()) == 51
    engine, counter = tiny_engine(50)
    with pytest.raises(ResourceExhausted):
        engine.explain(explain_request(occlusion))
    assert counter.images == 0


def test_gad_counts_the_support_models():
    """GAD runs the method again on each support model of the pair with the most."""
    supports = tuple(tiny_served(seed).module for seed in (1, 2))
    gad = GadSupport(
        (SupportPair((0, 1), (2.0, 8.0), supports), SupportPair((1, 2), (2.0,), supports[:1]))
    )
    served = replace(calibrated_tiny(), gad=gad)
    engine, counter = tiny_engine(served=served)
    request = explain_request(method("smoothgrad", params={"samples": 10}, gad=True), target=0)
    assert engine.max_forward_passes(request) == 1 + 10 + 2 * 10
    result = engine.explain(request)
    assert sum(result.forward_passes.values()) == 31
    engine, counter = tiny_engine(25, served)
    with pytest.raises(ResourceExhausted) as caught:
        engine.explain(request)
    assert caught.value.field == "methods[0].gad"
    assert counter.images == 0


def test_the_issues_exact_filter_on_the_demo_model_is_refused(demo_model_dir: Path):
    """Issue 20's example: ``filter: EXACT`` on the 64 x 64 demo model's saliency map,
    which spent the whole 200,000-pass budget before being refused, is refused before any
    forward pass; a plain call right after is answered."""
    from support.demo_images import demo_png

    served = load_model_dir(demo_model_dir)
    config = ForwardConfig(backend="torch", export_on_load=False)
    engine = Engine({served.config.name: served}, EngineLimits(), config)
    counter = CallCounter(served.module)
    image = EncodedImage(demo_png(0))
    exact = ExplainRequest(
        served.config.name, image, (method("saliency", filter=FilterRequest("exact")),)
    )
    with pytest.raises(ResourceExhausted) as caught:
        engine.explain(exact)
    assert caught.value.field == "methods[0].filter.mode"
    assert "up to 4,096" in caught.value.message  # the map's values bound its levels
    assert counter.images == 0
    plain = engine.explain(ExplainRequest(served.config.name, image, (method("saliency"),)))
    assert plain.forward_passes == {"predict": 1, "attribute": 1}


def test_budget_still_stops_work_past_the_limit():
    """The budget's own check, the safety net behind the estimate."""
    served = tiny_served()
    ctx = make_context(served, budget=5)
    with pytest.raises(ResourceExhausted):
        get_method("smoothgrad").attribute(
            ctx, image(), torch.tensor([0]), {"samples": 8, "noise_level": 0.1, "seed": 0}
        )
    assert ctx.budget.spent <= 5
