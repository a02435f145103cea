"""LayerCAM (Jiang et al., 2021, "LayerCAM: exploring hierarchical class activation maps
for localization").

Each position's activation is weighted by its own positive gradient:

    map = ReLU(sum_k ReLU(G_k) * A_k)

Upsampled: N x 1 x *spatial.
"""

from __future__ import annotations

import torch

from xaiserve.methods.cam.grad_cam import GradCam


class LayerCam(GradCam):
    name = "layer_cam"

    def channel_weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """The positive gradients, per position: N x K x *s."""
        return torch.relu(grads)
