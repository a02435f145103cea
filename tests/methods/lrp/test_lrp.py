"""LRP: a hand-computed example, conservation, BatchNorm merging, residual networks, and the
models it declines. (Against Captum: ``test_captum_catalog.test_lrp_epsilon``.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from support.method_models import (
    FunctionalRelu,
    WithGelu,
    resnet_served,
    served_from_net,
    volume_served,
)
from support.resnets import resnet50
from support.tiny_models import make_context
from xaiserve.api.errors import InvalidArgument
from xaiserve.methods.lrp.graph import lrp_graph
from xaiserve.methods.registry import get_method


def lrp(served, x, target, **params) -> torch.Tensor:
    method = get_method("lrp")
    assert method.unsupported_reason(served) is None
    resolved = method.resolve_params(params, served.config.input_shape, "methods[0].lrp")
    return method.attribute(make_context(served), x, target, resolved)


def logit(served, x, target) -> torch.Tensor:
    with torch.no_grad():
        return served.module(x).gather(1, target.view(-1, 1)).squeeze(1)


def two_layer_mlp() -> nn.Module:
    """x (2) -> h = relu(W1 x + b1) (2) -> W2 h + b2 (2), weights chosen for hand work."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 1.0]]))
        net[1].bias.copy_(torch.tensor([1.0, 0.0]))
        net[3].weight.copy_(torch.tensor([[1.0, 0.5], [-1.0, 1.0]]))
        net[3].bias.copy_(torch.tensor([0.25, 0.0]))
    return net


X_HAND = torch.tensor([0.5, 1.0]).view(1, 2, 1, 1)  # two channels of one pixel


@pytest.mark.parametrize(
    "params,expected",
    [
        # z1 = W1 x + b1 = (0.5 - 1 + 1, 1 + 1) = (0.5, 2); h = (0.5, 2);
        # f_0 = 0.5 * 1 + 2 * 0.5 + 0.25 = 1.75 (class 0 explained).
        # epsilon: R_h = h_j w_j0 * f_0 / f_0 = (0.5, 1.0) (the bias 0.25 keeps its share);
        # neuron 0: s = R / z = 0.5 / 0.5 = 1 -> (x0 * 1, x1 * -1) * 1 = (0.5, -1.0);
        # neuron 1: s = 1.0 / 2 = 0.5 -> (x0 * 2, x1 * 1) * 0.5 = (0.5, 0.5).
        ({"rule": "epsilon", "epsilon": 1e-9}, [1.0, -0.5]),
        # alpha = 2, beta = 1, biases left out. Output: contributions (0.5, 1.0), none
        # negative -> all of 1.75 by them: R_h = (0.5, 1.0) * 1.75 / 1.5 = (7/12, 7/6).
        # neuron 0: positive (x0: 0.5), negative (x1: -1.0) -> x0 gets 2 * 7/12,
        # x1 gets -1 * 7/12; neuron 1: both positive (1.0, 1.0) -> 7/12 each.
        # x0 = 14/12 + 7/12 = 1.75, x1 = -7/12 + 7/12 = 0.
        ({"rule": "alpha_beta", "alpha": 2.0, "epsilon": 1e-9}, [1.75, 0.0]),
        # alpha = 1, beta = 0: only positive contributions; neuron 0 gives all 7/12 to x0.
        ({"rule": "alpha_beta", "alpha": 1.0, "epsilon": 1e-9}, [7 / 12 + 7 / 12, 7 / 12]),
    ],
)
def test_hand_computed_mlp(params, expected):
    served = served_from_net(two_layer_mlp(), (2, 1, 1), labels=2)
    got = lrp(served, X_HAND, torch.tensor([0]), **params)
    assert torch.allclose(got.flatten(), torch.tensor(expected), atol=1e-6)


def zero_biases(net: nn.Module) -> nn.Module:
    """Every bias 0, BatchNorm shifts included (running mean and beta)."""
    with torch.no_grad():
        for m in net.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.zero_()
    return net


def resnet50_served():
    torch.manual_seed(0)
    return served_from_net(resnet50(num_classes=5, width=4), (3, 32, 32), "layer4", 0.45, 0.25, 5)


