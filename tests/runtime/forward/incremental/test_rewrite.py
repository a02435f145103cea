"""Stage modules and stages with valid windows: the kept region of a crop of the padded
activation equals the network's own stage output there; what cannot be rewritten is refused
with a reason; a stage keeps only the joins at its cuts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import fx, nn

from support import resnets
from support.occluder_models import small_resnet18
from xaiserve.methods.perturbation.occlusion import window_starts
from xaiserve.runtime.forward.incremental.geometry import Span, join_shortcuts, trace
from xaiserve.runtime.forward.incremental.plan import Stage, plan_stages
from xaiserve.runtime.forward.incremental.rewrite import make_valid, stage_module


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


def test_stages_keep_only_the_joins_at_their_cuts():
    """A stage's joins other than its output are undone (their slices read the parts
    again): each stage module has at most one cat, its output, and computes the same as
    the joined graph's nodes; the head, after the last cut, has none."""
    torch.manual_seed(0)
    net = resnets.resnet18(num_classes=5, width=8).eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    gm = trace(net, x)
    join_shortcuts(gm, x)
    plan = plan_stages(gm, 9, [window_starts(64, 9, 4)] * 2)
    nodes = list(gm.graph.nodes)
    values = {}
    recorder = torch.fx.Interpreter(gm)
    run_node = recorder.run_node
    recorder.run_node = lambda n: values.setdefault(n, run_node(n))
    with torch.no_grad():
        logits = recorder.run(x)
    for stage in plan.stages:
        module = stage_module(gm, stage.start, stage.end)
        cats = [n for n in module.graph.nodes if n.target is torch.cat]
        output = next(n for n in module.graph.nodes if n.op == "output")
        assert all(cat in output.all_input_nodes for cat in cats) and len(cats) <= 1
        with torch.no_grad():
            assert torch.equal(module(values[nodes[stage.start]]), values[nodes[stage.end]])
    joined_cuts = [s for s in plan.stages if nodes[s.end].target is torch.cat]
    assert joined_cuts  # the plan cuts inside blocks, so some stage outputs are joins
    head = stage_module(gm, plan.head_start, None)
    assert not [n for n in head.graph.nodes if n.target is torch.cat]
    with torch.no_grad():
        assert torch.equal(head(values[nodes[plan.head_start]]), logits)


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
