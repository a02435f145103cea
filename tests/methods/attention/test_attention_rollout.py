"""Attention rollout on a hand-built two-layer transformer whose attention matrices are
fixed, and on the small ViT.

The hand-built model: input 1 x 2 x 4, patches of 2 x 2 -> a class token and a 1 x 2 grid
(T = 3). Each layer's attention is softmax(log P) = P for fixed P (2 heads). By hand:

    layer 1: heads [[.5,.25,.25],[.25,.5,.25],[.25,.25,.5]] and [[.1,.7,.2],[.2,.6,.2],[.3,.3,.4]]
      mean [[.3,.475,.225],[.225,.55,.225],[.275,.275,.45]]
      (mean + I) / 2 = Ã1 = [[.65,.2375,.1125],[.1125,.775,.1125],[.1375,.1375,.725]]
    layer 2: heads [[.2,.2,.6],[.4,.4,.2],[.5,.25,.25]] and [[.6,.2,.2],[.2,.4,.4],[.1,.1,.8]]
      mean [[.4,.2,.4],[.3,.4,.3],[.3,.175,.525]]
      Ã2 = [[.7,.1,.2],[.15,.7,.15],[.15,.0875,.7625]]
    class row of R = Ã2 Ã1: [.7,.1,.2] Ã1 = [.49375, .27125, .235]
      (.7*.65 + .1*.1125 + .2*.1375 = .49375;  .7*.2375 + .1*.775 + .2*.1375 = .27125;
       .7*.1125 + .1*.1125 + .2*.725 = .235)
    patch map 1 x 2: [.27125, .235]; bilinear to 2 x 4 (align_corners=False, sources -.25,
    .25, .75, 1.25 clamped): [.27125, .75*.27125 + .25*.235, .25*.27125 + .75*.235, .235]
      = [.27125, .2621875, .2440625, .235] on both rows.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from support.method_models import served_from_net
from support.tiny_models import make_context
from support.vit_models import vit_served
from xaiserve.api.errors import FailedPrecondition
from xaiserve.methods.attention.attention_rollout import rollout
from xaiserve.methods.registry import get_method

LAYER1 = [
    [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]],
    [[0.1, 0.7, 0.2], [0.2, 0.6, 0.2], [0.3, 0.3, 0.4]],
]
LAYER2 = [
    [[0.2, 0.2, 0.6], [0.4, 0.4, 0.2], [0.5, 0.25, 0.25]],
    [[0.6, 0.2, 0.2], [0.2, 0.4, 0.4], [0.1, 0.1, 0.8]],
]


class FixedAttention(nn.Module):
    """Attention with probabilities softmax(log P) = P whatever the input (2 heads)."""

    def __init__(self, probabilities: list[list[list[float]]]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(probabilities).log())
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.softmax(self.logits.expand(x.shape[0], -1, -1, -1))  # N x 2 x 3 x 3
        return x + (attn @ x.unsqueeze(1)).mean(dim=1)


class TwoLayers(nn.Module):
    """1 x 2 x 4 -> class token + 2 patch tokens (D = 2) -> two fixed attentions -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, 2, kernel_size=2, stride=2)
        self.cls = nn.Parameter(torch.ones(1, 1, 2))
        self.layers = nn.Sequential(FixedAttention(LAYER1), FixedAttention(LAYER2))
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.head(self.layers(tokens)[:, 0])


def test_rollout_of_the_fixed_attentions_equals_the_hand_computation():
    served = served_from_net(TwoLayers(), (1, 2, 4), labels=2)
    method = get_method("attention_rollout")
    assert method.unsupported_reason(served) is None
    x = torch.rand(2, 1, 2, 4, generator=torch.Generator().manual_seed(0))
    got = method.attribute(make_context(served), x, torch.tensor([0, 1]), {})
    row = torch.tensor([0.27125, 0.2621875, 0.2440625, 0.235])
    assert got.shape == (2, 1, 2, 4)
    assert torch.allclose(got, row.expand(2, 1, 2, 4), atol=1e-6)


def test_rollout_multiplies_the_later_layer_on_the_left():
    a1, a2 = torch.tensor(LAYER1).unsqueeze(0), torch.tensor(LAYER2).unsqueeze(0)
    expected = torch.tensor([0.49375, 0.27125, 0.235])
    assert torch.allclose(rollout([a1, a2])[0, 0], expected, atol=1e-6)
    assert not torch.allclose(rollout([a2, a1])[0, 0], expected, atol=1e-3)


def test_rollout_on_the_vit_is_a_distribution_over_patches():
    served = vit_served()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    got = get_method("attention_rollout").attribute(
        make_context(served), x, torch.tensor([0, 1]), {}
    )
    assert got.shape == (2, 1, 16, 16)
    assert torch.isfinite(got).all() and (got > 0).all()
    assert (got.flatten(1).sum(1) < 16 * 16).all()  # class row entries sum to 1 over all T
    assert not torch.allclose(got[0], got[1])


def test_rollout_is_refused_on_a_model_without_attention():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    reason = get_method("attention_rollout").unsupported_reason(served_from_net(net, (3, 8, 8)))
    assert reason == (
        "attention_rollout reads attention probabilities (N x heads x T x T) from nn.Softmax "
        "modules and the network has none"
    )


def test_rollout_names_a_multihead_attention_it_cannot_read():
    class Mha(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = x.flatten(2).transpose(1, 2)
            return self.head(self.mha(tokens, tokens, tokens, need_weights=False)[0][:, 0])

    reason = get_method("attention_rollout").unsupported_reason(served_from_net(Mha(), (4, 2, 2)))
    assert reason is not None and reason.endswith(
        "its nn.MultiheadAttention (mha) does not expose them per head"
    )


def test_rollout_without_a_class_token_is_refused_at_run_time():
    class NoClass(TwoLayers):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.patch(x).flatten(2).transpose(1, 2)
            attn = self.layers[0].softmax((tokens @ tokens.transpose(1, 2)).unsqueeze(1))
            return self.head(attn.sum(dim=(1, 2)))  # N x 1 x 2 x 2: two patches, no class

    net = NoClass()
    served = served_from_net(net, (1, 2, 4), labels=2)
    with pytest.raises(FailedPrecondition, match="not a class token and a patch grid"):
        get_method("attention_rollout").attribute(
            make_context(served), torch.rand(1, 1, 2, 4), torch.tensor([0]), {}
        )
