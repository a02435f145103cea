"""The stage plan of incremental occlusion: where to cut a traced network, and the crops.

Given the geometry of every node (:mod:`.geometry`), once per model, input shape and window
side (``plan_stages``):

1. the cut points: local nodes through which one tensor carries everything the later nodes
   need (between the blocks of a ResNet, after each layer of a plain CNN; inside a
   residual block once :func:`.geometry.join_shortcuts` has joined its inner activation and
   its shortcut into one tensor);
2. the cuts to use, by dynamic programming over an estimate of the cost per occluded
   image: each stage's multiply-accumulates scaled by the area of its crop, plus copying
   its crop and patch, plus the head (the layers after the last cut) on the full
   activations. No cut (a plain forward) wins when nothing is saved.

The stages then run on crops of one size per stage, so a batch of windows is one call
(torch or ONNX Runtime): see :mod:`.run`. Crops start at multiples of the stage's stride
(so every layer's grid lines up with the full image's), and an output position is used
only when every input it depends on lies in the crop, or beyond the image border where the
crop touches that border (padding then matches too). ``place`` says where each window's
crop and kept region lie.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import fx, nn

from xaiserve.runtime.forward.incremental.geometry import (
    CONSTANT,
    Geometry,
    NodeGeometries,
    analyze,
    local,
    shape_of,
    submodule,
    tensor_shape,
)

COPY_COST = 8.0
"""Estimated cost of copying one activation value, in multiply-accumulates."""
WORTH_IT = 0.85
"""A plan is used only when its estimated cost per occluded image is at most this
fraction of a full forward pass."""
JOINS_WORTH_IT = 0.92
"""A plan with cuts inside residual blocks (``join_shortcuts``) is used only when its
estimated cost is at most this fraction of the plan without: the estimate undercounts
copying, and joins add copies and stages, so a small estimated saving from joins can
be a measured loss (figures: docs/performance.md)."""


@dataclass(frozen=True)
class Stage:
    """One stage of a plan: the nodes after cut ``start`` up to cut ``end`` (graph order
    indices), run on crops of ``crop`` (per axis) of its input grid ``grid_in``.

    span: the end cut's geometry relative to the start cut; absolute: relative to the
    input pixels. rect: the length (per axis) of the region kept from each output, the
    longest region a window of the plan changes at the end cut.
    """

    start: int
    end: int
    span: Geometry
    absolute: Geometry
    grid_in: tuple[int, ...]
    grid_out: tuple[int, ...]
    crop: tuple[int, ...]
    rect: tuple[int, ...]


@dataclass
class Placement:
    """Where one stage's windows go, B x d integer tensors (B windows, d spatial axes):
    ``rect``: the first position of the region kept from each output (``Stage.rect``
    long, inside the output grid, holding every position the window changes);
    ``aligned``: the first input position the crop needs, rounded down to the stride;
    ``length``: the crop length that holds all the stage needs from there: the inputs
    the kept region depends on, and the previous region (pasted in whole)."""

    rect: torch.Tensor
    aligned: torch.Tensor
    length: torch.Tensor

    def offsets(self, stage: Stage) -> torch.Tensor:
        """B x d: each crop's first position: ``aligned``, or flush with the far border
        (a multiple of the stride too: (grid - crop) is one)."""
        room = torch.tensor([n - c for n, c in zip(stage.grid_in, stage.crop, strict=True)])
        return torch.minimum(self.aligned, room)


def place(
    stage: Stage,
    corners: torch.Tensor,
    window: int,
    previous: torch.Tensor,
    previous_length: Sequence[int],
) -> Placement:
    """The placement of windows of side ``window`` at ``corners`` (B x d pixels) in
    ``stage``, whose input regions start at ``previous`` (B x d; ``previous_length``
    long)."""
    rect, aligned, length = [], [], []
    for axis, (absolute, span) in enumerate(zip(stage.absolute, stage.span, strict=True)):
        first = corners[:, axis]
        begin, _ = absolute.changed(first, first + window - 1, stage.grid_out[axis])
        start = begin.clamp(max=stage.grid_out[axis] - stage.rect[axis])
        lo, hi = span.needs(start, start + stage.rect[axis] - 1, stage.grid_in[axis])
        lo = torch.minimum(lo, previous[:, axis])
        hi = torch.maximum(hi, previous[:, axis] + previous_length[axis] - 1)
        lo = lo // span.stride * span.stride
        rect.append(start)
        aligned.append(lo)
        length.append(hi - lo + 1)
    return Placement(torch.stack(rect, 1), torch.stack(aligned, 1), torch.stack(length, 1))


@dataclass(frozen=True)
class StagePlan:
    """The chosen cuts. stages: the local stages (empty: incremental inference does not
    pay); head_start: the last cut (the head runs from there on full activations);
    cost_fraction: estimated cost per occluded image / a full forward pass; reason: why
    there are no stages; changed_fraction: the least an exact plan computes
    (:func:`changed_fraction`)."""

    stages: tuple[Stage, ...]
    head_start: int
    cost_fraction: float
    reason: str = ""
    changed_fraction: float = 1.0


def _node_cost(gm: fx.GraphModule, node: fx.Node) -> float:
    """Estimated multiply-accumulates of one node for one image."""
    shape = shape_of(node)
    if shape is None:
        return 0.0
    out = float(torch.Size(shape).numel())
    if node.op == "call_module":
        module = submodule(gm, node)
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            kernel = float(torch.Size(module.kernel_size).numel())
            return out * module.in_channels / module.groups * kernel
        if isinstance(module, nn.Linear):
            return out * module.in_features
    return out


def cut_points(gm: fx.GraphModule, info: NodeGeometries) -> list[int]:
    """Indices (graph order) of local nodes through which one tensor carries everything
    later nodes need; index 0 is the input."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=-1) for n in nodes}
    cuts, open_until = [], -1  # the last use of the values before the current node
    for i, node in enumerate(nodes):
        geometry = info.get(node)
        local = geometry is not None and geometry is not CONSTANT
        if local and open_until <= i and last_use[node] > i and shape_of(node) is not None:
            cuts.append(i)
        if geometry is not CONSTANT:
            open_until = max(open_until, last_use[node])
    return cuts


