"""Incremental occlusion: geometry by hand, plans, and logits equal to full forward passes."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from support import resnets
from support.tiny_models import make_context, model_config, tiny_served
from xaiserve.methods.base import MethodContext
from xaiserve.methods.perturbation.occlusion import Occlusion, window_starts
from xaiserve.runtime.forward.backends import prepare_forwards
from xaiserve.runtime.forward.config import ForwardConfig
from xaiserve.runtime.forward.counted import Budget
from xaiserve.runtime.forward.incremental.build import build_occluder
from xaiserve.runtime.forward.incremental.geometry import (
    CONSTANT,
    Span,
    analyze,
    join_shortcuts,
    trace,
)
from xaiserve.runtime.forward.incremental.plan import changed_fraction, cut_points, plan_stages
from xaiserve.runtime.forward.incremental.rewrite import stage_module
from xaiserve.runtime.model import PixelSpaceModel, ServedModel

BACKENDS = ("torch", "onnxruntime")


def geometry_of_output(net: nn.Module, shape: tuple[int, ...]) -> object:
    gm = trace(net, torch.rand(1, *shape))
    nodes = list(gm.graph.nodes)
    info = analyze(gm, nodes[0], len(shape) - 1)
    return info[nodes[-2]]  # the node before the output


def pixel_model(net: nn.Module) -> PixelSpaceModel:
    module = PixelSpaceModel(net.eval(), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def small_resnet18() -> PixelSpaceModel:
    torch.manual_seed(0)
    return pixel_model(resnets.resnet18(num_classes=5, width=8))


# ------------------------------------------------------------------------------- geometry


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


def test_cut_points_are_between_blocks_never_inside():
    module = small_resnet18()
    gm = trace(module.net, torch.rand(1, 3, 64, 64))
    nodes = list(gm.graph.nodes)
    names = [nodes[i].name for i in cut_points(gm, analyze(gm, nodes[0], 2))]
    inside = [n for n in names if n.startswith("layer") and not n.endswith("relu2")]
    assert names[0] == "x" and not inside, names
    # every block's output is a cut: 8 basic blocks
    assert sum(n.startswith("layer") for n in names) == 8


# ---------------------------------------------------------------------------------- plans


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


def test_a_window_as_large_as_the_image_gets_no_plan():
    gm = trace(small_resnet18().net, torch.rand(1, 3, 32, 32))
    plan = plan_stages(gm, 32, [[0], [0]])
    assert not plan.stages and "no saving" in plan.reason


# --------------------------------------------------------------- exact against full passes


def all_corners(shape: tuple[int, ...], window: int, stride: int) -> tuple[list, list]:
    axes = [window_starts(n, window, stride) for n in shape[1:]]
    return axes, list(itertools.product(*axes))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name,shape,window,stride",
    [
        ("resnet18", (3, 64, 64), 9, 4),
        ("tiny", (3, 16, 16), 4, 2),
        ("resnet18", (3, 40, 36), 7, 5),  # not square, border-flush windows
        ("resnet18", (3, 64, 64), 16, 16),  # 4 x 4 windows
    ],
)
def test_occluded_logits_equal_full_forward_passes(backend, name, shape, window, stride):
    module = small_resnet18() if name == "resnet18" else tiny_served().module
    axes, corners = all_corners(shape, window, stride)
    occluder, reason = build_occluder(module, shape, window, axes, backend)
    assert occluder is not None, reason
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(3))
    occluded = x.expand(len(corners), *shape).clone()
    for j, (a, b) in enumerate(corners):
        occluded[j, :, a : a + window, b : b + window] = 0.25
    with torch.no_grad():
        expected = module(occluded)
        activations, original = occluder.original(x)
        got = torch.cat(
            [
                occluder.logits(activations, corners[s : s + 16], 0.25)
                for s in range(0, len(corners), 16)
            ]
        )
    tolerance = 1e-5 if backend == "torch" else 1e-4
    assert (got - expected).abs().max() <= tolerance
    assert (original - module(x)).abs().max() <= tolerance
    assert not any(m.training for m in module.modules())  # exports leave eval mode alone


@pytest.mark.parametrize("backend", BACKENDS)
def test_plans_with_cuts_inside_blocks_give_exact_logits(backend):
    module = small_resnet18()
    axes, corners = all_corners((3, 64, 64), 9, 4)
    joined, reason = build_occluder(module, (3, 64, 64), 9, axes, backend, joins_worth_it=1.0)
    plain, _ = build_occluder(module, (3, 64, 64), 9, axes, backend, joins_worth_it=0.0)
    assert joined is not None, reason
    assert len(joined.plan.stages) > len(plain.plan.stages)  # the joined plan was taken
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    occluded = x.expand(len(corners), 3, 64, 64).clone()
    for j, (a, b) in enumerate(corners):
        occluded[j, :, a : a + 9, b : b + 9] = 0.25
    activations, _ = joined.original(x)
    got = torch.cat(
        [joined.logits(activations, corners[s : s + 32], 0.25) for s in range(0, len(corners), 32)]
    )
    with torch.no_grad():
        assert (got - module(occluded)).abs().max() <= 1e-4


def test_onnx_occluder_runs_the_whole_image_in_onnx_runtime(monkeypatch):
    """``original`` on ONNX Runtime: no torch convolution runs, and every activation
    matches the torch occluder's."""
    module = small_resnet18()
    axes, _ = all_corners((3, 64, 64), 9, 4)
    on_torch, reason = build_occluder(module, (3, 64, 64), 9, axes, "torch")
    on_onnx, _ = build_occluder(module, (3, 64, 64), 9, axes, "onnxruntime")
    assert on_torch is not None and on_onnx is not None, reason
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    expected, expected_logits = on_torch.original(x)

    def no_torch(*_args: object) -> None:
        raise AssertionError("a torch convolution ran")

    monkeypatch.setattr(nn.Conv2d, "forward", no_torch)
    got, logits = on_onnx.original(x)
    assert len(got) == len(expected) == len(on_onnx.plan.stages) + 1
    for ours, theirs in zip(got, expected, strict=True):  # padded ones hold -inf (max pools) alike
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    assert (logits - expected_logits).abs().max() <= 1e-4


