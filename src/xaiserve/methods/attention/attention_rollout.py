"""Attention rollout (Abnar and Zuidema, 2020, "Quantifying attention flow in
transformers"), for vision transformers only.

With the attention probabilities A_l (N x heads x T x T) of the layers l = 1..L in forward
order: average the heads, add the identity for the residual connection and re-normalise
the rows,

    Ã_l = (mean_heads A_l + I) / rowsum,       R = Ã_L Ã_(L-1) ... Ã_1   (N x T x T)

then the class token's row over the patch tokens, R[0, prefix:], reshaped to the patch
grid (``hooks.token_grid``) and upsampled bilinearly (align_corners=False) to the input:
N x 1 x H x W. Probabilities are read from ``nn.Softmax`` modules
(``probabilities.py``); one hooked torch forward per image, no gradients, target-free.
"""

from __future__ import annotations

from typing import Any

import torch

from xaiserve.api.errors import FailedPrecondition
from xaiserve.methods.attention.probabilities import (
    attention_softmaxes,
    is_attention,
    no_attention_reason,
)
from xaiserve.methods.base import AttributionMethod, MethodContext, on_device
from xaiserve.methods.cam.grad_cam import upsample
from xaiserve.methods.hooks import captured, token_grid
from xaiserve.runtime.execution.executor import single
from xaiserve.runtime.model import ServedModel


def rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Attention probabilities per layer, forward order, each N x heads x T x T -> R,
    N x T x T."""
    eye = torch.eye(attentions[0].shape[-1], dtype=attentions[0].dtype)
    eye = eye.to(attentions[0].device)
    result = eye.expand_as(attentions[0][:, 0])
    for attention in attentions:
        fused = attention.mean(dim=1) + eye
        result = (fused / fused.sum(dim=-1, keepdim=True)) @ result
    return result


class AttentionRollout(AttributionMethod):
    name = "attention_rollout"
    needs_gradients = False
    spatial_dims = (2,)

    def unsupported_reason(self, served: ServedModel) -> str | None:
        return super().unsupported_reason(served) or no_attention_reason(
            served.module.net, self.name
        )

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        softmaxes = [m for _, m in attention_softmaxes(ctx.served.module.net)]
        module = ctx.model

        def run(rows: torch.Tensor, _targets: torch.Tensor | None) -> torch.Tensor:
            with torch.no_grad(), captured(*softmaxes) as calls:
                module(rows)
            attentions = [out for _, out in calls if is_attention(out)]
            if not attentions:
                raise FailedPrecondition(
                    None, "no nn.Softmax module of the model output attention probabilities"
                )
            return rollout(attentions)

        flow = torch.cat([single(p) for p in on_device(ctx, ("rollout",), run, x)])
        spatial = tuple(x.shape[2:])
        grid = token_grid(flow.shape[-1], spatial)
        if grid is None or grid[0] == 0:
            raise FailedPrecondition(
                None,
                f"{flow.shape[-1]} tokens are not a class token and a patch grid of the "
                f"{' x '.join(map(str, spatial))} input",
            )
        prefix, h, w = grid
        cam = flow[:, 0, prefix:].reshape(-1, 1, h, w)
        return upsample(cam, spatial)
