"""Incremental occlusion's geometry: what each node reads, by hand and as measured."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from support import resnets
from support.occluder_models import small_resnet18
from xaiserve.methods.perturbation.occlusion import window_starts
from xaiserve.runtime.forward.incremental.geometry import (
    CONSTANT,
    Span,
    analyze,
    join_shortcuts,
    trace,
)
from xaiserve.runtime.forward.incremental.plan import cut_points


def geometry_of_output(net: nn.Module, shape: tuple[int, ...]) -> object:
    gm = trace(net, torch.rand(1, *shape))
    nodes = list(gm.graph.nodes)
    info = analyze(gm, nodes[0], len(shape) - 1)
    return info[nodes[-2]]  # the node before the output


def test_stem_geometry_by_hand():
    # conv 7x7 stride 2 padding 3: output p reads inputs 2p-3 .. 2p+3; then max pool 3x3
    # stride 2 padding 1 reads conv positions 2q-1 .. 2q+1, i.e. inputs 4q-5 .. 4q+5
    stem = nn.Sequential(
        nn.Conv2d(3, 4, 7, 2, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
    ).eval()
    assert geometry_of_output(stem, (3, 32, 32)) == (Span(4, -5, 5), Span(4, -5, 5))


def test_dilated_and_rectangular_kernels_by_hand():
    dilated = nn.Sequential(nn.Conv2d(3, 3, 3, padding=2, dilation=2)).eval()
    assert geometry_of_output(dilated, (3, 16, 16)) == (Span(1, -2, 2), Span(1, -2, 2))
    wide = nn.Sequential(nn.Conv2d(3, 3, (3, 5), padding=(1, 0))).eval()
    assert geometry_of_output(wide, (3, 16, 16)) == (Span(1, -1, 1), Span(1, 0, 4))


def test_residual_sum_takes_the_wider_branch():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x))) + x

    assert geometry_of_output(Block().eval(), (3, 16, 16)) == (Span(1, -2, 2),) * 2


def test_constants_varying_over_space_and_global_layers_are_not_local():
    class Net(nn.Module):
        def __init__(self, positional: bool) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            shape = (1, 3, 8, 8) if positional else (1, 3, 1, 1)
            self.offset = nn.Parameter(torch.rand(shape))
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x) + self.offset
            return self.fc(torch.flatten(self.pool(y), 1))

    for positional, expect_local in ((False, True), (True, False)):
        gm = trace(Net(positional).eval(), torch.rand(1, 3, 8, 8))
        info = analyze(gm, next(iter(gm.graph.nodes)), 2)
        by_name = {n.name: info.get(n) for n in gm.graph.nodes}
        assert by_name["offset"] is CONSTANT
        assert (by_name["add"] == (Span(1, -1, 1),) * 2) is expect_local
        assert by_name["pool"] is None and by_name["fc"] is None


def test_changed_fraction_matches_what_windows_change_in_a_resnet():
    """The share of every convolution's outputs that differ between the image and each
    occluded copy (measured), against the geometry's changed regions: never more, and
    nearly all of them (a ReLU can leave an edge of the region unchanged)."""
    module = small_resnet18()
    gm = trace(module.net, torch.rand(1, 3, 48, 48))
    starts = [window_starts(48, 8, 8)] * 2
    convs = {
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)
    }
    x = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    corners = list(itertools.product(*starts))
    occluded = x.repeat(len(corners), 1, 1, 1)
    for j, (r, c) in enumerate(corners):
        occluded[j, :, r : r + 8, c : c + 8] = 0.5
    outputs = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n in convs:
                outputs.setdefault(n, []).append(value)
            return value

    with torch.no_grad():
        Recorder(gm).run(torch.cat([x, occluded]))
    absolute = analyze(gm, next(iter(gm.graph.nodes)), 2)
    measured = predicted = 0.0
    for node, (values,) in outputs.items():
        differs = (values[1:] != values[:1]).any(dim=1)  # windows x H x W
        for j, corner in enumerate(corners):
            box = [
                span.changed(torch.tensor(c), torch.tensor(c + 7), n)
                for span, c, n in zip(absolute[node], corner, differs.shape[1:], strict=True)
            ]
            inside = torch.zeros_like(differs[j])
            inside[int(box[0][0]) : int(box[0][1]) + 1, int(box[1][0]) : int(box[1][1]) + 1] = True
            assert not (differs[j] & ~inside).any(), (node.name, corner)
            measured += float(differs[j].double().mean())
            predicted += float(inside.double().mean())
    assert measured >= 0.9 * predicted


@pytest.mark.parametrize("name,joins", [("resnet18", 8), ("resnet50", 2 * 16 - 3)])
def test_joined_shortcuts_keep_the_function_and_cut_inside_blocks(name, joins):
    """Each basic block's inner activation (a bottleneck block's two) is joined with its
    shortcut into one tensor, which is a cut point; the network computes the same. In the
    three strided bottleneck blocks the first inner activation is still on the input's
    grid and the shortcut on the output's: not joined."""
    torch.manual_seed(0)
    net = getattr(resnets, name)(num_classes=5, width=8).eval()
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    plain, joined = trace(net, x[:1]), trace(net, x[:1])
    assert join_shortcuts(joined, x[:1]) == joins
    with torch.no_grad():
        assert torch.equal(joined(x), net(x))
    names = [
        list(joined.graph.nodes)[i].name
        for i in cut_points(joined, analyze(joined, next(iter(joined.graph.nodes)), 2))
    ]
    plain_cuts = cut_points(plain, analyze(plain, next(iter(plain.graph.nodes)), 2))
    assert sum(n.startswith("cat") for n in names) == joins
    assert len(names) == len(plain_cuts) + joins