def _mixing(info: NodeGeometries) -> str:
    """Where every value starts to depend on the whole input (the first global node fed by
    a local one: a flatten into tokens, attention, global pooling), as the tail of a
    reason; "" when no such node is found."""
    for node, geometry in info.items():
        if geometry is not None:
            continue
        fed = [a for a in node.all_input_nodes if info.get(a) not in (None, CONSTANT)]
        if fed:
            return (
                f"; every value depends on the whole input from {node.op} {node.target} "
                f"(of {fed[0].name}) on"
            )
    return ""


def plan_stages(gm: fx.GraphModule, window: int, starts: Sequence[Sequence[int]]) -> StagePlan:
    """The cheapest cuts for windows of side ``window`` at ``starts`` (per spatial axis,
    the windows' start offsets; every combination is a window). ``gm``: traced, shapes
    propagated, its single placeholder the (normalized) input."""
    nodes = list(gm.graph.nodes)
    placeholder = nodes[0]
    dims = len(starts)
    absolute = analyze(gm, placeholder, dims)
    cuts = cut_points(gm, absolute)
    costs = [_node_cost(gm, n) for n in nodes]
    full = sum(costs)
    bound = changed_fraction(gm, window, starts, absolute)
    if not cuts or cuts[0] != 0 or len(cuts) < 2:
        return StagePlan(
            (), 0, 1.0, "no cut point: the network is not a chain of local layers", bound
        )

    def grid(i: int) -> tuple[int, ...]:
        return tensor_shape(nodes[i])[-dims:]

    def channels(i: int) -> int:
        return int(torch.Size(tensor_shape(nodes[i])[1:-dims]).numel())

    rects = {i: _largest_change(local(absolute[nodes[i]]), window, starts, grid(i)) for i in cuts}
    stages: dict[tuple[int, int], Stage] = {}
    stage_cost: dict[tuple[int, int], float] = {}
    for a, i in enumerate(cuts):
        relative = analyze(gm, nodes[i], dims) if a < len(cuts) - 1 else {}
        for j in cuts[a + 1 :]:
            span = local(relative[nodes[j]])
            stage = _stage(i, j, span, local(absolute[nodes[j]]), grid(i), grid(j), rects[j])
            area = _area(stage.crop) / _area(stage.grid_in)
            copied = channels(i) * _area(stage.crop) + channels(j) * _area(stage.rect)
            copying = COPY_COST * copied
            stages[i, j] = stage
            stage_cost[i, j] = sum(costs[i + 1 : j + 1]) * area + copying

    def head_cost(i: int) -> float:
        return sum(costs[i + 1 :]) + COPY_COST * channels(i) * _area(grid(i))

    best = {0: (0.0, 0)}  # cut -> (cost to reach it, previous cut); the input has none
    for b, j in enumerate(cuts[1:], start=1):
        best[j] = min((best[i][0] + stage_cost[i, j], i) for i in cuts[:b])
    total, last = min((best[i][0] + head_cost(i), i) for i in cuts if i != 0)
    if total > WORTH_IT * full:
        why = f"no saving: estimated {total / full:.0%} of a forward pass{_mixing(absolute)}"
        return StagePlan((), 0, 1.0, why, bound)
    chosen, cut = [], last
    while cut:
        previous = best[cut][1]
        chosen.append(stages[previous, cut])
        cut = previous
    return StagePlan(_final_crops(chosen[::-1], window, starts), last, total / full, "", bound)


