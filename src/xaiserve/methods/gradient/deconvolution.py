"""Deconvolution (Zeiler and Fergus, 2014, "Visualizing and understanding convolutional
networks").

As guided backpropagation, but a ReLU passes back the rectified gradient whatever its
forward input was (the "deconvnet" backward of a ReLU is a ReLU):

    grad_z = ReLU(grad_out)

Shapes: x N x C x *spatial -> N x C x *spatial. Needs ``nn.ReLU`` modules (see
``guided_backprop``).
"""

from __future__ import annotations

import torch
from torch import nn

from xaiserve.methods.gradient.guided_backprop import GuidedBackprop


class Deconvolution(GuidedBackprop):
    name = "deconvolution"

    @staticmethod
    def relu_backward(
        _module: nn.Module, _z: torch.Tensor, _out: torch.Tensor, grad: torch.Tensor
    ) -> torch.Tensor:
        """Deconvnet: ReLU(grad_out), independent of the forward pass."""
        return torch.relu(grad)
