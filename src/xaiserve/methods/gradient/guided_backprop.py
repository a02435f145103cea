"""Guided backpropagation (Springenberg et al., 2015, "Striving for simplicity").

The gradient of the target logit w.r.t. the pixels, where every ReLU passes back only
positive gradients at positions where its input was positive:

    grad_z = ReLU(grad_out) * 1[z > 0]

Shapes: x N x C x *spatial -> N x C x *spatial (signed in general; the first layer's
weights mix signs). The rule is attached to ``nn.ReLU`` modules; a network that applies ReLU
as a function (``torch.relu``) cannot be intercepted and is reported unsupported (Captum's
``GuidedBackprop`` has the same limitation but silently returns a partly plain gradient).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from xaiserve.methods.backward_override import BackwardRule
from xaiserve.methods.base import AttributionMethod, MethodContext, input_gradients
from xaiserve.methods.graph_inspect import RELU_FUNCTIONS, functional_uses, traced
from xaiserve.runtime.model import ServedModel


def relu_module_reason(served: ServedModel, method: str) -> str | None:
    """Why ``method`` (which overrides nn.ReLU's backward) cannot run, or None."""
    net = served.module.net
    graph = traced(net)
    uses = [] if isinstance(graph, str) else functional_uses(graph, RELU_FUNCTIONS)
    if uses:
        return (
            f"the network applies ReLU as a function ({uses[0]}), which {method} cannot "
            "override; it needs every ReLU to be an nn.ReLU module"
        )
    if not any(isinstance(m, nn.ReLU) for m in net.modules()):
        return f"{method} overrides the backward pass of nn.ReLU modules and the network has none"
    return None


class GuidedBackprop(AttributionMethod):
    name = "guided_backprop"

    @staticmethod
    def relu_backward(
        _module: nn.Module, _z: torch.Tensor, out: torch.Tensor, grad: torch.Tensor
    ) -> torch.Tensor:
        """Guided: ReLU(grad_out) where the ReLU was active (out > 0)."""
        return torch.relu(grad) * (out > 0)

    def unsupported_reason(self, served: ServedModel) -> str | None:
        return super().unsupported_reason(served) or relu_module_reason(served, self.name)

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        rules: dict[type[nn.Module], BackwardRule] = {nn.ReLU: self.relu_backward}
        return input_gradients(ctx, x, target, variant=self.name, rules=rules)
