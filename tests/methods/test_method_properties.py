"""Properties of the methods Captum has no reference for, and of the shared pieces:
FullGrad completeness, DeepLIFT summation-to-delta, exact surrogates on a model that is
linear in the cells, KernelSHAP efficiency, RISE's normalization, the superpixel grid."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.method_models import resnet_served, served_from_net
from support.tiny_models import TinyNet, make_context, tiny_served
from xaiserve.methods.gradient.fullgrad import fullgrad_parts
from xaiserve.methods.perturbation.rise import rise_masks
from xaiserve.methods.perturbation.superpixels import grid_segments
from xaiserve.methods.registry import get_method


def run(served, name, x, target, **params):
    method = get_method(name)
    assert method.unsupported_reason(served) is None
    resolved = method.resolve_params(params, served.config.input_shape, name)
    ctx = make_context(served)
    return method.attribute(ctx, x, target, resolved), ctx


def logits(served, x):
    with torch.no_grad():
        return served.module(x)


def test_fullgrad_completeness():
    """ReLU network without input normalization: <grad_x f, x> + sum_l <grad_z_l f, b_l>
    = f_y(x) (the conv biases, the BatchNorm's implicit bias and the head's bias)."""
    torch.manual_seed(0)
    net = TinyNet()
    with torch.no_grad():
        net.features[1].running_mean.uniform_(-0.2, 0.2)
        net.features[1].running_var.uniform_(0.5, 1.5)
    served = served_from_net(net, (3, 16, 16))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 2])
    input_grad, terms = fullgrad_parts(make_context(served), x, target)
    assert len(terms) == 4
    total = (input_grad * x).flatten(1).sum(1) + sum(t.flatten(1).sum(1) for t in terms)
    expected = logits(served, x).gather(1, target.view(-1, 1)).squeeze(1)
    assert torch.allclose(total, expected, atol=1e-5)


def test_fullgrad_map(served, images):
    cam, _ = run(served, "fullgrad", images, torch.tensor([0, 1]))
    assert cam.shape == (2, 1, 16, 16) and (cam >= 0).all() and cam.max() > 0


@pytest.mark.parametrize("model", ["tiny", "resnet18"])
def test_deeplift_summation_to_delta(model):
    served = tiny_served() if model == "tiny" else resnet_served(side=32)
    x = torch.rand(2, *served.config.input_shape, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([1, 0])
    attr, ctx = run(served, "deeplift", x, target, baseline=0.2)
    gap = logits(served, x) - logits(served, torch.full_like(x, 0.2))
    assert torch.allclose(
        attr.flatten(1).sum(1), gap.gather(1, target.view(-1, 1)).squeeze(1), atol=1e-4
    )
    assert ctx.budget.spent == 4  # x and the reference, per image


class LinearModel(nn.Module):
    """f(x) = sum(W * x) per class: every cell's effect adds up."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.randn(3, 3 * 16 * 16, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T


@pytest.mark.parametrize("name", ["lime", "kernel_shap"])
def test_surrogates_are_exact_on_a_model_linear_in_the_cells(name):
    """For f linear in x, switching cell m off changes f_y by sum_{p in m} w_p (x_p - b):
    the weighted fit recovers exactly those coefficients."""
    served = served_from_net(LinearModel(), (3, 16, 16))
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    baseline = 0.3
    attr, ctx = run(
        served, name, x, torch.tensor([2]), samples=64, segments=16, baseline=baseline, seed=1
    )
    labels, cells = grid_segments((16, 16), 16)
    effect = (served.module.net.weight[2].view(3, 16, 16) * (x[0] - baseline)).sum(0)
    expected = torch.stack([effect[labels == m].sum() for m in range(cells)])
    assert torch.allclose(attr[0, 0], expected[labels], atol=1e-4)
    assert torch.equal(attr[0, 0], attr[0, 2])  # every channel of a cell alike
    assert ctx.budget.spent == 64


def test_kernel_shap_efficiency(served, images):
    """sum of the cells' values = f_y(x) - f_y(baseline image) (the end points' weight)."""
    attr, _ = run(
        served,
        "kernel_shap",
        images,
        torch.tensor([0, 2]),
        samples=80,
        segments=16,
        baseline=0.5,
        seed=0,
    )
    labels, cells = grid_segments((16, 16), 16)
    values = torch.stack([attr[:, 0][:, labels == m][:, 0] for m in range(cells)], 1)
    gap = logits(served, images) - logits(served, torch.full_like(images, 0.5))
    expected = gap.gather(1, torch.tensor([[0], [2]])).squeeze(1)
    assert torch.allclose(values.sum(1), expected, atol=1e-4)


