"""A plan's stages as modules of their own, and their rewrite without a ring.

``stage_module`` cuts the nodes of one stage (:mod:`.plan`) out of the traced graph into a
graph module of one input, undoing the shortcut joins (:func:`.geometry.join_shortcuts`)
that the stage does not need at its output.

A stage run on a crop with the network's own
padding computes an output at every crop position, but only the region ``Stage.rect``
holds positions the window changed; the rest, a ring as wide as the layers' reach, is
recomputed for nothing and then cut away (a 3 x 3 convolution on a 12 x 12 crop keeps
10 x 10 of its 12 x 12 outputs: 31% of its arithmetic wasted). Where the stage is one
layer of sliding windows (convolutions or pooling reading the stage input itself, plus
element-wise work), the same outputs come from valid (unpadded) windows on a crop taken
from the input's activation padded once per image with what the padding stood for (0
for convolutions, -inf for max pooling): a crop of exactly the inputs the kept region
needs gives exactly that region, with no ring and no copy out of the output.

``make_valid`` rewrites a stage module that way, or says why it cannot (a window reading
the output of another window, whose padding would have to be zero at the image border
but is computed there; paddings of different meaning in one stage; average pooling that
leaves padding out of its count; a strided stage that also passes its input through).
Shapes: stage tensors are N x C x *spatial, the last ``len(span)`` axes spatial.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from xaiserve.runtime.forward.incremental.geometry import (
    WINDOW_MODULES,
    shape_of,
    submodule,
    tensor_shape,
    window_params,
)
from xaiserve.runtime.forward.incremental.plan import Stage

# ----------------------------------------------------------------------------- stage modules


def _undo_joins(graph: fx.Graph) -> int:
    """Undoes, inside one stage, the joins of ``join_shortcuts`` that are not its output:
    a z = cat(parts, dim=1) read back only as channel slices that are exactly its parts.
    Only a join at a cut the plan uses needs the one tensor; elsewhere it copies both
    parts for nothing, and on ONNX Runtime it keeps the convolutions from fusing with the
    sums after them (figures: docs/performance.md). Returns the joins undone."""
    output = next(n for n in graph.nodes if n.op == "output")
    undone = 0
    for node in list(graph.nodes):
        if node.target is not torch.cat or node in output.all_input_nodes:
            continue
        parts = node.args[0]
        dim = node.kwargs["dim"] if "dim" in node.kwargs else (node.args[1:2] or (0,))[0]
        shapes = [shape_of(part) for part in parts]
        if dim != 1 or None in shapes:
            continue
        bounds: dict[tuple[int, int] | None, fx.Node] = {}  # None: not a channel slice
        total = 0
        for part in parts:
            channels = tensor_shape(part)[1]
            bounds[(total, total + channels)] = part
            total += channels
        reads = {user: _channel_range(user, total) for user in node.users}
        if not reads or any(r not in bounds for r in reads.values()):
            continue
        for user, read in reads.items():
            user.replace_all_uses_with(bounds[read])
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


# ------------------------------------------------------------------------------ valid windows

_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


@dataclass(frozen=True)
class ValidStage:
    """A stage rewritten with valid windows.

    module: the rewritten stage (input B x C x *length -> output B x C' x *rect);
    front, back: per axis, the padding the input's activation needs before and after its
    grid (front = -span.lo, so crop k of a window whose kept region starts at r lies at
    r * stride in the padded grid); length: the crop per axis, exactly the inputs the
    kept region needs; fill: the padding's value (0.0, or -inf for max pooling).
    """

    module: fx.GraphModule
    front: tuple[int, ...]
    back: tuple[int, ...]
    length: tuple[int, ...]
    fill: float


class _Reject(Exception):
    """The stage cannot run with valid windows (the message says why)."""


def make_valid(module: fx.GraphModule, stage: Stage) -> tuple[ValidStage | None, str]:
    """(the stage rewritten, "") or (None, why not). ``module``: the stage's graph module
    (``stage_module``); it is not changed (the rewrite shares its weights)."""
    if any(s.lo > 0 for s in stage.span):
        return None, "the stage reads no input before its output position"
    length = tuple(
        (r - 1) * s.stride + (s.hi - s.lo) + 1 for s, r in zip(stage.span, stage.rect, strict=True)
    )
    front = tuple(-s.lo for s in stage.span)
    back = tuple(
        max(0, (n_out - 1) * s.stride + s.hi - (n_in - 1))
        for s, n_in, n_out in zip(stage.span, stage.grid_in, stage.grid_out, strict=True)
    )
    rewritten = fx.GraphModule(module, copy.deepcopy(module.graph))
    try:
        fill = _Rewriter(rewritten, stage, length).run()
    except _Reject as reason:
        return None, str(reason)
    rewritten.graph.lint()
    rewritten.recompile()
    return ValidStage(rewritten.eval(), front, back, length, fill), ""


class _Rewriter:
    """Walks a stage graph in order; each tensor node is "in" (on the crop's positions: the
    input and element-wise functions of it) or "out" (on the kept region's positions: a
    window's output and what is computed from it). Windows must read "in" tensors; where
    "in" and "out" tensors meet, the "in" one is sliced to the kept region (stride 1
    only). Constants (parameters, numbers) are neither."""

    def __init__(self, gm: fx.GraphModule, stage: Stage, length: tuple[int, ...]) -> None:
        self.gm, self.stage, self.length, self.dims = gm, stage, length, len(stage.span)
        self.graph = gm.graph
        self.kind: dict[fx.Node, str] = {}
        self.raw: set[fx.Node] = set()  # the input itself, or channel slices / joins of it
        self.fills: set[float] = set()
        self.windows = 0
        self.strided = any(s.stride != 1 for s in stage.span)

    def run(self) -> float:
        for node in list(self.graph.nodes):
            if node.op == "placeholder":
                self.kind[node] = "in"
                self.raw.add(node)
            elif node.op == "output":
                (value,) = node.args
                if isinstance(value, fx.Node) and self.kind.get(value) == "in":
                    node.args = (self._to_out(value, node),)
            elif node.op == "get_attr":
                continue
            else:
                self._visit(node)
        if not self.windows and any(s.lo or s.hi for s in self.stage.span):
            raise _Reject("the stage's reach comes from no window it can rewrite")
        if len(self.fills) > 1:
            raise _Reject("its windows pad with different values")
        return self.fills.pop() if self.fills else 0.0

    def _visit(self, node: fx.Node) -> None:
        tensors = [n for n in node.all_input_nodes if n in self.kind]
        if not tensors:
            return  # a constant computed in the stage
        if node.op == "call_module" and isinstance(submodule(self.gm, node), WINDOW_MODULES):
            self._window(node, tensors)
            return
        kinds = {self.kind[n] for n in tensors}
        if kinds == {"in", "out"}:
            for n in tensors:
                if self.kind[n] == "in":
                    node.replace_input_with(n, self._to_out(n, node))
        self.kind[node] = "out" if "out" in kinds else "in"
        if kinds == {"in"} and self._keeps_raw(node, tensors):
            self.raw.add(node)

    def _keeps_raw(self, node: fx.Node, tensors: list[fx.Node]) -> bool:
        """Channel slices and channel joins of raw tensors hold the input's own values."""
        if not all(n in self.raw for n in tensors):
            return False
        if node.op == "call_function" and node.target is operator.getitem:
            return True  # the geometry analysis lets only channel slices through
        return node.op == "call_function" and node.target is torch.cat

    def _window(self, node: fx.Node, tensors: list[fx.Node]) -> None:
        (source,) = tensors
        if self.kind[source] != "in":
            raise _Reject("a window reads another window's output")
        module = submodule(self.gm, node)
        kernel, stride, padding, dilation = window_params(module, self.dims)
        if any(p > 0 for p in padding):
            if source not in self.raw:
                raise _Reject("a padded window reads a computed value, not the stage input")
            self.fills.add(_fill(module))
        slices = []
        for axis, span in enumerate(self.stage.span):
            if stride[axis] != span.stride:
                raise _Reject("windows of different strides")
            offset = -padding[axis] - span.lo
            reach = dilation[axis] * (kernel[axis] - 1)
            needed = (self.stage.rect[axis] - 1) * stride[axis] + reach + 1
            if offset < 0 or offset + needed > self.length[axis]:
                raise _Reject("a window reaches outside the stage's span")
            slices.append(slice(offset, offset + needed))
        if any(s != slice(0, n) for s, n in zip(slices, self.length, strict=True)):
            with self.graph.inserting_before(node):
                cropped = self.graph.call_function(operator.getitem, (source, _index(slices)))
            node.replace_input_with(source, cropped)
        valid: Any = copy.copy(module)  # shares the weights; torch types padding loosely
        valid.padding = (0,) * self.dims
        name = f"valid_{self.windows}"
        self.gm.add_submodule(name, valid)
        node.target = name
        self.kind[node] = "out"
        self.windows += 1

    def _to_out(self, node: fx.Node, user: fx.Node) -> fx.Node:
        """An "in" tensor sliced to the kept region (the stage must have stride 1)."""
        if self.strided:
            raise _Reject("a strided stage passes its input through")
        slices = [
            slice(-span.lo, -span.lo + r)
            for span, r in zip(self.stage.span, self.stage.rect, strict=True)
        ]
        with self.graph.inserting_before(user):
            return self.graph.call_function(operator.getitem, (node, _index(slices)))


def _index(slices: list[slice]) -> Any:
    """``x[..., *slices]``'s subscript: ``slices`` over the last axes (the spatial ones)."""
    return (..., *slices)


def _fill(module: nn.Module) -> float:
    """What a window's padding stands for: 0 (convolution, average pooling that counts the
    padding), -inf (max pooling)."""
    if isinstance(module, _MAX_POOLS):
        return -math.inf
    if isinstance(module, _AVG_POOLS) and not module.count_include_pad:
        raise _Reject("average pooling that leaves the padding out of its count")
    return 0.0
