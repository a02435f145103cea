"""Gradient artificial distancing at request time (seed 002, section 4.3).

A GAD map keeps only the pixels that are important in the original model's map and in the
map of every support model of the class pair (the same method, parameters, target class and
stage), with the original map's values there; every other pixel is 0. So the GAD map has
no important pixel the original map lacks (the seed's requirement) and usually fewer.

"Important" is the top ``IMPORTANT_FRACTION`` of a map's pixels by relevance, |map| summed
over channels (the seed keeps "the most important half" of the pixels).

Which methods: gradient methods on the input, i.e. ``needs_gradients`` and not
``needs_layer`` (not the CAM family, whose maps live at the CAM layer's resolution) and not
composite (AUTO). That is saliency, input x gradient, SmoothGrad, integrated gradients,
guided backpropagation, deconvolution, DeepLIFT, LRP, FullGrad and VarGrad; the seed
evaluates the first, second, fourth, fifth and sixth.

Which pair: the first pair (in training order) that contains the explained class. The
explained class is known only after the prediction (it is the predicted class unless the
request names one), so a class in no pair is refused then, naming the pairs there are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from xaiserve.api.errors import InvalidArgument
from xaiserve.engine.postprocess import apply_stage
from xaiserve.methods.base import AttributionMethod, MethodContext
from xaiserve.runtime.forward.counted import TorchForward
from xaiserve.runtime.model import ServedModel

IMPORTANT_FRACTION = 0.5


def gad_method_reason(method: AttributionMethod) -> str | None:
    """Why ``method`` cannot be combined with GAD, or None when it can."""
    if method.composite or not method.needs_gradients or method.needs_layer:
        return (
            f"GAD works with gradient methods on the input (needs gradients, no CAM layer); "
            f"{method.name} is not one"
        )
    return None


def gad_reason(method: AttributionMethod, served: ServedModel) -> str | None:
    """Why a request for ``method`` with GAD cannot run on ``served`` (before prediction)."""
    reason = gad_method_reason(method)
    if reason is None and served.gad is None:
        reason = (
            f"model {served.config.name!r} has no GAD support models (train them with "
            f"`xaiserve gad-train --model {served.config.name} --classes A,B`)"
        )
    return reason


def pixel_relevance(attr_map: torch.Tensor) -> torch.Tensor:
    """|map| summed over the channel axis: C' x *spatial -> *spatial."""
    return attr_map.detach().abs().sum(dim=0)


def important_pixels(relevance: torch.Tensor, fraction: float = IMPORTANT_FRACTION) -> torch.Tensor:
    """Boolean mask (same shape) of the top ``fraction`` of pixels by relevance: those at or
    above the (1 - fraction) quantile, and positive (a zero pixel is never important)."""
    flat = relevance.flatten().float()
    threshold = torch.quantile(flat, 1.0 - fraction)
    return (relevance >= threshold) & (relevance > 0)


def gad_keep_mask(
    maps: Sequence[torch.Tensor], fraction: float = IMPORTANT_FRACTION
) -> torch.Tensor:
    """Pixels important in every map (each C' x *spatial): a boolean *spatial mask."""
    keep = important_pixels(pixel_relevance(maps[0]), fraction)
    for attr_map in maps[1:]:
        keep &= important_pixels(pixel_relevance(attr_map), fraction)
    return keep


def gad_map(
    ctx: MethodContext,
    method: AttributionMethod,
    params: dict[str, Any],
    x: torch.Tensor,
    target: torch.Tensor,
    staged: torch.Tensor,
    stage: str,
    field: str,
) -> torch.Tensor:
    """The GAD version of ``staged`` (the original model's map of x at ``stage``,
    C' x *spatial): same shape, zero outside the pixels important in every map.

    x: 1 x C x *spatial; target: the explained class (1). Support models' passes are
    charged to the request's budget.
    """
    served = ctx.served
    support = served.gad
    y = int(target[0])
    pair = support.pair_for(y) if support is not None else None
    if support is None or pair is None:
        pairs = "; ".join(support.names(served.config.labels)) if support is not None else ""
        raise InvalidArgument(
            f"{field}.gad",
            f"the explained class {y} ({served.config.labels[y]!r}) is in no GAD class pair "
            f"of model {served.config.name!r} (pairs: {pairs or 'none'}); ask for a target "
            "in a pair or train one with `xaiserve gad-train`",
        )
    maps = [staged]
    for module in pair.modules:
        support_served = replace(served, module=module)
        forward = TorchForward(module, ctx.budget, ctx.max_batch)
        support_ctx = MethodContext(support_served, forward, ctx.budget, ctx.max_batch)
        raw = method.attribute(support_ctx, x, target, params)
        maps.append(apply_stage(raw, x, stage)[0].detach())
    keep = gad_keep_mask(maps)
    return staged * keep.to(staged.dtype)
