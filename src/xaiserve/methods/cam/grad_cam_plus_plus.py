"""Grad-CAM++ (Chattopadhay et al., 2018, "Grad-CAM++: improved visual explanations for
deep convolutional networks").

With activations A (N x K x *s) and gradients G = d f_y / d A at the CAM layer, the
closed form under the exponential-output assumption (the paper's eq. 19, as in
pytorch-grad-cam):

    alpha_kij = G_kij^2 / (2 G_kij^2 + sum_ab A_kab G_kij^3)    (0 where the denominator is 0)
    w_k       = sum_ij alpha_kij ReLU(G_kij)

then Grad-CAM's map ReLU(sum_k w_k A_k), upsampled: N x 1 x *spatial.
"""

from __future__ import annotations

import torch

from xaiserve.methods.cam.grad_cam import GradCam
from xaiserve.methods.numerics import safe_divide


class GradCamPlusPlus(GradCam):
    name = "grad_cam_plus_plus"

    def channel_weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """Positive gradients weighted by alpha, summed over positions: N x K x 1 ... 1."""
        positions = tuple(range(2, grads.dim()))
        g2 = grads.pow(2)
        total = acts.sum(dim=positions, keepdim=True)
        alpha = safe_divide(g2, 2 * g2 + total * grads.pow(3))
        return (alpha * torch.relu(grads)).sum(dim=positions, keepdim=True)
