"""The catalog's methods against Captum on the same model, input and target.

Max abs difference <= 1e-5 on the raw map and the one-channel map. Methods Captum does not
have are checked by hand-computed values and properties elsewhere: Grad-CAM++, XGrad-CAM,
HiResCAM, LayerCAM (Captum has only LayerGradCam, compared in
tests/methods/test_methods_captum.py), FullGrad, Score-CAM and RISE.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from captum._utils.models.model import Model
from captum.attr import (
    LRP,
    Deconvolution,
    DeepLift,
    GuidedBackprop,
    GuidedGradCam,
    KernelShap,
    Lime,
    NoiseTunnel,
    Saliency,
)
from torch import nn

from support.method_models import resnet_served, served_from_net, volume_served
from support.tiny_models import make_context, tiny_served
from xaiserve.engine.postprocess import apply_stage
from xaiserve.methods.perturbation.superpixels import grid_segments
from xaiserve.methods.registry import get_method

TOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def ours(served, name: str, x: torch.Tensor, target: torch.Tensor, **params) -> torch.Tensor:
    method = get_method(name)
    assert method.unsupported_reason(served) is None
    resolved = method.resolve_params(params, served.config.input_shape, name)
    return method.attribute(make_context(served), x, target, resolved)


def assert_close(got: torch.Tensor, ref: torch.Tensor, x: torch.Tensor) -> None:
    assert got.shape == ref.shape
    for stage in ("raw", "one_channel"):
        diff = (apply_stage(got, x, stage) - apply_stage(ref, x, stage)).abs().max().item()
        assert diff <= TOL, f"{stage}: max abs difference {diff:.3g}"


def inputs(served, n: int = 2, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, *served.config.input_shape, generator=torch.Generator().manual_seed(seed))
    target = torch.arange(n) % len(served.config.labels)
    return x, target


MODELS = {"tiny": tiny_served, "resnet18": lambda: resnet_served(side=32), "volume": volume_served}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize(
    "name,captum_cls", [("guided_backprop", GuidedBackprop), ("deconvolution", Deconvolution)]
)
def test_modified_relu_gradients(model, name, captum_cls):
    served = MODELS[model]()
    x, target = inputs(served)
    ref = captum_cls(served.module).attribute(x, target=target)
    assert_close(ours(served, name, x, target), ref, x)


class Unhooked(nn.Module):
    """x * 1: a module Captum's DeepLift does not hook, placed between a ReLU and a max pool."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


POOLS = (nn.MaxPool2d, nn.MaxPool3d)


def separated(served):
    """The same network with ``Unhooked`` after every ReLU that feeds a max pool directly.

    Captum hooks a module's input and output tensors; when a ReLU's output is the max
    pool's input, both hooks sit on one tensor and the ReLU's rule reads the gradient there
    before the max-pool rule replaces it, so Captum's ReLU multiplier then uses the plain
    max-pool gradient. With the two tensors kept apart Captum applies every multiplier as
    the chain rule does, as ours always does (the separator changes nothing for ours:
    ``test_deeplift_ignores_the_separator``).
    """
    net = served.module.net
    for parent in list(net.modules()):
        if isinstance(parent, nn.Sequential):
            for i in range(len(parent) - 1):
                if isinstance(parent[i], nn.ReLU) and isinstance(parent[i + 1], POOLS):
                    parent[i] = nn.Sequential(parent[i], Unhooked())
    return served


def without_overlapping_pools(served):
    """Max pools with overlapping windows (the ResNet stem's 3x3, stride 2) become 2x2,
    stride 2. Where windows overlap, Captum routes the max-pool multiplier with
    ``max_unpool``, which keeps one of the values landing on a shared argmax; ours sums
    them as the pooling's backward does, which keeps summation-to-delta
    (``test_method_properties.test_deeplift_summation_to_delta``)."""
    net = served.module.net
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if isinstance(child, POOLS) and child.kernel_size != child.stride:
                setattr(parent, name, type(child)(2))
    return served


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("baseline", [0.0, 0.3])
def test_deeplift(model, baseline):
    """The ResNet has residual additions, the 3-D net a MaxPool3d; both get the separator
    (``separated``) and the ResNet's stem pool loses its overlap
    (``without_overlapping_pools``)."""
    served = without_overlapping_pools(separated(MODELS[model]()))
    x, target = inputs(served)
    ref = DeepLift(served.module).attribute(x, baselines=baseline, target=target)
    assert_close(ours(served, "deeplift", x, target, baseline=baseline), ref, x)