def changed_fraction(
    gm: fx.GraphModule,
    window: int,
    starts: Sequence[Sequence[int]],
    absolute: NodeGeometries | None = None,
) -> float:
    """The share of a forward pass a window changes, in the cost model of ``plan_stages``:
    each node's cost times the mean share of its grid a window changes (over the windows
    at every combination of ``starts``; nodes past the local layers: all of it; constants:
    none), summed, over the cost of a full pass. No exact incremental pass computes less,
    whatever its cuts; a plan's crops and copies come on top. ``absolute``: the nodes'
    geometries relative to the input (``analyze``), when already known."""
    nodes = list(gm.graph.nodes)
    dims = len(starts)
    absolute = absolute or analyze(gm, nodes[0], dims)
    firsts = [torch.tensor(axis) for axis in starts]
    changed = full = 0.0
    for node in nodes:
        cost = _node_cost(gm, node)
        geometry = absolute.get(node)
        full += cost
        if not cost:
            continue
        if geometry is None:
            changed += cost
        elif isinstance(geometry, tuple):  # local (a constant changes nothing)
            share = 1.0
            grid = tensor_shape(node)[-dims:]
            for span, first, size in zip(geometry, firsts, grid, strict=True):
                begin, end = span.changed(first, first + window - 1, size)
                share *= float((end - begin + 1).double().mean()) / size
            changed += cost * share
    return changed / full


def _final_crops(
    stages: Sequence[Stage], window: int, starts: Sequence[Sequence[int]]
) -> tuple[Stage, ...]:
    """The chosen stages with crops that hold what :func:`place` asks for every window
    (the cost estimate's crops leave out the previous region pasted in whole)."""
    corners = torch.cartesian_prod(*(torch.tensor(s) for s in starts)).view(-1, len(starts))
    previous, previous_length = corners, (window,) * len(starts)
    final = []
    for stage in stages:
        placement = place(stage, corners, window, previous, previous_length)
        crop = []
        for axis, span in enumerate(stage.span):
            n = stage.grid_in[axis]
            length = int(placement.length[:, axis].max())
            crop.append(min(n, length + (n - length) % span.stride))
        final.append(replace(stage, crop=tuple(crop)))
        previous, previous_length = placement.rect, stage.rect
    return tuple(final)


def _area(sizes: Sequence[int]) -> int:
    return int(torch.Size(sizes).numel())


def _largest_change(
    geometry: Geometry, window: int, starts: Sequence[Sequence[int]], size: Sequence[int]
) -> tuple[int, ...]:
    """Per axis, the longest range of positions any window changes."""
    lengths = []
    for span, axis_starts, n in zip(geometry, starts, size, strict=True):
        first = torch.tensor(axis_starts)
        begin, end = span.changed(first, first + window - 1, n)
        lengths.append(int((end - begin + 1).max()))
    return tuple(lengths)


def _stage(
    start: int,
    end: int,
    span: Geometry,
    absolute: Geometry,
    grid_in: tuple[int, ...],
    grid_out: tuple[int, ...],
    rect: tuple[int, ...],
) -> Stage:
    """The crop a stage needs: outputs ``rect`` long depend on (rect - 1) x stride +
    (hi - lo) + 1 inputs, plus stride - 1 so the crop can start at a multiple of the stride;
    rounded up so (grid - crop) is a multiple of the stride (a crop flush with the far
    border then starts on the grid too); at most the whole grid."""
    crop = []
    for s, r, n in zip(span, rect, grid_in, strict=True):
        length = (r - 1) * s.stride + (s.hi - s.lo) + s.stride
        length += (n - length) % s.stride
        crop.append(min(n, length))
    return Stage(start, end, span, absolute, grid_in, grid_out, tuple(crop), rect)


def describe(plan: StagePlan) -> str:
    """One line: the stages' crops over their grids, the estimated cost fraction and the
    share a window changes (the least an exact plan computes)."""
    crops = ", ".join(
        f"{'x'.join(map(str, s.crop))} of {'x'.join(map(str, s.grid_in))}" for s in plan.stages
    )
    return (
        f"{len(plan.stages)} stages (crops {crops}), about {plan.cost_fraction:.0%} "
        f"of a forward pass per occluded image (a window changes "
        f"{plan.changed_fraction:.0%} of it)"
    )