def test_whole_image_stages_fall_back_to_torch_when_their_export_fails(monkeypatch, caplog):
    export = torch.onnx.export

    def fails_on_whole_images(module: nn.Module, args: tuple, *rest, **kwargs) -> None:
        if tuple(args[0].shape[1:]) == (3, 64, 64):  # the stages on crops export
            raise RuntimeError("for the test")
        export(module, args, *rest, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", fails_on_whole_images)
    module = small_resnet18()
    axes, corners = all_corners((3, 64, 64), 9, 4)
    with caplog.at_level("WARNING"):
        occluder, reason = build_occluder(module, (3, 64, 64), 9, axes, "onnxruntime")
    assert occluder is not None, reason
    assert "whole-image stages run on torch" in caplog.text
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    occluded = x.expand(4, 3, 64, 64).clone()
    for j, (a, b) in enumerate(corners[:4]):
        occluded[j, :, a : a + 9, b : b + 9] = 0.25
    activations, original = occluder.original(x)
    with torch.no_grad():
        assert (
            occluder.logits(activations, corners[:4], 0.25) - module(occluded)
        ).abs().max() <= 1e-4
        assert (original - module(x)).abs().max() <= 1e-4


def test_a_grid_of_fewer_windows_than_the_check_samples():
    # 2 x 2 windows (the check looks at up to CHECK_WINDOWS of them)
    axes = [window_starts(64, 16, 16)[::3]] * 2
    assert axes[0] == [0, 48]
    occluder, reason = build_occluder(small_resnet18(), (3, 64, 64), 16, axes, "torch")
    assert occluder is not None, reason


def test_untraceable_model_gets_no_occluder_and_a_reason():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                y = -y
            return self.fc(y.mean(dim=(2, 3)))

    axes, _ = all_corners((3, 16, 16), 4, 2)
    occluder, reason = build_occluder(pixel_model(Branchy()), (3, 16, 16), 4, axes, "torch")
    assert occluder is None and "not traceable" in reason


# ------------------------------------------------------------------- through the method


def resnet_served(shape: tuple[int, ...]) -> ServedModel:
    module = small_resnet18()
    config = model_config(shape, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "abcde", "layer4", "r18")
    return ServedModel(config, module, module.net.layer4, Path("."))


@pytest.mark.parametrize("backend", BACKENDS)
def test_occlusion_maps_and_counts_match_with_and_without_incremental(backend):
    shape = (3, 48, 48)
    served = resnet_served(shape)
    forwards = prepare_forwards(served, ForwardConfig(memory_mb=64))
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([1, 3])
    method = Occlusion()
    maps, spent = {}, {}
    for incremental in (True, False):
        budget = Budget(10**6)
        forward = forwards.forward(budget, backend)
        if not incremental:
            forward.occluders = None
        assert (forward.occluder(8, [window_starts(48, 8, 4)] * 2) is not None) is incremental
        params = method.resolve_params({"window": 8, "stride": 4}, shape, "occlusion")
        maps[incremental] = method.attribute(
            MethodContext(served, forward, budget, 16), x, target, params
        )
        spent[incremental] = budget.spent
    assert spent[True] == spent[False] == 2 * (1 + 11 * 11)
    assert (maps[True] - maps[False]).abs().max() <= 1e-4


def test_incremental_off_in_the_configuration():
    served = resnet_served((3, 32, 32))
    forwards = prepare_forwards(served, ForwardConfig(incremental_occlusion=False))
    forward = forwards.forward(Budget(10), "torch")
    assert forward.occluder(8, [window_starts(32, 8, 4)] * 2) is None
    with pytest.raises(ValueError, match="incremental_occlusion"):
        ForwardConfig(incremental_occlusion="yes")


def test_plain_contexts_have_no_occluder():
    ctx = make_context(tiny_served())
    assert ctx.forward.occluder(4, [[0, 2], [0, 2]]) is None


def test_a_failing_plan_means_full_passes_not_a_failed_request(monkeypatch):
    import xaiserve.runtime.forward.backends as backends

    def broken(*_args, **_kwargs):
        raise RuntimeError("a graph nobody foresaw")

    served = resnet_served((3, 32, 32))
    forwards = prepare_forwards(served, ForwardConfig())
    monkeypatch.setattr(backends, "build_occluder", broken)
    budget = Budget(10**6)
    forward = forwards.forward(budget, "torch")
    assert forward.occluder(8, [window_starts(32, 8, 8)] * 2) is None
    method = Occlusion()
    params = method.resolve_params({"window": 8, "stride": 8}, (3, 32, 32), "occlusion")
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    got = method.attribute(MethodContext(served, forward, budget, 16), x, torch.tensor([0]), params)
    assert got.shape == x.shape and budget.spent == 1 + 16 and got.abs().sum() > 0


def test_a_build_blocks_neither_other_windows_nor_builds_twice(monkeypatch):
    """While one window's plan is being built, a request for another window gets its own
    (here: already cached) occluder at once; two requests for the building window share the
    one build."""
    import xaiserve.runtime.forward.backends as backends

    served = resnet_served((3, 32, 32))
    forwards = prepare_forwards(served, ForwardConfig())
    ready = forwards.occluder("torch", 8, [window_starts(32, 8, 8)] * 2)
    assert ready is not None
    started, release, builds = threading.Event(), threading.Event(), []
    real = backends.build_occluder

    def slow(*args, **kwargs):
        builds.append(args[2])
        started.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(backends, "build_occluder", slow)
    axes = [window_starts(32, 8, 4)] * 2  # the same window side at other positions
    results = []
    callers = [
        threading.Thread(target=lambda: results.append(forwards.occluder("torch", 8, axes)))
        for _ in range(2)
    ]
    callers[0].start()
    assert started.wait(30)
    callers[1].start()
    assert forwards.occluder("torch", 8, [window_starts(32, 8, 8)] * 2) is ready  # no wait
    release.set()
    for caller in callers:
        caller.join(30)
    assert builds == [8]
    assert len(results) == 2 and results[0] is results[1] and results[0] is not None


@pytest.mark.parametrize("incremental", [True, False])
def test_warm_up_builds_the_default_windows_plan_that_requests_then_use(monkeypatch, incremental):
    import xaiserve.runtime.forward.backends as backends
    from xaiserve.api.types import ExplainRequest, MethodRequest, RawTensor
    from xaiserve.engine.engine import Engine
    from xaiserve.engine.limits import EngineLimits

    built = []
    real = backends.build_occluder

    def counting(*args, **kwargs):
        built.append((args[2], args[4]))  # window, backend
        return real(*args, **kwargs)

    monkeypatch.setattr(backends, "build_occluder", counting)
    config = ForwardConfig(incremental_occlusion=incremental)
    served = resnet_served((3, 32, 32))
    engine = Engine({served.config.name: served}, EngineLimits(), config)
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()
    raw = RawTensor(image.shape, image.astype("<f4").tobytes())

    def request(method: str) -> ExplainRequest:
        item = MethodRequest(method, {}, field="methods[0]", params_field=method)
        return ExplainRequest(model=served.config.name, image=raw, methods=(item,))

    # a request running (held inside its model's lock): the build waits for it
    running, release = threading.Event(), threading.Event()
    real_forward = engine.forward

    def held_forward(*args, **kwargs):
        running.set()
        release.wait(60)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(engine, "forward", held_forward)
    first = threading.Thread(target=engine.explain, args=(request("saliency"),))
    first.start()
    assert running.wait(60)
    warming = engine.warm_up()
    warming.join(1.0)
    assert built == []
    release.set()
    first.join(60)
    warming.join(60)
    default = Occlusion().resolve_params({}, (3, 32, 32), "occlusion")["window"]
    assert built == ([(default, "onnxruntime")] if incremental else [])
    result = engine.explain(request("occlusion"))
    assert result.explanations[0].forward_passes > 1
    assert len(built) == (1 if incremental else 0)  # the request used the warm plan
