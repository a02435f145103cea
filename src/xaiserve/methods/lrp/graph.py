"""The network as LRP sees it: its torch.fx graph with a relevance rule kind per node.

Every node that carries the input's signal gets one of these kinds:

- ``affine``: z = W a + b with weights: Conv1d/2d/3d, Linear, eval BatchNorm (a per-channel
  scale and shift). A BatchNorm whose input is a convolution used only by it is merged into
  that convolution (W' = W k, b' = b k + t with k = gamma / sqrt(var + eps),
  t = beta - mean k): one LRP layer, as the network computes one affine map.
- ``sum``: sums with non-negative weights and no bias: residual additions of two
  activations, average pooling (modules and functions), ``mean``/``sum``.
- ``move``: operations that only move, select or copy values: reshapes, flatten,
  concatenation, indexing, dropout in eval mode, and max pooling (winner takes all).
  Relevance follows the values (the vector-Jacobian product of the operation).
- ``pass``: element-wise maps where relevance stays put: ReLU (LRP's identity rule for
  activations), and scaling or shifting by a constant (the input normalization
  (x - mean) / std is one: the relevance of a normalized pixel is the pixel's).
- ``const``: nodes that do not carry the input's signal (parameters, shapes).

Anything else (GELU, LayerNorm, products of two activations, ...) has no rule; the first
such node names the reason the network is unsupported.
"""

from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import fx, nn

from xaiserve.methods.graph_inspect import describe, traced

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
MODULE_KINDS: dict[tuple[type[nn.Module], ...], str] = {
    (*CONV, nn.Linear, *BATCHNORM): "affine",
    (
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AvgPool3d,
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveAvgPool3d,
    ): "sum",
    (
        nn.Flatten,
        nn.Unflatten,
        nn.MaxPool1d,
        nn.MaxPool2d,
        nn.MaxPool3d,
        nn.AdaptiveMaxPool1d,
        nn.AdaptiveMaxPool2d,
        nn.AdaptiveMaxPool3d,
    ): "move",
    (nn.ReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity): "pass",
}
FUNCTION_KINDS: dict[object, str] = {
    **dict.fromkeys(
        (
            torch.mean,
            torch.sum,
            F.avg_pool1d,
            F.avg_pool2d,
            F.avg_pool3d,
            F.adaptive_avg_pool1d,
            F.adaptive_avg_pool2d,
            F.adaptive_avg_pool3d,
            "mean",
            "sum",
        ),
        "sum",
    ),
    **dict.fromkeys(
        (
            torch.flatten,
            torch.reshape,
            torch.squeeze,
            torch.unsqueeze,
            torch.permute,
            torch.transpose,
            torch.cat,
            operator.getitem,
            F.max_pool1d,
            F.max_pool2d,
            F.max_pool3d,
            F.adaptive_max_pool1d,
            F.adaptive_max_pool2d,
            F.adaptive_max_pool3d,
            F.dropout,
            "view",
            "reshape",
            "flatten",
            "squeeze",
            "unsqueeze",
            "permute",
            "transpose",
            "contiguous",
            "expand",
        ),
        "move",
    ),
    **dict.fromkeys((torch.relu, F.relu, "relu"), "pass"),
    **dict.fromkeys(("size", "dim", builtins.getattr), "const"),
}
ARITHMETIC = {
    operator.add: "add",
    torch.add: "add",
    "add": "add",
    operator.sub: "sub",
    torch.sub: "sub",
    "sub": "sub",
    operator.mul: "mul",
    torch.mul: "mul",
    "mul": "mul",
    operator.truediv: "div",
    torch.div: "div",
    "div": "div",
}


@dataclass
class LrpGraph:
    """A traced network with a kind per node.

    kinds: node -> kind; inputs: node -> the nodes it takes relevance-carrying values from
    (for a merged BatchNorm: the convolution's input); merged: BatchNorm node -> its conv.
    """

    module: fx.GraphModule
    kinds: dict[fx.Node, str] = field(default_factory=dict)
    inputs: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)
    merged: dict[fx.Node, fx.Node] = field(default_factory=dict)


_COMPILED: WeakKeyDictionary[nn.Module, LrpGraph | str] = WeakKeyDictionary()


def lrp_graph(net: nn.Module) -> LrpGraph | str:
    """The LRP view of ``net`` (cached), or why LRP cannot run on it."""
    found = _COMPILED.get(net)
    if found is None:
        gm = traced(net)
        found = gm if isinstance(gm, str) else _compile(gm)
        _COMPILED[net] = found
    return found


def _module_kind(module: nn.Module) -> str | None:
    if isinstance(module, BATCHNORM) and module.running_var is None:
        return None  # batch statistics in eval mode: not an affine map
    return next((k for types, k in MODULE_KINDS.items() if isinstance(module, types)), None)


def _function_kind(node: fx.Node, carrying: list[fx.Node]) -> str | None:
    target = node.target
    if not _hashable(target):
        return None
    op = ARITHMETIC.get(target)
    if op is None:
        return FUNCTION_KINDS.get(target)
    if len(carrying) == 2:
        return "sum" if op == "add" else None  # products of two activations: no rule
    if op == "div" and node.args[0] is not carrying[0]:
        return None  # constant / activation is not affine
    return "pass"  # a constant scale or shift


def _hashable(target: object) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


def _compile(gm: fx.GraphModule) -> LrpGraph | str:
    graph = LrpGraph(gm)
    for node in gm.graph.nodes:
        carrying = [
            n for n in node.all_input_nodes if graph.kinds.get(n, "const") not in ("const",)
        ]
        kind: str
        if node.op == "placeholder":
            kind = "input"
        elif node.op == "output":
            kind = "output"
        elif not carrying:
            kind = "const"
        elif node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            module_kind = _module_kind(module)
            if module_kind is None:
                return f"LRP has no rule for layer type {type(module).__name__} ({node.target})"
            kind = module_kind
        elif node.op in ("call_function", "call_method"):
            function_kind = _function_kind(node, carrying)
            if function_kind is None:
                return f"LRP has no rule for {describe(node)} (node {node.name})"
            kind = function_kind
        else:
            kind = "const"
        graph.kinds[node] = kind
        graph.inputs[node] = carrying
    output = next(n for n in gm.graph.nodes if n.op == "output")
    if not (isinstance(output.args[0], fx.Node) and graph.kinds[output.args[0]] != "const"):
        return "LRP needs a network that returns one tensor of logits"
    _merge_batchnorm(graph)
    return graph


def _merge_batchnorm(graph: LrpGraph) -> None:
    """BatchNorm right after a convolution used by nothing else: one affine layer."""
    gm = graph.module
    for node, kind in graph.kinds.items():
        if kind != "affine" or not isinstance(gm.get_submodule(str(node.target)), BATCHNORM):
            continue
        (source,) = graph.inputs[node]
        if (
            source.op == "call_module"
            and isinstance(gm.get_submodule(str(source.target)), CONV)
            and len(source.users) == 1
        ):
            graph.merged[node] = source
            graph.inputs[node] = list(graph.inputs[source])
            graph.kinds[source] = "merged"
