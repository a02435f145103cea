"""Stages with valid windows: the kept region of a crop of the padded activation equals the
network's own stage output there; what cannot be rewritten is refused with a reason; the
occluder built with them gives the logits of full forward passes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import fx, nn

from support import resnets
from support.tiny_models import tiny_served
from xaiserve.methods.perturbation.occlusion import window_starts
from xaiserve.runtime.forward.incremental.build import build_occluder
from xaiserve.runtime.forward.incremental.geometry import Span, join_shortcuts, trace
from xaiserve.runtime.forward.incremental.plan import Stage, plan_stages
from xaiserve.runtime.forward.incremental.rewrite import make_valid, stage_module
from xaiserve.runtime.model import PixelSpaceModel


def small_resnet18() -> PixelSpaceModel:
    torch.manual_seed(0)
    module = PixelSpaceModel(
        resnets.resnet18(num_classes=5, width=8).eval(), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def padded(activation: torch.Tensor, front, back, fill: float) -> torch.Tensor:
    """activation (1 x C x H x W) with front/back positions of ``fill`` per spatial axis."""
    pads = [p for a, b in zip(reversed(front), reversed(back), strict=True) for p in (a, b)]
    return torch.nn.functional.pad(activation, pads, value=fill)


def kept_region_matches(module: fx.GraphModule, stage: Stage, value: torch.Tensor) -> int:
    """Rewrites ``module`` (the stage) with valid windows and compares, for kept regions
    starting at every position of the output grid, the rewrite on the padded crop with the
    stage's own output over the whole activation ``value``. Returns the regions checked."""
    valid, reason = make_valid(module, stage)
    assert valid is not None, reason
    with torch.no_grad():
        expected = module(value)
        source = padded(value, valid.front, valid.back, valid.fill)
        checked = 0
        for r0 in range(stage.grid_out[0] - stage.rect[0] + 1):
            for r1 in range(stage.grid_out[1] - stage.rect[1] + 1):
                s0, s1 = (r * s.stride for r, s in zip((r0, r1), stage.span, strict=True))
                crop = source[..., s0 : s0 + valid.length[0], s1 : s1 + valid.length[1]]
                got = valid.module(crop)
                want = expected[..., r0 : r0 + stage.rect[0], r1 : r1 + stage.rect[1]]
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                checked += 1
    return checked


def test_every_stage_of_a_joined_resnet_plan_keeps_its_region_exactly():
    # single-layer stages: 7 x 7 / 2 convolution, 3 x 3 / 2 max pooling (padding -inf),
    # 3 x 3 convolutions with identity and strided 1 x 1 shortcuts joined to them
    net = small_resnet18().net
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    gm = trace(net, x)
    assert join_shortcuts(gm, x)
    axes = [window_starts(64, 9, 4)] * 2
    plan = plan_stages(gm, 9, axes)
    values = {}
    with torch.no_grad():
        interpreter = fx.Interpreter(gm)
        original_run = interpreter.run_node

        def keep(node):
            values[node] = original_run(node)
            return values[node]

        interpreter.run_node = keep
        interpreter.run(x)
    nodes = list(gm.graph.nodes)
    fills = []
    for stage in plan.stages:
        module = stage_module(gm, stage.start, stage.end)
        assert kept_region_matches(module, stage, values[nodes[stage.start]]) > 0
        fills.append(make_valid(module, stage)[0].fill)
    assert -math.inf in fills and 0.0 in fills  # the max pooling stage pads with -inf
    assert any(s.span[0].stride == 2 for s in plan.stages)


def one_stage(
    layers: nn.Module, span: Span, grid: int = 16, rect: int = 4, stride: int = 1
) -> tuple[fx.GraphModule, Stage]:
    module = fx.symbolic_trace(nn.Sequential(layers).eval())  # layers stay submodules
    crop = (rect - 1) * span.stride + span.hi - span.lo + 1
    stage = Stage(
        0,
        1,
        (span, span),
        (span, span),
        (grid, grid),
        (grid // stride,) * 2,
        (crop, crop),
        (rect, rect),
    )
    return module, stage


def test_an_average_pooling_that_counts_its_padding_pads_with_zero():
    module, stage = one_stage(nn.AvgPool2d(3, 1, 1, count_include_pad=True), Span(1, -1, 1))
    value = torch.rand(1, 2, 16, 16)
    assert kept_region_matches(module, stage, value) == 13 * 13


@pytest.mark.parametrize(
    "layers,span,reason",
    [
        (
            nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1)),
            Span(1, -2, 2),
            "reads another window's output",
        ),
        (
            nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 2, 3, padding=1)),
            Span(1, -1, 1),
            "reads a computed value",
        ),
        (nn.AvgPool2d(3, 1, 1, count_include_pad=False), Span(1, -1, 1), "out of its count"),
    ],
)
def test_stages_that_cannot_run_valid_windows_say_why(layers, span, reason):
    module, stage = one_stage(layers, span)
    valid, why = make_valid(module, stage)
    assert valid is None and reason in why


def test_a_strided_stage_that_passes_its_input_through_is_refused():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, stride=2, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.conv(x), x], dim=1)  # not a valid graph, only a shape

    module, stage = one_stage(Mixed(), Span(2, -1, 1), stride=2)
    valid, why = make_valid(module, stage)
    assert valid is None and "strided stage passes its input through" in why


@pytest.mark.parametrize("backend", ("torch", "onnxruntime"))
@pytest.mark.parametrize(
    "name,shape,window,stride",
    [
        ("resnet18", (3, 64, 64), 9, 4),
        ("resnet18", (3, 40, 36), 7, 5),  # not square, border-flush windows
        ("tiny", (3, 16, 16), 4, 2),
    ],
)
def test_occluders_with_valid_stages_give_the_logits_of_full_passes(
    backend, name, shape, window, stride
):
    module = small_resnet18() if name == "resnet18" else tiny_served().module
    axes = [window_starts(n, window, stride) for n in shape[1:]]
    corners = [(a, b) for a in axes[0] for b in axes[1]]
    joins = 1.0 if name == "resnet18" else 0.0  # cuts inside blocks: one layer a stage
    valid, reason = build_occluder(module, shape, window, axes, backend, joins_worth_it=joins)
    padded_only, _ = build_occluder(
        module, shape, window, axes, backend, joins_worth_it=joins, valid_windows=False
    )
    assert valid is not None, reason
    assert padded_only.valid_stages == 0 and valid.valid_stages >= 1
    if name == "resnet18":
        assert valid.valid_stages == len(valid.plan.stages)
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(4))
    occluded = x.expand(len(corners), *shape).clone()
    for j, (a, b) in enumerate(corners):
        occluded[j, :, a : a + window, b : b + window] = 0.25
    got = {}
    for label, occluder in (("valid", valid), ("padded", padded_only)):
        activations, _ = occluder.original(x)
        got[label] = torch.cat(
            [
                occluder.logits(activations, corners[s : s + 16], 0.25)
                for s in range(0, len(corners), 16)
            ]
        )
    with torch.no_grad():
        expected = module(occluded)
    tolerance = 1e-5 if backend == "torch" else 1e-4
    assert (got["valid"] - expected).abs().max() <= tolerance
    assert (got["valid"] - got["padded"]).abs().max() <= tolerance
    # the first stage's input is padded in pixels with what normalizes to zero
    first = valid.valid[0]
    if isinstance(module, PixelSpaceModel) and first.fill == 0.0:
        np.testing.assert_allclose(valid.fills[0], module.mean.reshape(-1).numpy(), rtol=1e-6)
