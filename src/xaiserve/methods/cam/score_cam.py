"""Score-CAM (Wang et al., 2020, "Score-CAM: score-weighted visual explanations for
convolutional neural networks").

Each channel of the CAM layer's activations A (N x K x *s), upsampled to the input and
min-max normalized to [0, 1] (H_k), masks the input; the channel's weight is the target's
softmax probability on the masked input:

    w_k = softmax(f(x * H_k))_y        (channels with a constant activation: w_k = 0)
    map = ReLU(sum_k w_k A_k), upsampled (bi/trilinear): N x 1 x *spatial

No gradients: one hooked torch forward per image for A, then the masked copies (K per
image, fewer for constant channels) go through ``ctx.forward`` in batches, so they can run
on ONNX Runtime. As in the official code, the weight is the plain probability (no baseline
subtracted); unlike it, the ReLU is taken at the layer's resolution, as in the rest of the
CAM family.
"""

from __future__ import annotations

from typing import Any

import torch

from xaiserve.methods.base import MethodContext, on_device
from xaiserve.methods.cam.grad_cam import GradCam, upsample
from xaiserve.methods.cam.layer_probe import probe_layer
from xaiserve.methods.hooks import captured
from xaiserve.runtime.execution.executor import single
from xaiserve.runtime.forward.counted import batches
from xaiserve.runtime.model import ServedModel


def layer_activations(
    ctx: MethodContext, x: torch.Tensor, stage: str = "attribute"
) -> torch.Tensor:
    """The CAM layer's output for x (N x C x *spatial): N x K x *s, counted, no gradients."""
    layer, module = ctx.cam_layer, ctx.model
    if layer is None:
        raise RuntimeError("no CAM layer")  # unsupported_reason() stops this earlier

    def run(rows: torch.Tensor, _targets: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad(), captured(layer, spatial=tuple(rows.shape[2:])) as calls:
            module(rows)
        return calls[0][1]

    return torch.cat([single(p) for p in on_device(ctx, ("layer_forward",), run, x, None, stage)])


def layer_channels(served: ServedModel) -> int:
    """K, the channels of the CAM layer's output (``layer_probe``): the masks Score-CAM may
    evaluate per image; 0 when the forward does not call the layer."""
    return probe_layer(served).channels


CONSTANT = 1e-5
"""A channel whose range is below this fraction of its magnitude counts as constant (its
min-max scaling would only amplify rounding noise)."""


def channel_masks(acts: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """H_k: each channel upsampled and scaled to [0, 1]. K x *s -> K x *spatial (constant
    channels become all zero)."""
    up = upsample(acts.unsqueeze(1), spatial).squeeze(1)
    flat = up.flatten(1)
    low, high = flat.amin(1), flat.amax(1)
    varies = (high - low) > CONSTANT * torch.maximum(high.abs(), low.abs())
    shape = (-1,) + (1,) * len(spatial)
    span = torch.where(varies, high - low, torch.ones_like(high)).view(shape)
    scaled = (up - low.view(shape)) / span
    return torch.where(varies.view(shape), scaled, torch.zeros_like(scaled))


class ScoreCam(GradCam):
    name = "score_cam"
    needs_gradients = False
    forward_only = True
    cost_advice = (
        "Score-CAM evaluates one masked image per channel of the CAM layer; use grad_cam "
        "or a model whose CAM layer has fewer channels"
    )

    def max_forward_passes(self, params: dict[str, Any], served: ServedModel) -> int:
        """The hooked pass for the activations, then one masked copy per channel (constant
        channels are skipped, so this is the most)."""
        return 1 + layer_channels(served)

    def attribute(
        self, ctx: MethodContext, x: torch.Tensor, target: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        acts = layer_activations(ctx, x)
        spatial = tuple(x.shape[2:])
        weights = torch.zeros(acts.shape[:2], device=acts.device)
        for i in range(x.shape[0]):
            masks = channel_masks(acts[i], spatial)
            live = torch.nonzero(masks.flatten(1).amax(1) > 0).squeeze(1)
            for part in batches(len(live), ctx.forward.batch_size):
                channels = live[part]
                masked = x[i : i + 1] * masks[channels].unsqueeze(1)
                probs = torch.softmax(ctx.forward(masked, "attribute"), dim=1)
                weights[i, channels] = probs[:, target[i]]
        shape = weights.shape + (1,) * (acts.dim() - 2)
        cam = torch.relu((weights.view(shape) * acts).sum(dim=1, keepdim=True))
        return upsample(cam, spatial)
