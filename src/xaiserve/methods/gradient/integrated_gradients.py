"""Integrated Gradients (Sundararajan et al., 2017).

a(x) = (x - b) * integral_0^1 grad f_y(b + t (x - b)) dt, with a constant baseline image b.
The integral uses Gauss-Legendre points (Captum's default rule); all steps of all images go
through the model in shared batches. Completeness: sum a(x) ~= f_y(x) - f_y(b).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from xaiserve.methods.base import AttributionMethod, MethodContext, Param, input_gradients
from xaiserve.runtime.model import ServedModel


def gauss_legendre(steps: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Points t in (0, 1) and weights (summing to 1) of the Gauss-Legendre rule, on
    ``device``."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return (
        torch.tensor(0.5 * (nodes + 1.0), dtype=torch.float32, device=device),
        torch.tensor(0.5 * weights, dtype=torch.float32, device=device),
    )


class IntegratedGradients(AttributionMethod):
    name = "integrated_gradients"
    params = (
        Param("steps", int, 32, 1, 1024, "integration points"),
        Param("baseline", float, 0.0, 0.0, 1.0, "constant pixel value of the baseline"),
    )
    cost_advice = "ask for fewer steps"

    def max_forward_passes(self, params: dict[str, Any], served: ServedModel) -> int:
        """One gradient pass per integration point."""
        return int(params["steps"])

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        n = params["steps"]
        alphas, weights = gauss_legendre(n, x.device)
        baseline = torch.full_like(x, params["baseline"])
        delta = x - baseline
        shape = (1, n) + (1,) * (x.dim() - 1)
        # (N, n, C, *spatial): image-major, then steps
        path = baseline.unsqueeze(1) + alphas.view(shape) * delta.unsqueeze(1)
        grads = input_gradients(ctx, path.flatten(0, 1), target.repeat_interleave(n))
        grads = grads.view(x.shape[0], n, *x.shape[1:])
        return delta * (grads * weights.view(shape)).sum(dim=1)