def test_kernel_shap_masks_follow_the_shapley_kernel():
    z = get_method("kernel_shap").sample(10, 4002, torch.Generator().manual_seed(0))
    assert z[0].sum() == 10 and z[1].sum() == 0
    sizes = z[2:].sum(1)
    k = torch.arange(1, 10, dtype=torch.float64)
    p = (9 / (k * (10 - k))) / (9 / (k * (10 - k))).sum()
    seen = torch.bincount(sizes, minlength=10)[1:].double() / len(sizes)
    assert (seen - p).abs().max() < 0.03


def test_lime_kernel():
    """d = 1 - sqrt(|z| / M), w = sqrt(exp(-d^2 / 0.25^2)); all-off: d = 1."""
    z = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    d = torch.tensor([0.0, 0.5, 1.0])
    expected = torch.sqrt(torch.exp(-(d**2) / 0.0625))
    assert torch.allclose(get_method("lime").weights(z), expected)


class Constant(nn.Module):
    """Logits all zero: every class has probability 1/3 whatever the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 3) + 0 * x.flatten(1).sum(1, keepdim=True)


def test_rise_normalization():
    """With a constant score 1/3, map = (1 / (n p)) sum_i M_i / 3 = mean_i M_i / (3 p)."""
    served = served_from_net(Constant(), (3, 16, 16))
    x = torch.rand(1, 3, 16, 16)
    n, cells, p, seed = 40, 4, 0.3, 5
    attr, ctx = run(
        served, "rise", x, torch.tensor([1]), masks=n, cells=cells, keep_probability=p, seed=seed
    )
    g = torch.Generator().manual_seed(seed)
    grids = (torch.rand(n, 1, cells, cells, generator=g) < p).float()
    shifts = torch.stack([torch.randint(0, 4, (n,), generator=g) for _ in range(2)], 1)
    masks = rise_masks(grids, shifts, (16, 16), cells)
    assert masks.shape == (n, 1, 16, 16) and masks.min() >= 0 and masks.max() <= 1
    assert torch.allclose(attr[0], masks.mean(0) / (3 * p), atol=1e-6)
    assert ctx.budget.spent == n


@pytest.mark.parametrize("spatial,cells", [((16, 16), 4), ((5, 7), 2), ((8, 12, 10), 3)])
def test_rise_masks_are_the_shifted_crops(spatial, cells):
    """Mask i is the upsampled grid i cut at shift i (a slice per mask, the definition)."""
    g = torch.Generator().manual_seed(3)
    n = 9
    grids = (torch.rand(n, 1, *([cells] * len(spatial)), generator=g) < 0.5).float()
    steps = [math.ceil(s / cells) for s in spatial]
    shifts = torch.stack([torch.randint(0, c, (n,), generator=g) for c in steps], 1)
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    up = F.interpolate(grids, size=[(cells + 1) * c for c in steps], mode=mode, align_corners=False)
    masks = rise_masks(grids, shifts, spatial, cells)
    assert masks.shape == (n, 1, *spatial)
    for i in range(n):
        box = tuple(slice(int(o), int(o) + s) for o, s in zip(shifts[i], spatial, strict=True))
        assert torch.equal(masks[i], up[(i, slice(None), *box)])
    assert not torch.equal(masks[0], masks[1])  # the shifts and grids differ per mask


@pytest.mark.parametrize(
    "spatial,segments,count,side",
    [
        ((16, 16), 64, 64, 2),
        ((64, 64), 64, 64, 8),
        ((16, 16), 10, 16, 5),
        ((8, 12, 12), 64, 48, 3),
        ((5, 7), 4, 6, 3),
    ],
)
def test_grid_segments(spatial, segments, count, side):
    labels, cells = grid_segments(spatial, segments)
    assert cells == count and labels.shape == spatial
    assert sorted(labels.unique().tolist()) == list(range(count))
    assert int((labels == 0).sum()) == min(side, spatial[0]) * math.prod(
        min(side, d) for d in spatial[1:]
    )


def test_vargrad_is_a_variance(served, images):
    attr, ctx = run(served, "vargrad", images, torch.tensor([0, 1]), samples=4)
    assert (attr >= -1e-12).all() and ctx.budget.spent == 8


@pytest.mark.parametrize("name", ["guided_backprop", "deconvolution", "deeplift", "lrp"])
def test_inplace_relu_gives_the_same_map(images, name):
    """nn.ReLU(inplace=True) overwrites its input; the rules must still see it."""
    maps = []
    for inplace in (False, True):
        served = tiny_served()
        served.module.net.features[2] = nn.ReLU(inplace=inplace)
        served.module.net.features[4] = nn.ReLU(inplace=inplace)
        served.cam_layer = served.module.net.features[4]
        maps.append(run(served, name, images, torch.tensor([0, 1]))[0])
    assert torch.allclose(maps[0], maps[1], atol=1e-7)
