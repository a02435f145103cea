"""Incremental forward passes for occlusion: recompute only what a window changes.

An occluded image differs from the original only inside its window, and a convolution's
output at a position depends only on the input around it. So an occluded image's early
activations equal the original's except in a region around the window, and they can be
computed on a crop around that region and pasted into the original's activations
(incremental inference; Nakandala et al., 2019, "Incremental and approximate inference
for faster occlusion-based deep CNN explanations"). The result is exact: the same logits
as a full forward pass, up to floating-point summation order.

This module finds, once per model, input shape and window side (``plan_stages``):

1. the geometry of every node of the network's ``torch.fx`` graph along each spatial
   axis, a :class:`Span`: output position p depends on input positions
   p * stride + lo ... p * stride + hi. Convolutions and pooling windows compose spans;
   element-wise operations (batch norm in eval mode, activations, sums of branches,
   channel concatenation and slicing, arithmetic with per-channel constants) merge them;
   anything else (global pooling, flatten, linear layers, interpolation...) makes a node
   global;
2. the cut points: local nodes through which one tensor carries everything the later nodes
   need (between the blocks of a ResNet, after each layer of a plain CNN; inside a
   residual block once ``join_shortcuts`` has joined its inner activation and its
   shortcut into one tensor);
3. the cuts to use, by dynamic programming over an estimate of the cost per occluded
   image: each stage's multiply-accumulates scaled by the area of its crop, plus copying
   its crop and patch, plus the head (the layers after the last cut) on the full
   activations. No cut (a plain forward) wins when nothing is saved.

The stages then run on crops of one size per stage, so a batch of windows is one call
(torch or ONNX Runtime): see :mod:`.incremental_run`. Crops start at multiples of the
stage's stride (so every layer's grid lines up with the full image's), and an output
position is used only when every input it depends on lies in the crop, or beyond the
image border where the crop touches that border (padding then matches too).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from xaiserve.runtime.tracing import symbolic_trace

COPY_COST = 8.0
"""Estimated cost of copying one activation value, in multiply-accumulates."""
WORTH_IT = 0.85
"""A plan is used only when its estimated cost per occluded image is at most this
fraction of a full forward pass."""
JOINS_WORTH_IT = 0.92
"""A plan with cuts inside residual blocks (``join_shortcuts``) is used only when its
estimated cost is at most this fraction of the plan without: the estimate undercounts
copying, and joins add copies and stages (ResNet-18 224, window 15: estimated 90%,
measured 1.05x faster; ResNet-50, window 31: estimated 96%, measured 0.77x)."""

_LOCAL_MODULES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
WINDOW_MODULES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
)
_ELEMENTWISE_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.neg,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.sigmoid,
    F.tanh,
}
_ELEMENTWISE_METHODS = {
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "relu",
    "sigmoid",
    "tanh",
    "clamp",
    "contiguous",
}


@dataclass(frozen=True)
class Span:
    """Along one spatial axis: position p of a node depends on positions
    p * stride + lo ... p * stride + hi (inclusive) of a reference node."""

    stride: int = 1
    lo: int = 0
    hi: int = 0

    def window(self, kernel: int, stride: int, padding: int, dilation: int) -> Span:
        """This span followed by a sliding window (a convolution or pooling)."""
        return Span(
            self.stride * stride,
            self.lo - padding * self.stride,
            self.hi + (dilation * (kernel - 1) - padding) * self.stride,
        )

    def changed(
        self, first: torch.Tensor, last: torch.Tensor, size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first and last positions (of a grid of ``size``) depending on any
        reference position first..last (integer tensors of one shape, one range each)."""
        begin = (-((self.hi - first) // self.stride)).clamp(min=0)
        end = ((last - self.lo) // self.stride).clamp(max=size - 1)
        return begin, end

    def needs(
        self, first: torch.Tensor, last: torch.Tensor, size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first and last reference positions (of a grid of ``size``) positions
        first..last depend on."""
        return (
            (first * self.stride + self.lo).clamp(min=0),
            (last * self.stride + self.hi).clamp(max=size - 1),
        )


Geometry = tuple[Span, ...]
"""One span per spatial axis."""


class _Constant:
    """Marks nodes that do not depend on the input (parameters, literals)."""


CONSTANT = _Constant()


def _merge(geometries: Sequence[Geometry]) -> Geometry | None:
    """The geometry of an element-wise operation of inputs with these geometries."""
    first = geometries[0]
    if any(len(g) != len(first) for g in geometries):
        return None
    merged = []
    for axis in range(len(first)):
        spans = [g[axis] for g in geometries]
        if len({s.stride for s in spans}) != 1:
            return None
        merged.append(Span(spans[0].stride, min(s.lo for s in spans), max(s.hi for s in spans)))
    return tuple(merged)


def _window_geometry(module: nn.Module, inner: Geometry) -> Geometry | None:
    dims = len(inner)
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) and module.ceil_mode:
        return None
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)) and module.ceil_mode:
        return None
    padding = getattr(module, "padding", 0)
    if isinstance(padding, str):  # "same" / "valid" convolutions
        return None
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and module.padding_mode != "zeros":
        return None
    kernel, stride, pad, dilation = window_params(module, dims)
    if len(kernel) != dims:
        return None
    return tuple(
        span.window(k, s, p, d) for span, k, s, p, d in zip(inner, kernel, stride, pad, dilation)
    )


def window_params(module: nn.Module, dims: int) -> tuple[tuple[int, ...], ...]:
    """(kernel, stride, padding, dilation) per axis of a convolution or pooling module with
    ``dims`` spatial axes (numeric padding)."""

    def per_axis(value: int | Sequence[int]) -> tuple[int, ...]:
        return tuple(value) if isinstance(value, Sequence) else (value,) * dims

    kernel, stride = per_axis(module.kernel_size), per_axis(module.stride or module.kernel_size)
    return kernel, stride, per_axis(module.padding), per_axis(getattr(module, "dilation", 1))


def _spatial_uniform(node: fx.Node, dims: int) -> bool:
    """Whether a constant broadcasts the same value over the last ``dims`` axes."""
    shape = _shape(node)
    if shape is None:
        return True  # a Python number
    return all(size == 1 for size in shape[-dims:])


def analyze(
    gm: fx.GraphModule, origin: fx.Node, dims: int
) -> dict[fx.Node, Geometry | _Constant | None]:
    """Each node's geometry relative to ``origin`` (CONSTANT: independent of it; None:
    global, or reached through an operation this analysis does not know). Nodes must
    carry ShapeProp's ``tensor_meta``."""
    info: dict[fx.Node, Geometry | _Constant | None] = {}
    for node in gm.graph.nodes:
        if node is origin:
            info[node] = (Span(),) * dims
        elif node.op == "output":
            continue
        elif node.op in ("placeholder", "get_attr"):
            info[node] = CONSTANT if node.op == "get_attr" else None
        else:
            info[node] = _node_geometry(gm, node, info, dims)
    return info


def _node_geometry(
    gm: fx.GraphModule,
    node: fx.Node,
    info: dict[fx.Node, Geometry | _Constant | None],
    dims: int,
) -> Geometry | _Constant | None:
    inputs = node.all_input_nodes
    if all(info[n] is CONSTANT for n in inputs):
        return CONSTANT
    if any(info[n] is None for n in inputs):
        return None
    local = [n for n in inputs if info[n] is not CONSTANT]
    constants = [n for n in inputs if info[n] is CONSTANT]
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, WINDOW_MODULES) and len(local) == 1:
            return _window_geometry(module, info[local[0]])
        if isinstance(module, _LOCAL_MODULES) and len(local) == 1:
            return info[local[0]]
        return None
    elementwise = (node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ELEMENTWISE_METHODS
    )
    if node.op == "call_function" and node.target is torch.cat:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        elementwise = dim == 1
    if node.op == "call_function" and node.target is operator.getitem:
        elementwise = _channel_slice(node.args[1])
    if not elementwise or not all(_spatial_uniform(n, dims) for n in constants):
        return None
    return _merge([info[n] for n in local])


def _channel_slice(index: object) -> bool:
    """Whether a subscript keeps every image and position, slicing channels only."""
    return (
        isinstance(index, tuple)
        and len(index) == 2
        and index[0] == slice(None)
        and isinstance(index[1], slice)
    )


# ----------------------------------------------------------------------- joining shortcuts


def join_shortcuts(gm: fx.GraphModule, example: torch.Tensor) -> int:
    """More cut points, inside residual blocks. Where exactly two tensors are live, on one
    grid, and the newer feeds a convolution (a block's inner activation and its shortcut),
    both become one: z = cat([older, newer], dim=1) right after the newer, and the later
    nodes read them back as channel slices of z, which then carries everything they need.
    Every computing node is first moved right after the last of its inputs, so that a
    shortcut computed from a block's input (a strided 1 x 1 convolution) is ready before
    the block's convolutions. The function stays the same. Returns the joins made; shapes
    propagated again on ``example``."""
    _early_order(gm)
    joins, made = 0, set()
    for node in list(gm.graph.nodes):
        if node.op not in _COMPUTING or node in made:
            continue
        if not any(_is_conv(gm, u) for u in node.users):
            continue
        nodes = list(gm.graph.nodes)  # as joined so far
        index = {n: i for i, n in enumerate(nodes)}
        here = index[node]
        live = [
            m
            for m in nodes[: here + 1]
            if m.op != "get_attr" and max((index[u] for u in m.users), default=-1) > here
        ]
        shapes = [_shape(m) for m in live]
        if len(live) != 2 or None in shapes or shapes[0][2:] != shapes[1][2:]:
            continue
        older = live[0] if live[1] is node else live[1]
        split = _shape(older)[1]
        with gm.graph.inserting_after(node):
            joined = gm.graph.call_function(torch.cat, ([older, node],), {"dim": 1})
        with gm.graph.inserting_after(joined):
            first = gm.graph.call_function(
                operator.getitem, (joined, (slice(None), slice(0, split)))
            )
        with gm.graph.inserting_after(first):
            second = gm.graph.call_function(
                operator.getitem, (joined, (slice(None), slice(split, None)))
            )
        for user in list(older.users):
            if user is not joined and index.get(user, -1) > here:
                user.replace_input_with(older, first)
        for user in list(node.users):
            if user is not joined:
                user.replace_input_with(node, second)
        first.meta["tensor_meta"] = older.meta["tensor_meta"]  # for the next joins' checks
        second.meta["tensor_meta"] = node.meta["tensor_meta"]
        made |= {joined, first, second}
        joins += 1
    gm.graph.lint()
    gm.recompile()
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    return joins


_COMPUTING = ("call_module", "call_function", "call_method")


def _is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(
        gm.get_submodule(node.target), nn.Conv1d | nn.Conv2d | nn.Conv3d
    )


def _early_order(gm: fx.GraphModule) -> None:
    """Moves every computing node right after the last of its inputs (graph order)."""
    for node in list(gm.graph.nodes):
        if node.op not in _COMPUTING or not node.all_input_nodes:
            continue
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        last = max(node.all_input_nodes, key=order.__getitem__)
        if order[last] + 1 < order[node]:
            last.append(node)


# ------------------------------------------------------------------------------ planning


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
        room = torch.tensor([n - c for n, c in zip(stage.grid_in, stage.crop)])
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
    for axis, (absolute, span) in enumerate(zip(stage.absolute, stage.span)):
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


def trace(module: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """``module`` traced by torch.fx, every node annotated with its output's shape
    (ShapeProp on ``example``, 1 x C x *spatial). Raises what the tracer raises."""
    gm = symbolic_trace(module)
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    return gm


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")  # a tuple of them for tuple outputs
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def activation_shape(gm: fx.GraphModule, index: int) -> tuple[int, ...]:
    """The shape of one image's value at node ``index`` (graph order) of a traced ``gm``,
    without the batch axis (C x *spatial)."""
    return _shape(list(gm.graph.nodes)[index])[1:]


def _node_cost(gm: fx.GraphModule, node: fx.Node) -> float:
    """Estimated multiply-accumulates of one node for one image."""
    shape = _shape(node)
    if shape is None:
        return 0.0
    out = float(torch.Size(shape).numel())
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            kernel = float(torch.Size(module.kernel_size).numel())
            return out * module.in_channels / module.groups * kernel
        if isinstance(module, nn.Linear):
            return out * module.in_features
    return out


def cut_points(gm: fx.GraphModule, info: dict) -> list[int]:
    """Indices (graph order) of local nodes through which one tensor carries everything
    later nodes need; index 0 is the input."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=-1) for n in nodes}
    cuts, open_until = [], -1  # the last use of the values before the current node
    for i, node in enumerate(nodes):
        geometry = info.get(node)
        local = geometry is not None and geometry is not CONSTANT
        if local and open_until <= i and last_use[node] > i and _shape(node) is not None:
            cuts.append(i)
        if geometry is not CONSTANT:
            open_until = max(open_until, last_use[node])
    return cuts


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
        return _shape(nodes[i])[-dims:]

    def channels(i: int) -> int:
        return int(torch.Size(_shape(nodes[i])[1:-dims]).numel())

    rects = {i: _largest_change(absolute[nodes[i]], window, starts, grid(i)) for i in cuts}
    stages: dict[tuple[int, int], Stage] = {}
    stage_cost: dict[tuple[int, int], float] = {}
    for a, i in enumerate(cuts):
        relative = analyze(gm, nodes[i], dims) if a < len(cuts) - 1 else {}
        for j in cuts[a + 1 :]:
            span = relative[nodes[j]]
            stage = _stage(i, j, span, absolute[nodes[j]], grid(i), grid(j), rects[j])
            area = _area(stage.crop) / _area(stage.grid_in)
            copied = channels(i) * _area(stage.crop) + channels(j) * _area(stage.rect)
            copying = COPY_COST * copied
            stages[i, j] = stage
            stage_cost[i, j] = sum(costs[i + 1 : j + 1]) * area + copying

    def head_cost(i: int) -> float:
        return sum(costs[i + 1 :]) + COPY_COST * channels(i) * _area(grid(i))

    best = {0: (0.0, None)}  # cut -> (cost to reach it, previous cut)
    for b, j in enumerate(cuts[1:], start=1):
        best[j] = min((best[i][0] + stage_cost[i, j], i) for i in cuts[:b])
    total, last = min((best[i][0] + head_cost(i), i) for i in cuts if i != 0)
    if total > WORTH_IT * full:
        return StagePlan(
            (), 0, 1.0, f"no saving: estimated {total / full:.0%} of a forward pass", bound
        )
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
    absolute: dict[fx.Node, Geometry | _Constant | None] | None = None,
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
        elif geometry is not CONSTANT:
            share = 1.0
            for span, first, size in zip(geometry, firsts, _shape(node)[-dims:]):
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
    for span, axis_starts, n in zip(geometry, starts, size):
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
    for s, r, n in zip(span, rect, grid_in):
        length = (r - 1) * s.stride + (s.hi - s.lo) + s.stride
        length += (n - length) % s.stride
        crop.append(min(n, length))
    return Stage(start, end, span, absolute, grid_in, grid_out, tuple(crop), rect)


def _undo_joins(graph: fx.Graph) -> int:
    """Undoes, inside one stage, the joins of ``join_shortcuts`` that are not its output:
    a z = cat(parts, dim=1) read back only as channel slices that are exactly its parts.
    Only a join at a cut the plan uses needs the one tensor; elsewhere it copies both
    parts for nothing, and on ONNX Runtime it keeps the convolutions from fusing with the
    sums after them (ResNet-18 at 224, window 15, batches of 32 windows on ONNX Runtime,
    interleaved: the head 8-14% faster without them, a whole batch 4-6%; torch unchanged).
    Returns the joins undone."""
    output = next(n for n in graph.nodes if n.op == "output")
    undone = 0
    for node in list(graph.nodes):
        if node.target is not torch.cat or node in output.all_input_nodes:
            continue
        parts = node.args[0]
        dim = node.kwargs["dim"] if "dim" in node.kwargs else (node.args[1:2] or (0,))[0]
        shapes = [_shape(part) for part in parts]
        if dim != 1 or None in shapes:
            continue
        bounds, total = {}, 0
        for part, shape in zip(parts, shapes):
            bounds[(total, total + shape[1])] = part
            total += shape[1]
        reads = {user: _channel_range(user, total) for user in node.users}
        if not reads or any(r not in bounds for r in reads.values()):
            continue
        for user, channels in reads.items():
            user.replace_all_uses_with(bounds[channels])
            graph.erase_node(user)
        graph.erase_node(node)
        undone += 1
    return undone


def _channel_range(node: fx.Node, channels: int) -> tuple[int, int] | None:
    """(first, end) when ``node`` is ``z[:, first:end]`` of a tensor with ``channels``
    channels, else None."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    index = node.args[1]
    if not (
        isinstance(index, tuple)
        and len(index) == 2
        and index[0] == slice(None)
        and isinstance(index[1], slice)
        and index[1].step in (None, 1)
    ):
        return None
    first, end, _ = index[1].indices(channels)
    return first, end


def stage_module(gm: fx.GraphModule, start: int, end: int | None) -> fx.GraphModule:
    """The nodes after graph index ``start`` up to ``end`` (None: to the output) as a
    module of one input, the value of node ``start``. Constants the stage uses (parameters,
    buffers and what is computed from them) are copied into it."""
    nodes = list(gm.graph.nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {nodes[start]: graph.placeholder("x")}
    own = nodes[start + 1 : (len(nodes) - 1 if end is None else end + 1)]

    def copy(node: fx.Node) -> fx.Node:
        if node not in env:  # a constant computed before the stage
            env[node] = graph.node_copy(node, copy)
        return env[node]

    for node in own:
        env[node] = graph.node_copy(node, copy)
    if end is None:
        graph.output(fx.map_arg(nodes[-1].args[0], copy))
    else:
        graph.output(env[nodes[end]])
    _undo_joins(graph)
    stage = fx.GraphModule(gm, graph)
    stage.graph.eliminate_dead_code()
    stage.recompile()
    return stage.eval()
