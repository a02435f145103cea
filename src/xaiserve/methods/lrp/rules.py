"""LRP rules for one layer: relevance at a layer's output -> relevance at its inputs.

Notation (Bach et al., 2015; Montavon et al., 2019): a layer z_j = sum_i a_i w_ij + b_j,
relevance R_j at its output, R_i at its input.

- epsilon:    R_i = a_i * sum_j w_ij R_j / (z_j + eps * sign(z_j))     (sign(0) = +1)
  Conserving (sum_i R_i = sum_j R_j) up to the bias and epsilon terms; eps = 0 with
  z_j = 0 passes nothing.
- alpha-beta: R_i = sum_j (alpha (a_i w_ij)^+ / (z_j^+ + eps)
                           - beta (a_i w_ij)^- / (z_j^- - eps)) R_j,   beta = alpha - 1,
  z_j^+ / z_j^- the sums of the positive / negative contributions, biases left out. A
  neuron with no negative (positive) contributions gives all its relevance to the others
  (alpha = 1, beta = 0 for that neuron; alpha = 0, beta = -1), so the rule conserves up to
  eps. (The textbook formula passes alpha R_j there, which inflates relevance after every
  ReLU + pooling layer.)

The sums a_i w_ij are evaluated by the layer itself through a vector-Jacobian product:
sum_j w_ij s_j = (J^T s)_i, so one rule serves convolutions of any dimension, linear
layers, BatchNorm and weightless sums (average pooling, residual additions), where w >= 0.
All tensors are batches, N x ... .
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xaiserve.methods.numerics import batchnorm_scale_shift, safe_divide

Affine = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""(a, weight, bias or None) -> z for one affine layer."""


@dataclass(frozen=True)
class Rule:
    """rule: "epsilon" or "alpha_beta"; epsilon: the stabilizer; alpha (beta = alpha - 1)."""

    name: str
    epsilon: float
    alpha: float

    @property
    def beta(self) -> float:
        return self.alpha - 1.0


def stabilized(z: torch.Tensor, eps: float) -> torch.Tensor:
    """z + eps * sign(z), with sign(0) = +1 (Captum's convention)."""
    return z + eps * torch.where(z >= 0, 1.0, -1.0)


def ratio_relevance(
    fn: Callable[..., torch.Tensor],
    parts: Sequence[torch.Tensor],
    relevance: torch.Tensor,
    denominator: Callable[[torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """parts_i * J_i^T (R / denominator(z)), z = fn(*parts): each part's share of R."""
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_(True) for p in parts]
        z = fn(*leaves)
        s = safe_divide(relevance, denominator(z.detach()))
        grads = torch.autograd.grad(z, leaves, s, allow_unused=True)
    return [
        p * g if g is not None else torch.zeros_like(p) for p, g in zip(parts, grads, strict=True)
    ]


def affine_relevance(
    layer: Affine,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    relevance: torch.Tensor,
    rule: Rule,
) -> torch.Tensor:
    """R at the input a of z = layer(a, weight, bias)."""
    eps = rule.epsilon
    if rule.name == "epsilon":
        (r,) = ratio_relevance(
            lambda t: layer(t, weight, bias), [a], relevance, lambda z: stabilized(z, eps)
        )
        return r
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    shares = alpha_beta_relevance(
        lambda p, n: layer(p, wp, None) + layer(n, wn, None),
        lambda p, n: layer(p, wn, None) + layer(n, wp, None),
        [a.clamp(min=0), a.clamp(max=0)],
        relevance,
        rule,
    )
    return shares[0] + shares[1]


def alpha_beta_relevance(
    positive: Callable[..., torch.Tensor],
    negative: Callable[..., torch.Tensor],
    parts: Sequence[torch.Tensor],
    relevance: torch.Tensor,
    rule: Rule,
) -> list[torch.Tensor]:
    """Each part's share: alpha of R by positive contributions (z^+ = positive(*parts)),
    minus beta of R by negative ones (z^- = negative(*parts)); one-sided neurons give all
    of R to their side."""
    with torch.no_grad():
        zp, zn = positive(*parts), negative(*parts)
    alpha = torch.where(zn == 0, 1.0, torch.where(zp == 0, 0.0, rule.alpha))
    pos = ratio_relevance(positive, parts, relevance * alpha, lambda z: z + rule.epsilon)
    neg = ratio_relevance(negative, parts, relevance * (alpha - 1), lambda z: z - rule.epsilon)
    return [p - n for p, n in zip(pos, neg, strict=True)]


def sum_relevance(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    relevance: torch.Tensor,
    rule: Rule,
) -> list[torch.Tensor]:
    """R at each input of a weightless sum with non-negative weights (pooling, a + b)."""
    eps = rule.epsilon
    if rule.name == "epsilon":
        return ratio_relevance(fn, inputs, relevance, lambda z: stabilized(z, eps))
    k = len(inputs)
    shares = alpha_beta_relevance(
        lambda *parts: fn(*parts[:k]),
        lambda *parts: fn(*parts[k:]),
        [t.clamp(min=0) for t in inputs] + [t.clamp(max=0) for t in inputs],
        relevance,
        rule,
    )
    return [shares[i] + shares[k + i] for i in range(k)]


def moved_relevance(
    fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], relevance: torch.Tensor
) -> list[torch.Tensor]:
    """R follows the values of an operation that moves, selects or copies them."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        grads = torch.autograd.grad(fn(*leaves), leaves, relevance, allow_unused=True)
    return [g if g is not None else torch.zeros_like(t) for t, g in zip(inputs, grads, strict=True)]


def scale_channels(a: torch.Tensor, k: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """a * k + t with k, t per channel (dimension 1)."""
    shape = (1, -1) + (1,) * (a.dim() - 2)
    return a * k.view(shape) + (0 if t is None else t.view(shape))


def affine_layer(
    module: nn.Module, merged_bn: nn.Module | None = None
) -> tuple[Affine, torch.Tensor, torch.Tensor | None]:
    """(layer, weight, bias) of a Conv, Linear or BatchNorm module; a convolution followed
    by BatchNorm ``merged_bn`` becomes one convolution with W' = W k, b' = b k + t."""
    if isinstance(module, nn.Linear):
        return F.linear, module.weight.detach(), _detached(module.bias)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        k, t = batchnorm_scale_shift(module)
        return scale_channels, k, t
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise TypeError(f"not an affine layer: {type(module).__name__}")
    weight, bias = module.weight.detach(), _detached(module.bias)
    if merged_bn is not None:
        k, t = batchnorm_scale_shift(merged_bn)
        weight = weight * k.view(-1, *([1] * (weight.dim() - 1)))
        bias = t if bias is None else bias * k + t
    return module._conv_forward, weight, bias


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()