@pytest.mark.parametrize("model", ["resnet18", "volume"])
def test_deeplift_ignores_the_separator(model):
    plain = MODELS[model]()
    x, target = inputs(plain)
    before = ours(plain, "deeplift", x, target, baseline=0.2)
    after = ours(separated(plain), "deeplift", x, target, baseline=0.2)
    assert torch.allclose(before, after, atol=1e-7)


class PlainNet(nn.Module):
    """Conv-ReLU-MaxPool-Conv-ReLU-AvgPool-Linear: every layer has the same LRP rule in
    Captum and here (no BatchNorm to merge, no residual additions)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def test_lrp_epsilon():
    """Captum's LRP (epsilon rule, 1e-9, on every layer) on a plain net served with mean 0
    and std 1: there our relevance of a pixel (that of its normalized value) and Captum's
    (that value's relevance divided by std) coincide. Captum's max pooling takes the
    epsilon rule where ours takes winner-takes-all; they differ by a factor z / (z + 1e-9)."""
    torch.manual_seed(0)
    served = served_from_net(PlainNet(), (3, 16, 16))
    x, target = inputs(served)
    ref = LRP(served.module).attribute(x, target=target)
    assert_close(ours(served, "lrp", x, target, rule="epsilon", epsilon=1e-9), ref, x)


def test_guided_grad_cam(served, images):
    target = torch.tensor([2, 0])
    ref = GuidedGradCam(served.module, served.cam_layer).attribute(
        images, target=target, interpolate_mode="bilinear"
    )
    assert_close(ours(served, "guided_grad_cam", images, target), ref, images)


def test_vargrad_same_noise_as_captum(served):
    """One image: our per-image generator seeded with ``seed`` draws Captum's noise after
    ``torch.manual_seed(seed)``."""
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([1])
    samples, level, seed = 6, 0.1, 11
    torch.manual_seed(seed)
    ref = NoiseTunnel(Saliency(served.module)).attribute(
        x,
        nt_type="vargrad",
        nt_samples=samples,
        stdevs=float((x.max() - x.min()) * level),
        target=target,
        abs=False,
    )
    got = ours(served, "vargrad", x, target, samples=samples, noise_level=level, seed=seed)
    assert_close(got, ref, x)


class ExactWeightedLeastSquares(Model):
    """Captum's interpretable-model interface around a float64 weighted least-squares fit
    with intercept (normal equations, numpy). Captum's default for LIME is a Lasso from
    scikit-learn, which is not a dependency here; this solver is independent of ours
    (torch lstsq on the sqrt-weighted system)."""

    def fit(self, train_data, **kwargs):
        z, y, w = (torch.cat(t).double().numpy() for t in zip(*train_data, strict=True))
        design = np.hstack([np.ones((len(z), 1)), z])
        gram = design.T @ (design * w[:, None])
        self.coef = np.linalg.solve(gram, design.T @ (w * y.ravel()))[1:]
        return None

    def representation(self) -> torch.Tensor:
        return torch.tensor(self.coef, dtype=torch.float32).view(1, -1)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return z.double() @ torch.tensor(self.coef)


@pytest.mark.parametrize("name", ["lime", "kernel_shap"])
def test_surrogates_with_the_same_masks(served, images, name):
    """Captum's Lime / KernelShap fed our masks (perturb_func) and, for LIME, our kernel
    (similarity_func; KernelShap keeps Captum's own kernel): checks the masked inputs, the
    forward passes, the weights and the fit end to end."""
    samples, segments, baseline, seed = 40, 16, 0.25, 3
    method = get_method(name)
    labels, cells = grid_segments((16, 16), segments)
    z = method.sample(cells, samples, torch.Generator().manual_seed(seed))

    def masks(_inputs, **_kwargs):
        yield from (row.view(1, -1) for row in z)

    if name == "lime":
        captum = Lime(
            served.module,
            ExactWeightedLeastSquares(),
            similarity_func=lambda _x, _p, sample, **_k: method.weights(sample.long()),
            perturb_func=masks,
        )
    else:
        captum = KernelShap(served.module)
        captum.interpretable_model = ExactWeightedLeastSquares()
        captum.perturb_func = masks
    target = torch.tensor([2, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = captum.attribute(
            images,
            target=target,
            baselines=baseline,
            n_samples=samples,
            feature_mask=labels.view(1, 1, 16, 16),
            perturbations_per_eval=16,
        )
    got = ours(
        served,
        name,
        images,
        target,
        samples=samples,
        segments=segments,
        baseline=baseline,
        seed=seed,
    )
    assert_close(got, ref, images)
