"""Input x gradient: the pixel-space input times the gradient of the target logit."""

from __future__ import annotations

from typing import Any

import torch

from xaiserve.methods.base import AttributionMethod, MethodContext, input_gradients


class InputXGradient(AttributionMethod):
    name = "input_x_gradient"

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        return x * input_gradients(ctx, x, target)
