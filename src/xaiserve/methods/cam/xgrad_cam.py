"""XGrad-CAM (Fu et al., 2020, "Axiom-based Grad-CAM: towards accurate visualization and
explanation of CNNs").

Channel weights are the gradients averaged with the channel's own normalized activations
as weights (derived from the sensitivity and conservation axioms):

    w_k = sum_ij (A_kij / sum_ab A_kab) G_kij      (0 where sum_ab A_kab = 0)

then Grad-CAM's map ReLU(sum_k w_k A_k), upsampled: N x 1 x *spatial.
"""

from __future__ import annotations

import torch

from xaiserve.methods.cam.grad_cam import GradCam
from xaiserve.methods.numerics import safe_divide


class XGradCam(GradCam):
    name = "xgrad_cam"

    def channel_weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """sum(A G) / sum(A) over positions: N x K x 1 ... 1."""
        positions = tuple(range(2, grads.dim()))
        return safe_divide(
            (acts * grads).sum(dim=positions, keepdim=True), acts.sum(dim=positions, keepdim=True)
        )
