"""Incremental occlusion's plans: cut points, stages and their cost."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from support import resnets
from support.occluder_models import pixel_model, small_resnet18
from xaiserve.methods.perturbation.occlusion import window_starts
from xaiserve.runtime.forward.incremental.geometry import analyze, join_shortcuts, trace
from xaiserve.runtime.forward.incremental.plan import changed_fraction, cut_points, plan_stages


def test_cut_points_are_between_blocks_never_inside():
    module = small_resnet18()
    gm = trace(module.net, torch.rand(1, 3, 64, 64))
    nodes = list(gm.graph.nodes)
    names = [nodes[i].name for i in cut_points(gm, analyze(gm, nodes[0], 2))]
    inside = [n for n in names if n.startswith("layer") and not n.endswith("relu2")]
    assert names[0] == "x" and not inside, names
    # every block's output is a cut: 8 basic blocks
    assert sum(n.startswith("layer") for n in names) == 8


def test_plan_for_resnet18_at_224_saves_about_half_the_arithmetic():
    torch.manual_seed(0)
    net = pixel_model(resnets.resnet18(num_classes=10)).net
    gm = trace(net, torch.rand(1, 3, 224, 224))
    starts = [window_starts(224, 15, 8)] * 2
    plan = plan_stages(gm, 15, starts)
    assert len(plan.stages) >= 3 and 0.4 < plan.cost_fraction < 0.65
    for stage in plan.stages:  # crops start on the stride grid, flush crops too
        for span, crop, n in zip(stage.span, stage.crop, stage.grid_in, strict=True):
            assert crop <= n and (n - crop) % span.stride == 0


def test_changed_fraction_by_hand():
    """conv 3x3 -> relu -> conv 3x3 on 8 x 8, then global layers; windows of 2 at 0, 2, 4, 6
    per axis. Per axis a window changes conv1 positions s-1 .. s+2 (lengths 3, 4, 4, 3
    inside the grid, mean 3.5) and conv2 positions s-2 .. s+3 (4, 6, 6, 4, mean 5).
    Costs (the planner's model): input 64 values; conv1 2 x 64 outputs x 1 x 9 = 1152;
    relu 128; conv2 128 x 2 x 9 = 2304; pool 2, flatten 2, linear 3 x 2 = 6, output 3."""
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 2, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2, 3),
    ).eval()
    gm = trace(net, torch.rand(1, 1, 8, 8))
    starts = [[0, 2, 4, 6]] * 2
    full = 64 + 1152 + 128 + 2304 + 2 + 2 + 6 + 3
    changed = (
        64 * 4 / 64 + 1152 * 3.5**2 / 64 + 128 * 3.5**2 / 64 + 2304 * 5**2 / 64 + 2 + 2 + 6 + 3
    )
    assert changed_fraction(gm, 2, starts) == pytest.approx(changed / full)
    assert plan_stages(gm, 2, starts).changed_fraction == pytest.approx(changed / full)


def test_cuts_inside_blocks_make_the_resnet18_plan_cheaper():
    torch.manual_seed(0)
    net = pixel_model(resnets.resnet18(num_classes=10)).net
    x = torch.rand(1, 3, 224, 224)
    starts = [window_starts(224, 15, 8)] * 2
    plain = plan_stages(trace(net, x), 15, starts)
    gm = trace(net, x)
    join_shortcuts(gm, x)
    joined = plan_stages(gm, 15, starts)
    assert joined.cost_fraction < plain.cost_fraction - 0.03  # 48% vs 54% of a pass
    assert joined.changed_fraction == pytest.approx(plain.changed_fraction, abs=0.01)


def test_a_window_as_large_as_the_image_gets_no_plan():
    gm = trace(small_resnet18().net, torch.rand(1, 3, 32, 32))
    plan = plan_stages(gm, 32, [[0], [0]])
    assert not plan.stages and "no saving" in plan.reason