@pytest.mark.parametrize("model", ["resnet18", "resnet50", "volume"])
def test_conservation_without_biases(model):
    """Bias-free network, epsilon 1e-9: sum_i R_i = f_y(x) to 1e-4 relative (the input
    normalization's mean shift is a relabeling, not a bias)."""
    served = {
        "resnet18": lambda: resnet_served(side=32),
        "resnet50": resnet50_served,
        "volume": volume_served,
    }[model]()
    zero_biases(served.module.net)
    x = torch.rand(2, *served.config.input_shape, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 2])
    total = lrp(served, x, target, rule="epsilon", epsilon=1e-9).flatten(1).sum(1)
    expected = logit(served, x, target)
    assert torch.allclose(total, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_alpha_beta_conserves_with_biases(alpha):
    """alpha-beta leaves biases out of the split and one-sided neurons give all their
    relevance to their side: the ResNet (biased BatchNorm shifts) conserves the logit."""
    served = resnet_served(side=32)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 4])
    total = lrp(served, x, target, rule="alpha_beta", alpha=alpha, epsilon=1e-9).flatten(1).sum(1)
    assert torch.allclose(total, logit(served, x, target), rtol=1e-4, atol=1e-7)


def test_epsilon_leak_is_the_bias_share():
    """With biases the epsilon rule gives the biases their share: sum R < |f| is allowed,
    but for the hand MLP the leak is exactly the biases' share (0.25 + 1.0 = 1.25)."""
    served = served_from_net(two_layer_mlp(), (2, 1, 1), labels=2)
    total = lrp(served, X_HAND, torch.tensor([0]), rule="epsilon", epsilon=1e-9).sum()
    assert abs(float(total) - (1.75 - 1.25)) < 1e-6


class ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def test_batchnorm_merge_equals_the_merged_convolution():
    """LRP of conv + BN equals LRP of one convolution with W' = W gamma / sqrt(var + eps),
    b' = (b - mean) gamma / sqrt(var + eps) + beta, merged here by hand."""
    torch.manual_seed(0)
    net = ConvBn().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.3, 0.3)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.2, 0.2)
    graph = lrp_graph(net)
    assert [n.target for n in graph.merged] == ["bn"]

    merged = ConvBn().eval()
    merged.load_state_dict(net.state_dict())
    bn = net.bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        merged.conv.weight.copy_(net.conv.weight * scale.view(-1, 1, 1, 1))
        merged.conv.bias.copy_((net.conv.bias - bn.running_mean) * scale + bn.bias)
    merged.bn = nn.Identity()

    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([0, 2])
    for params in ({"rule": "epsilon"}, {"rule": "alpha_beta", "alpha": 2.0}):
        a = lrp(served_from_net(net, (3, 8, 8)), x, target, **params)
        b = lrp(served_from_net(merged, (3, 8, 8)), x, target, **params)
        assert torch.allclose(a, b, atol=1e-6)


def test_resnet_graph():
    """Every BatchNorm of the ResNet follows a convolution and is merged: the stem, two
    per block and one per strided shortcut (1 + 16 + 3)."""
    graph = lrp_graph(resnet_served(side=32).module.net)
    assert not isinstance(graph, str)
    assert len(graph.merged) == 20
    sums = [n for n, kind in graph.kinds.items() if kind == "sum"]
    assert len(sums) == 8 + 1  # one residual addition per block, the average pool


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.a(x) * self.b(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    "net,words",
    [
        (WithGelu(), "LRP has no rule for layer type GELU (act)"),
        (
            nn.Sequential(
                nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 6, 6]), nn.Flatten(), nn.Linear(144, 3)
            ),
            "LRP has no rule for layer type LayerNorm (1)",
        ),
        (Gated(), "LRP has no rule for operator.mul"),
    ],
)
def test_unsupported_layers_are_named(net, words):
    served = served_from_net(net, (3, 8, 8))
    reason = get_method("lrp").unsupported_reason(served)
    assert reason is not None and words in reason


def test_functional_relu_is_fine():
    """LRP reads the fx graph, so ReLU applied as a function has its (identity) rule."""
    torch.manual_seed(0)
    served = served_from_net(zero_biases(FunctionalRelu()), (3, 8, 8))
    x = torch.rand(1, 3, 8, 8)
    total = lrp(served, x, torch.tensor([1]), epsilon=1e-9).sum()
    assert torch.allclose(total, logit(served, x, torch.tensor([1]))[0], rtol=1e-4)


@pytest.mark.parametrize(
    "params,field,words",
    [
        ({"epsilon": -1.0}, "methods[0].lrp.epsilon", "must be >= 0"),
        ({"alpha": 0.5}, "methods[0].lrp.alpha", "must be >= 1"),
        ({"rule": "gamma"}, "methods[0].lrp.rule", "must be one of epsilon, alpha_beta"),
        ({"beta": 1.0}, "methods[0].lrp.beta", "unknown parameter"),
    ],
)
def test_bad_params_name_the_field(params, field, words):
    with pytest.raises(InvalidArgument) as info:
        get_method("lrp").resolve_params(params, (3, 16, 16), "methods[0].lrp")
    assert info.value.field == field
    assert words in str(info.value)
