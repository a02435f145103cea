"""What a served network computes, seen through torch.fx and its module tree.

Methods that rewrite the backward pass (guided backpropagation, deconvolution, DeepLIFT,
LRP) are only right when every operation of the network has a rule. ``traced`` gives the
network's fx graph once per network (cached); ``functional_uses`` finds operations applied
as functions (``torch.relu(x)``), which module hooks cannot see; ``leaf_modules`` lists the
modules without children, for networks fx cannot trace.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import fx, nn

from xaiserve.runtime.tracing import symbolic_trace

_TRACED: WeakKeyDictionary[nn.Module, fx.GraphModule | str] = WeakKeyDictionary()

RELU_FUNCTIONS: frozenset[Any] = frozenset(
    {torch.relu, torch.relu_, F.relu, F.relu_, "relu", "relu_"}
)
"""Functional ReLU: call_function targets and call_method names."""

NONLINEAR_FUNCTIONS: frozenset[Any] = RELU_FUNCTIONS | frozenset(
    {
        torch.sigmoid,
        torch.tanh,
        torch.exp,
        torch.log,
        torch.softmax,
        torch.max,
        torch.maximum,
        torch.minimum,
        torch.clamp,
        torch.abs,
        operator.abs,
        operator.pow,
        F.gelu,
        F.silu,
        F.elu,
        F.leaky_relu,
        F.softplus,
        F.softmax,
        F.log_softmax,
        F.sigmoid,
        F.tanh,
        F.hardtanh,
        F.relu6,
        F.mish,
        F.hardswish,
        F.max_pool1d,
        F.max_pool2d,
        F.max_pool3d,
        F.adaptive_max_pool1d,
        F.adaptive_max_pool2d,
        F.adaptive_max_pool3d,
        F.layer_norm,
        F.group_norm,
        "sigmoid",
        "tanh",
        "exp",
        "log",
        "softmax",
        "clamp",
        "abs",
        "pow",
        "max",
    }
)
"""Functional nonlinearities (targets and method names) that no module hook intercepts."""


def traced(net: nn.Module) -> fx.GraphModule | str:
    """The fx graph of ``net`` (sharing its modules), or why it cannot be traced."""
    found = _TRACED.get(net)
    if found is None:
        try:
            found = symbolic_trace(net)
        except Exception as err:  # data-dependent control flow, unsupported Python
            found = f"torch.fx cannot trace the network ({type(err).__name__}: {err})"
        _TRACED[net] = found
    return found


def describe(node: fx.Node) -> str:
    """A readable name of what a node applies, e.g. ``torch.relu`` or ``.mean()``."""
    if node.op == "call_method":
        return f".{node.target}()"
    target = node.target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", str(target))
    if module.startswith("torch.nn.functional"):
        return f"torch.nn.functional.{name}"
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    return f"torch.{name}" if module.startswith("torch") else name


def functional_uses(gm: fx.GraphModule, targets: frozenset[Any]) -> list[str]:
    """Descriptions of the call_function/call_method nodes whose target is in ``targets``."""
    return [
        describe(node)
        for node in gm.graph.nodes
        if node.op in ("call_function", "call_method") and _hashable_in(node.target, targets)
    ]


def _hashable_in(target: Any, targets: frozenset[Any]) -> bool:
    try:
        return target in targets
    except TypeError:  # an unhashable target
        return False


def leaf_modules(net: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(qualified name, module) of every module without children."""
    return ((name, m) for name, m in net.named_modules() if not any(m.children()))


def called_modules(net: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """The modules the network calls as opaque steps: torch.nn's own modules when fx
    traces it (custom modules are traced through), every leaf module when it does not."""
    graph = traced(net)
    if isinstance(graph, str):
        return leaf_modules(net)
    return (
        (str(node.target), graph.get_submodule(str(node.target)))
        for node in graph.graph.nodes
        if node.op == "call_module"
    )


def first_unhandled_module(
    net: nn.Module, handled: Callable[[nn.Module], bool]
) -> tuple[str, nn.Module] | None:
    """The first module of ``called_modules`` for which ``handled`` is false, or None."""
    return next(((n, m) for n, m in called_modules(net) if not handled(m)), None)
