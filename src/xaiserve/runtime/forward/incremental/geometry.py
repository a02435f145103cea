"""What an occluding window changes: the geometry of a traced network's nodes.

An occluded image differs from the original only inside its window, and a convolution's
output at a position depends only on the input around it. So an occluded image's early
activations equal the original's except in a region around the window, and they can be
computed on a crop around that region and pasted into the original's activations
(incremental inference; Nakandala et al., 2019, "Incremental and approximate inference
for faster occlusion-based deep CNN explanations"). The result is exact: the same logits
as a full forward pass, up to floating-point summation order.

This module finds the geometry of every node of the network's ``torch.fx`` graph along
each spatial axis, a :class:`Span`: output position p depends on input positions
p * stride + lo ... p * stride + hi. Convolutions and pooling windows compose spans;
element-wise operations (batch norm in eval mode, activations, sums of branches, channel
concatenation and slicing, arithmetic with per-channel constants) merge them; anything
else (global pooling, flatten, linear layers, interpolation...) makes a node global
(``analyze``). ``join_shortcuts`` joins a residual block's inner activation and its
shortcut into one tensor, so that the plan (:mod:`.plan`) finds cut points inside
residual blocks too. Tensors are N x C x *spatial.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from xaiserve.runtime.tracing import symbolic_trace

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

NodeGeometries = dict[fx.Node, Geometry | _Constant | None]
"""Each node's geometry relative to a reference node (``analyze``): CONSTANT when independent
of it, None when global."""


def local(geometry: Geometry | _Constant | None) -> Geometry:
    """The spans of a local node's geometry; ValueError for a constant or global node."""
    if not isinstance(geometry, tuple):
        raise ValueError(f"not a local node: {geometry!r}")
    return geometry


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
        span.window(k, s, p, d)
        for span, k, s, p, d in zip(inner, kernel, stride, pad, dilation, strict=True)
    )


def window_params(module: nn.Module, dims: int) -> tuple[tuple[int, ...], ...]:
    """(kernel, stride, padding, dilation) per axis of a convolution or pooling module with
    ``dims`` spatial axes (numeric padding)."""

    def per_axis(value: Any) -> tuple[int, ...]:  # torch types module attributes loosely
        return tuple(value) if isinstance(value, Sequence) else (value,) * dims

    kernel, stride = per_axis(module.kernel_size), per_axis(module.stride or module.kernel_size)
    return kernel, stride, per_axis(module.padding), per_axis(getattr(module, "dilation", 1))


def _spatial_uniform(node: fx.Node, dims: int) -> bool:
    """Whether a constant broadcasts the same value over the last ``dims`` axes."""
    shape = shape_of(node)
    if shape is None:
        return True  # a Python number
    return all(size == 1 for size in shape[-dims:])


def analyze(gm: fx.GraphModule, origin: fx.Node, dims: int) -> NodeGeometries:
    """Each node's geometry relative to ``origin`` (CONSTANT: independent of it; None:
    global, or reached through an operation this analysis does not know). Nodes must
    carry ShapeProp's ``tensor_meta``."""
    info: NodeGeometries = {}
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
    info: NodeGeometries,
    dims: int,
) -> Geometry | _Constant | None:
    inputs = node.all_input_nodes
    if all(info[n] is CONSTANT for n in inputs):
        return CONSTANT
    if any(info[n] is None for n in inputs):
        return None
    inner = [n for n in inputs if info[n] is not CONSTANT]
    constants = [n for n in inputs if info[n] is CONSTANT]
    if node.op == "call_module":
        module = submodule(gm, node)
        if isinstance(module, WINDOW_MODULES) and len(inner) == 1:
            return _window_geometry(module, local(info[inner[0]]))
        if isinstance(module, _LOCAL_MODULES) and len(inner) == 1:
            return info[inner[0]]
        return None
    elementwise = (node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ELEMENTWISE_METHODS
    )
    if node.op == "call_function" and node.target is torch.cat:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        elementwise = bool(dim == 1)
    if node.op == "call_function" and node.target is operator.getitem:
        elementwise = _channel_slice(node.args[1])
    if not elementwise or not all(_spatial_uniform(n, dims) for n in constants):
        return None
    return _merge([local(info[n]) for n in inner])


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
        shapes = [shape_of(m) for m in live]
        if len(live) != 2 or shapes[0] is None or shapes[1] is None:
            continue
        if shapes[0][2:] != shapes[1][2:]:
            continue
        older = live[0] if live[1] is node else live[1]
        split = tensor_shape(older)[1]
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
        submodule(gm, node), nn.Conv1d | nn.Conv2d | nn.Conv3d
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


# ---------------------------------------------------------------------------- traced graphs


def trace(module: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """``module`` traced by torch.fx, every node annotated with its output's shape
    (ShapeProp on ``example``, 1 x C x *spatial). Raises what the tracer raises."""
    gm = symbolic_trace(module)
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    return gm


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The shape of a node's value (ShapeProp's ``tensor_meta``), None when not one tensor."""
    meta = node.meta.get("tensor_meta")  # a tuple of them for tuple outputs
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def tensor_shape(node: fx.Node) -> tuple[int, ...]:
    """The shape of a node's tensor value; ValueError when it has none (``shape_of``)."""
    shape = shape_of(node)
    if shape is None:
        raise ValueError(f"node {node.name} has no tensor shape")
    return shape


def activation_shape(gm: fx.GraphModule, index: int) -> tuple[int, ...]:
    """The shape of one image's value at node ``index`` (graph order) of a traced ``gm``,
    without the batch axis (C x *spatial)."""
    return tensor_shape(list(gm.graph.nodes)[index])[1:]


def submodule(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """The module a ``call_module`` node calls."""
    return gm.get_submodule(str(node.target))
