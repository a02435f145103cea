"""DeepLIFT with the rescale rule (Shrikumar et al., 2017, "Learning important features
through propagating activation differences").

Against a constant reference image b (pixel value ``baseline``), every nonlinearity's
derivative is replaced by the ratio of differences between the input's and the reference's
forward passes, the multiplier m = (f(z) - f(z_b)) / (z - z_b) (the ordinary derivative
where |z - z_b| < 1e-10); linear layers keep their weights. The attribution is

    a(x) = (x - b) * dm f_y / dx,    summation-to-delta: sum a(x) = f_y(x) - f_y(b)

(the rescale rule keeps it exact). Max pooling follows Captum's rule: with the cross
maximum c = max(out, out_b), the gradient times (c - out_b) routed to the input's argmax
plus the reference's gradient times (out - c) routed to the reference's argmax, divided by
the input difference; so the reference's score f_y(b) is back-propagated too. Routing sums
where pooling windows overlap (the pooling's own backward); Captum's max_unpool keeps one
of the overlapping values, which breaks summation-to-delta (the two agree for
non-overlapping windows). Captum also differs where a ReLU feeds a max pool directly (its
hooks on the shared tensor collide); ours applies every multiplier by the chain rule. x
and b go through the model in one batch (2N images, counted).
Shapes: x N x C x *spatial -> N x C x *spatial.

Rules exist for nn.ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus and MaxPool1d/2d/3d
modules (Captum's list without Softmax); every other layer must be linear. A nonlinearity
applied as a function (``torch.relu(x)``) is invisible to module hooks, so such networks
are reported unsupported instead of getting a silently wrong map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from xaiserve.methods.backward_override import overridden_backward
from xaiserve.methods.base import (
    AttributionMethod,
    MethodContext,
    Param,
    on_device,
    target_logits,
)
from xaiserve.methods.graph_inspect import (
    NONLINEAR_FUNCTIONS,
    first_unhandled_module,
    functional_uses,
    traced,
)
from xaiserve.runtime.execution.executor import per_row, single
from xaiserve.runtime.model import ServedModel

EPS = 1e-10
"""|z - z_b| below which the ordinary derivative is used (Captum's default)."""

ELEMENTWISE = (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus)
MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LINEAR_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Identity,
)
"""Layers that are affine in eval mode: DeepLIFT keeps their ordinary gradient."""


def _halves(t: torch.Tensor) -> torch.Tensor:
    """The input half minus the reference half, repeated for both halves: 2N x ..."""
    a, b = t.chunk(2)
    return torch.cat([a - b, a - b])


def _ordinary(module: nn.Module, z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The module's own vector-Jacobian product at z (hooks bypassed)."""
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(module.forward(leaf * 1.0), leaf, grad)
    return g


def rescale(
    module: nn.Module, z: torch.Tensor, out: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """Element-wise nonlinearity: grad * (f(z) - f(z_b)) / (z - z_b)."""
    dz, dout = _halves(z), _halves(out)
    return torch.where(dz.abs() < EPS, _ordinary(module, z, grad), grad * dout / dz)


def rescale_maxpool(
    module: nn.Module, z: torch.Tensor, out: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """Max pooling: (route_x(g_x (m - o_b)) + route_b(g_b (o - m))) / (z - z_b), both
    halves alike, m = max(o, o_b); route = the pooling's own backward (sums overlaps)."""
    dz = _halves(z)
    o, o_b = out.chunk(2)
    cross = torch.max(o, o_b)
    dout = torch.cat([cross - o_b, o - cross])
    up = _ordinary(module, z, grad * dout)  # routed to each half's argmax, summed
    up_x, up_b = up.chunk(2)
    summed = torch.cat([up_x + up_b, up_x + up_b])
    return torch.where(dz.abs() < EPS, _ordinary(module, z, grad), summed / dz)


#: The backward rule of each layer type: (module, z, out, grad) -> the gradient at z.
RULES: dict[type[nn.Module], Rule] = {
    **dict.fromkeys(ELEMENTWISE, rescale),
    **dict.fromkeys(MAXPOOL, rescale_maxpool),
}


def _handled(module: nn.Module) -> bool:
    return isinstance(module, ELEMENTWISE + MAXPOOL + LINEAR_LAYERS)


class DeepLift(AttributionMethod):
    name = "deeplift"
    params = (Param("baseline", float, 0.0, 0.0, 1.0, "constant pixel value of the reference"),)

    def unsupported_reason(self, served: ServedModel) -> str | None:
        reason = super().unsupported_reason(served)
        if reason:
            return reason
        net = served.module.net
        found = first_unhandled_module(net, _handled)
        if found is not None:
            layer_type = type(found[1]).__name__
            return f"deeplift has no rescale rule for layer type {layer_type} ({found[0]})"
        graph = traced(net)
        if not isinstance(graph, str):
            uses = functional_uses(graph, NONLINEAR_FUNCTIONS)
            if uses:
                return (
                    f"the network applies a nonlinearity as a function ({uses[0]}), which "
                    "deeplift cannot intercept; it needs nonlinearities as nn modules"
                )
        return None

    def max_forward_passes(self, params: dict[str, Any], served: ServedModel) -> int:
        """The image and its reference, in one gradient batch."""
        return 2

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        baseline, module = float(params["baseline"]), ctx.model

        def run(rows: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
            targets = per_row(targets, "DeepLIFT")
            n, reference = rows.shape[0], torch.full_like(rows, baseline)
            both = torch.cat([rows, reference]).requires_grad_(True)
            with torch.enable_grad(), overridden_backward(module, RULES):
                logits = module(both)
                # both halves' scores: the max-pool rule mixes their gradients (as Captum)
                score = target_logits(logits, targets.repeat(2)).sum()
                (grad,) = torch.autograd.grad(score, both)
            return (rows - reference) * grad[:n]

        parts = on_device(ctx, ("deeplift", baseline), run, x, target, passes_per_row=2)
        return torch.cat([single(p) for p in parts])
