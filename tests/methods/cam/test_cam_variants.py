"""The CAM family's channel weights and maps on a network small enough to work by hand.

The network: x (1 x 2 x 2 pixels, no normalization) -> 1x1 convolution to two channels with
weights (1, 2) and no bias (the CAM layer: A_0 = x, A_1 = 2x) -> flatten -> linear. The
target's row of the linear layer is the gradient G at the CAM layer:

    x   = [[0.2, 0.4], [0.6, 0.8]]     A_0 = x,  A_1 = 2x,  sum A_0 = 2, sum A_1 = 4
    G_0 = [[1, -1], [2, 0]]            G_1 = [[0.5, 0.5], [-1, 2]]

The CAM layer has the input's size, so the upsampled map is the layer's map.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from support.method_models import served_from_net
from support.tiny_models import make_context
from xaiserve.methods.cam.grad_cam import layer_activations_and_gradients
from xaiserve.methods.registry import get_method

X = torch.tensor([[0.2, 0.4], [0.6, 0.8]]).view(1, 1, 2, 2)
G = torch.tensor([[[1.0, -1.0], [2.0, 0.0]], [[0.5, 0.5], [-1.0, 2.0]]])


def hand_net() -> nn.Module:
    conv = nn.Conv2d(1, 2, 1, bias=False)
    head = nn.Linear(8, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        head.weight.copy_(torch.stack([G.flatten(), -G.flatten()]))
        head.bias.zero_()
    return nn.Sequential(conv, nn.Flatten(), head)


@pytest.fixture
def served():
    return served_from_net(hand_net(), (1, 2, 2), cam_layer="0", labels=2)


def cam(served, name: str) -> torch.Tensor:
    method = get_method(name)
    assert method.unsupported_reason(served) is None
    return method.attribute(make_context(served), X, torch.tensor([0]), {})[0, 0]


def test_the_network_has_the_stated_activations_and_gradients(served):
    acts, grads = layer_activations_and_gradients(make_context(served), X, torch.tensor([0]))
    assert torch.allclose(acts[0], torch.cat([X[0], 2 * X[0]]))
    assert torch.allclose(grads[0], G)


@pytest.mark.parametrize(
    "name,weights",
    [
        # mean of G: (1 - 1 + 2 + 0) / 4, (0.5 + 0.5 - 1 + 2) / 4
        ("grad_cam", [0.5, 0.5]),
        # alpha = g^2 / (2 g^2 + sum A g^3), w = sum alpha relu(g):
        # channel 0 (sum A = 2): g = 1: 1 / (2 + 2) = 1/4, times 1; g = 2: 4 / (8 + 16) =
        #   1/6, times 2 -> 1/4 + 1/3 = 7/12 (g = -1: relu 0; g = 0: 0 / 0 -> 0)
        # channel 1 (sum A = 4): g = 0.5 (twice): 0.25 / (0.5 + 0.5) = 1/4, times 0.5;
        #   g = 2: 4 / (8 + 32) = 1/10, times 2 -> 1/8 + 1/8 + 1/5 = 9/20
        ("grad_cam_plus_plus", [7 / 12, 9 / 20]),
        # sum(A G) / sum(A): (0.2 - 0.4 + 1.2 + 0) / 2, (0.2 + 0.4 - 1.2 + 3.2) / 4
        ("xgrad_cam", [0.5, 0.65]),
    ],
)
def test_channel_weights(served, name, weights):
    acts = torch.cat([X[0], 2 * X[0]]).unsqueeze(0)
    got = get_method(name).channel_weights(acts, G.unsqueeze(0)).flatten()
    assert torch.allclose(got, torch.tensor(weights), atol=1e-6)
    # the map: ReLU(w_0 x + w_1 2 x), all positive here
    expected = (weights[0] + 2 * weights[1]) * X[0, 0]
    assert torch.allclose(cam(served, name), expected, atol=1e-6)


@pytest.mark.parametrize(
    "name,expected",
    [
        # ReLU(G_0 A_0 + G_1 A_1) per position:
        # (0.2 + 0.2, -0.4 + 0.4, 1.2 - 1.2, 0 + 3.2)
        ("hires_cam", [[0.4, 0.0], [0.0, 3.2]]),
        # ReLU(relu(G_0) A_0 + relu(G_1) A_1): (0.2 + 0.2, 0 + 0.4, 1.2 + 0, 0 + 3.2)
        ("layer_cam", [[0.4, 0.4], [1.2, 3.2]]),
    ],
)
def test_elementwise_maps(served, name, expected):
    assert torch.allclose(cam(served, name), torch.tensor(expected), atol=1e-6)


def test_score_cam(served):
    """Both channels min-max scale to H = (x - 0.2) / 0.6; each weight is the softmax
    probability of class 0 on x * H (evaluated on the network directly)."""
    mask = (X - 0.2) / 0.6
    with torch.no_grad():
        p = torch.softmax(served.module(X * mask), dim=1)[0, 0]
    expected = torch.relu(p * X[0, 0] + p * 2 * X[0, 0])
    assert torch.allclose(cam(served, "score_cam"), expected, atol=1e-6)


def test_score_cam_skips_constant_channels(served):
    """A constant channel has no mask: weight 0 and no forward pass for it."""
    flat = torch.full_like(X, 0.5)
    ctx = make_context(served)
    out = get_method("score_cam").attribute(ctx, flat, torch.tensor([0]), {})
    assert ctx.budget.spent == 1  # the activations only
    assert torch.equal(out, torch.zeros_like(out))


def test_score_cam_is_forward_only():
    method = get_method("score_cam")
    assert method.forward_only and method.needs_layer and not method.needs_gradients
