"""HiResCAM (Draelos and Carin, 2020, "Use HiResCAM instead of Grad-CAM for faithful
explanations of convolutional neural networks").

The gradient multiplies the activations element-wise instead of being averaged first:

    map = ReLU(sum_k G_k * A_k)

(for a network ending in global average pooling and a linear layer it equals Grad-CAM up
to the positive factor of the pooling). Upsampled: N x 1 x *spatial.
"""

from __future__ import annotations

import torch

from xaiserve.methods.cam.grad_cam import GradCam


class HiResCam(GradCam):
    name = "hires_cam"

    def channel_weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """The gradients themselves, per position: N x K x *s."""
        return grads
