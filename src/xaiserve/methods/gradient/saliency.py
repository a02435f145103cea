"""Saliency: the vanilla gradient of the target logit (Simonyan et al., 2014).

Returned signed; the ``one_channel`` stage takes its magnitude. (Captum's ``Saliency``
takes the absolute value by default; with ``abs=False`` the two agree.)
"""

from __future__ import annotations

from typing import Any

import torch

from xaiserve.methods.base import AttributionMethod, MethodContext, input_gradients


class Saliency(AttributionMethod):
    name = "saliency"

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        return input_gradients(ctx, x, target)
