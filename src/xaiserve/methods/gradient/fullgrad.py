"""FullGrad (Srinivas and Fleuret, 2019, "Full-gradient representation for neural network
visualization").

For a network with ReLU-like activations the full-gradient decomposition is exact:

    f_y(x) = <grad_x f_y, x> + sum_layers sum <grad_{z_l} f_y, b_l>

with b_l the bias of layer l broadcast over its output z_l (a BatchNorm's implicit bias
beta - mean * gamma / sqrt(var + eps) included). The saliency map aggregates the parts:

    map = sum_c psi(grad_x f_y * x) + sum_{l spatial} sum_c up(psi(grad_{z_l} f_y * b_l))

psi: absolute value, then per sample min-max scaled to [0, 1] (max + 1e-6); up: bilinear
(trilinear) with align_corners=True, as the authors' code. Only convolution and BatchNorm
outputs with the input's number of dimensions enter the map (linear layers are in the
decomposition only). Shapes: x N x C x *spatial -> N x 1 x *spatial. One forward and one
backward per image.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xaiserve.methods.base import AttributionMethod, MethodContext, on_device, target_logits
from xaiserve.methods.hooks import captured
from xaiserve.methods.numerics import batchnorm_scale_shift
from xaiserve.runtime.execution.executor import per_row

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def layer_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias a layer adds to its output (per output channel), or None."""
    if isinstance(module, (*CONV, nn.Linear)):
        return None if module.bias is None else module.bias.detach()
    if isinstance(module, BATCHNORM) and module.running_mean is not None:
        return batchnorm_scale_shift(module)[1]
    return None


def bias_shaped(module: nn.Module, bias: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The bias broadcast over ``out``: a linear layer's along the last axis (its output may
    be tokens N x T x D), a convolution's or BatchNorm's along the channels (axis 1)."""
    if isinstance(module, nn.Linear):
        return bias.view(*([1] * (out.dim() - 1)), -1)
    return bias.view(1, -1, *([1] * (out.dim() - 2)))


def fullgrad_parts(
    ctx: MethodContext, x: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """grad_x f_y (N x C x *spatial) and, per call of a biased layer in forward order,
    grad_{z_l} f_y * b_l (N x K_l x *s_l)."""
    module = ctx.model
    biased = [(m, b) for m in module.modules() if (b := layer_bias(m)) is not None]

    def run(rows: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        targets = per_row(targets, "fullgrad")
        layers = [m for m, _ in biased]
        bias_of = {id(m): b for m, b in biased}
        with torch.enable_grad(), captured(*layers) as calls:
            xb = rows.detach().requires_grad_(True)
            score = target_logits(module(xb), targets).sum()
            outs = [out for _, out in calls]
            grads = torch.autograd.grad(score, [xb, *outs], allow_unused=True)
        terms = [
            (torch.zeros_like(out) if g is None else g) * bias_shaped(m, bias_of[id(m)], out)
            for (m, out), g in zip(calls, grads[1:], strict=True)
        ]
        return (grads[0], *terms)

    parts = on_device(ctx, ("fullgrad",), run, x, target)
    columns = list(zip(*parts, strict=True))
    return torch.cat(columns[0]), [torch.cat(column) for column in columns[1:]]


def psi(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """|t| min-max scaled per sample (all channels and positions together) to [0, 1]."""
    t = t.abs()
    low = t.flatten(1).amin(1).view(-1, *([1] * (t.dim() - 1)))
    t = t - low
    high = t.flatten(1).amax(1).view(-1, *([1] * (t.dim() - 1)))
    return t / (high + eps)


class FullGrad(AttributionMethod):
    name = "fullgrad"

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        input_grad, bias_terms = fullgrad_parts(ctx, x, target)
        spatial = tuple(x.shape[2:])
        mode = "bilinear" if x.dim() == 4 else "trilinear"
        cam = psi(input_grad * x).sum(dim=1, keepdim=True)
        for term in bias_terms:
            if term.dim() == x.dim():
                # interpolation is linear per channel: sum the channels first
                summed = psi(term).sum(dim=1, keepdim=True)
                cam = cam + F.interpolate(summed, size=spatial, mode=mode, align_corners=True)
        return cam
