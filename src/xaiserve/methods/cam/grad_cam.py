"""Grad-CAM (Selvaraju et al., 2017) at the model's configured CAM layer.

With activations A (N x K x *s) and gradients G = d f_y / d A: channel weights
w_k = mean over positions of G_k, map = ReLU(sum_k w_k A_k), upsampled (bi/trilinear,
align_corners=False) to the input size: N x 1 x *spatial. Variants of the CAM family
override ``channel_weights`` (or ``combine``) only. A transformer block as the CAM layer
gives tokens, which ``hooks.captured`` hands over as the patch grid (class token dropped):
A is then N x D x h x w.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from xaiserve.methods.base import AttributionMethod, MethodContext, on_device, target_logits
from xaiserve.methods.cam.layer_probe import probe_layer
from xaiserve.methods.hooks import captured
from xaiserve.runtime.execution.executor import per_row
from xaiserve.runtime.model import ServedModel


def layer_activations_and_gradients(
    ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, stage: str = "attribute"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations of the CAM layer and the target logit's gradients there, batched.

    x: N x C x *spatial -> (A, G), both N x K x *s (a token layer's patch grid: N x D x h x w).
    """
    layer, module = ctx.cam_layer, ctx.model
    if layer is None:
        raise RuntimeError("no CAM layer")  # unsupported_reason() stops this earlier

    def run(rows: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        targets = per_row(targets, "layer gradient")
        with torch.enable_grad(), captured(layer, spatial=tuple(rows.shape[2:])) as calls:
            logits = module(rows.detach().requires_grad_(True))
            acts = calls[0][1]
            (grad,) = torch.autograd.grad(target_logits(logits, targets).sum(), acts)
        return acts.detach(), grad

    parts = on_device(ctx, ("layer",), run, x, target, stage)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def upsample(cam: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """N x 1 x *s -> N x 1 x *spatial (bilinear for 2-D, trilinear for 3-D)."""
    mode = "bilinear" if cam.dim() == 4 else "trilinear"
    return F.interpolate(cam, size=spatial, mode=mode, align_corners=False)


class GradCam(AttributionMethod):
    name = "grad_cam"
    needs_layer = True

    def unsupported_reason(self, served: ServedModel) -> str | None:
        return super().unsupported_reason(served) or probe_layer(served).reason

    def channel_weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """Grad-CAM: gradients averaged over positions. -> N x K x 1 x ... x 1."""
        return grads.mean(dim=tuple(range(2, grads.dim())), keepdim=True)

    def combine(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """The layer-resolution map before upsampling: N x 1 x *s."""
        weighted = (self.channel_weights(acts, grads) * acts).sum(dim=1, keepdim=True)
        return torch.relu(weighted)

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        acts, grads = layer_activations_and_gradients(ctx, x, target)
        return upsample(self.combine(acts, grads), tuple(x.shape[2:]))
