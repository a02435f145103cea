"""Layer-wise relevance propagation (Bach et al., 2015, "On pixel-wise explanations for
non-linear classifier decisions by layer-wise relevance propagation").

The explained logit f_y(x) is the relevance at the output; it flows back layer by layer
with the epsilon or the alpha-beta rule (``lrp_rules``) through a torch.fx graph of the
network (``lrp_graph``): BatchNorm merged into the preceding convolution, residual
additions split in proportion to their inputs, ReLU passing relevance unchanged, max
pooling winner-takes-all. Conservation: sum_i R_i(x) = f_y(x) up to what biases and the
stabilizer absorb (exact for bias-free networks as epsilon -> 0, and for alpha-beta).

The input normalization (x - mean) / std of the served model relabels each pixel, so the
relevance of pixel x_i is the relevance of its normalized value. (Captum's ``LRP`` divides
that by std instead; the two agree for mean 0, std 1, which the test uses.)

Shapes: x N x C x *spatial (2-D or 3-D) -> N x C x *spatial. One recorded forward pass per
image (counted), then one local vector-Jacobian product per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from xaiserve.methods.attention.probabilities import attention_reason
from xaiserve.methods.base import AttributionMethod, MethodContext, Param, on_device
from xaiserve.methods.lrp.graph import LrpGraph, lrp_graph
from xaiserve.methods.lrp.rules import (
    Rule,
    affine_layer,
    affine_relevance,
    moved_relevance,
    sum_relevance,
)
from xaiserve.runtime.execution.executor import per_row, single
from xaiserve.runtime.model import ServedModel


class _Recorder(fx.Interpreter):
    """Runs the graph keeping every node's value; in-place modules get a copy of their input
    so recorded values stay as they were when computed."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if getattr(self.module.get_submodule(target), "inplace", False):
            args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        return super().call_module(target, args, kwargs)


def _node_function(
    gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, Any], sources: list[fx.Node]
) -> Callable[..., torch.Tensor]:
    """The node's operation as a function of the values of ``sources`` (others fixed)."""

    def run(*values: torch.Tensor) -> torch.Tensor:
        given = dict(zip(sources, values, strict=True))
        load = lambda n: given[n] if n in given else env[n]
        args, kwargs = fx.node.map_arg(node.args, load), fx.node.map_arg(node.kwargs, load)
        if node.op == "call_module":
            return gm.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_function" and callable(node.target):
            return node.target(*args, **kwargs)
        obj, *rest = args
        return getattr(obj, str(node.target))(*rest, **kwargs)

    return run


def _layer_relevance(
    graph: LrpGraph,
    node: fx.Node,
    env: dict[fx.Node, Any],
    relevance: torch.Tensor,
    rule: Rule,
) -> list[torch.Tensor]:
    """Relevance at each of the node's source nodes."""
    kind, sources = graph.kinds[node], graph.inputs[node]
    values = [env[s] for s in sources]
    if kind == "pass":
        return [relevance]
    if kind == "affine":
        gm = graph.module
        conv = graph.merged.get(node)
        module = gm.get_submodule(str((conv or node).target))
        bn = gm.get_submodule(str(node.target)) if conv is not None else None
        layer, weight, bias = affine_layer(module, bn)
        return [affine_relevance(layer, weight, bias, values[0], relevance, rule)]
    fn = _node_function(graph.module, node, env, sources)
    if kind == "sum":
        return sum_relevance(fn, values, relevance, rule)
    return moved_relevance(fn, values, relevance)


def propagate(graph: LrpGraph, x: torch.Tensor, target: torch.Tensor, rule: Rule) -> torch.Tensor:
    """Relevance at the network input x (N x C x *spatial) for the target logits (N)."""
    recorder = _Recorder(graph.module)
    with torch.no_grad():
        recorder.run(x)
    env = recorder.env
    nodes = list(graph.module.graph.nodes)
    logits_node = next(n for n in nodes if n.op == "output").args[0]
    logits = env[logits_node]
    onehot = torch.zeros_like(logits).scatter_(1, target.view(-1, 1), 1.0)
    pending: dict[fx.Node, torch.Tensor] = {logits_node: onehot * logits}
    for node in reversed(nodes):
        relevance = pending.pop(node, None)
        if relevance is None:
            continue
        if graph.kinds[node] == "input":
            return relevance
        shares = _layer_relevance(graph, node, env, relevance, rule)
        for source, r in zip(graph.inputs[node], shares, strict=True):
            pending[source] = pending[source] + r if source in pending else r
    return torch.zeros_like(x)  # the logits do not depend on the input


def normalized(served: ServedModel, x: torch.Tensor) -> torch.Tensor:
    """The network's input: (x - mean) / std, as ``PixelSpaceModel`` computes it."""
    module = served.module
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - module.mean.view(shape)) / module.std.view(shape)


class Lrp(AttributionMethod):
    name = "lrp"
    params = (
        Param(
            "rule",
            str,
            "epsilon",
            0.0,
            None,
            "epsilon or alpha_beta",
            choices=("epsilon", "alpha_beta"),
        ),
        Param("epsilon", float, 1e-6, 0.0, None, "stabilizer of the denominators"),
        Param("alpha", float, 1.0, 1.0, None, "alpha of alpha-beta (beta = alpha - 1)"),
    )

    def unsupported_reason(self, served: ServedModel) -> str | None:
        reason = super().unsupported_reason(served) or attention_reason(
            served.module.net, self.name
        )
        if reason:
            return reason
        graph = lrp_graph(served.module.net)
        return graph if isinstance(graph, str) else None

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        graph = lrp_graph(ctx.served.module.net)
        if isinstance(graph, str):
            raise RuntimeError(graph)  # unsupported_reason() stops this earlier
        rule = Rule(params["rule"], params["epsilon"], params["alpha"])
        served = ctx.served

        def run(rows: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
            targets = per_row(targets, "LRP")
            return propagate(graph, normalized(served, rows), targets, rule)

        key = ("lrp", rule.name, rule.epsilon, rule.alpha)
        parts = on_device(ctx, key, run, x, target, packs=False)  # see Pass.packs
        return torch.cat([single(p) for p in parts])
