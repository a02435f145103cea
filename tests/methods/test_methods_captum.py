"""Each method against Captum on the same model, input and target (max abs diff <= 1e-5)."""

from __future__ import annotations

import pytest
import torch
from captum.attr import (
    InputXGradient as CaptumInputXGradient,
)
from captum.attr import (
    IntegratedGradients as CaptumIG,
)
from captum.attr import (
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
)
from captum.attr import (
    Occlusion as CaptumOcclusion,
)
from captum.attr import (
    Saliency as CaptumSaliency,
)

from support.tiny_models import make_context
from xaiserve.engine.postprocess import apply_stage
from xaiserve.methods.registry import get_method

TOL = 1e-5
TARGET = torch.tensor([2, 0])


def ours(served, name: str, x: torch.Tensor, **params) -> torch.Tensor:
    method = get_method(name)
    resolved = method.resolve_params(params, served.config.input_shape, name)
    return method.attribute(make_context(served), x, TARGET, resolved)


def assert_close_all_stages(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> float:
    """Same post-processing on both; returns the raw max abs difference."""
    worst = 0.0
    for stage in ("raw", "one_channel", "times_image"):
        diff = (apply_stage(a, x, stage) - apply_stage(b, x, stage)).abs().max().item()
        assert diff <= TOL, f"{stage}: max abs difference {diff:.3g}"
        worst = max(worst, diff) if stage == "raw" else worst
    return worst


def test_saliency(served, images):
    ref = CaptumSaliency(served.module).attribute(images, target=TARGET, abs=False)
    assert_close_all_stages(ours(served, "saliency", images), ref, images)


def test_input_x_gradient(served, images):
    ref = CaptumInputXGradient(served.module).attribute(images, target=TARGET)
    assert_close_all_stages(ours(served, "input_x_gradient", images), ref, images)


@pytest.mark.parametrize("steps", [1, 8, 32])
def test_integrated_gradients(served, images, steps):
    ref = CaptumIG(served.module).attribute(
        images, baselines=0.25, target=TARGET, n_steps=steps, method="gausslegendre"
    )
    got = ours(served, "integrated_gradients", images, steps=steps, baseline=0.25)
    assert_close_all_stages(got, ref, images)


def test_integrated_gradients_completeness(served, images):
    attr = ours(served, "integrated_gradients", images, steps=64, baseline=0.0)
    with torch.no_grad():
        gap = served.module(images) - served.module(torch.zeros_like(images))
    expected = gap.gather(1, TARGET.view(-1, 1)).squeeze(1)
    assert torch.allclose(attr.flatten(1).sum(1), expected, atol=1e-3, rtol=1e-3)


def test_smoothgrad_same_noise_as_captum(served):
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([1])
    samples, level, seed = 6, 0.1, 11
    stdev = float((x.max() - x.min()) * level)
    torch.manual_seed(seed)
    ref = NoiseTunnel(CaptumSaliency(served.module)).attribute(
        x, nt_type="smoothgrad", nt_samples=samples, stdevs=stdev, target=target, abs=False
    )
    method = get_method("smoothgrad")
    params = method.resolve_params(
        {"samples": samples, "noise_level": level, "seed": seed}, (3, 16, 16), "smoothgrad"
    )
    got = method.attribute(make_context(served), x, target, params)
    assert_close_all_stages(got, ref, x)


def test_grad_cam(served, images):
    layer_cam = LayerGradCam(served.module, served.cam_layer).attribute(
        images, target=TARGET, relu_attributions=True
    )
    ref = LayerAttribution.interpolate(layer_cam, (16, 16), interpolate_mode="bilinear")
    got = ours(served, "grad_cam", images)
    assert got.shape == (2, 1, 16, 16)
    assert_close_all_stages(got, ref, images)


@pytest.mark.parametrize("window,stride", [(4, 2), (4, 4), (3, 1)])
def test_occlusion(served, images, window, stride):
    ref = CaptumOcclusion(served.module).attribute(
        images,
        sliding_window_shapes=(3, window, window),
        strides=(3, stride, stride),
        baselines=0.5,
        target=TARGET,
        perturbations_per_eval=16,
    )
    got = ours(served, "occlusion", images, window=window, stride=stride, baseline=0.5)
    assert_close_all_stages(got, ref, images)


def test_occlusion_covers_border_when_stride_does_not_divide(served, images):
    """(16 - 5) % 4 != 0: Captum leaves the last column uncovered, we add a flush window."""
    got = ours(served, "occlusion", images, window=5, stride=4, baseline=0.5)
    ref = CaptumOcclusion(served.module).attribute(
        images, sliding_window_shapes=(3, 5, 5), strides=(3, 4, 4), baselines=0.5, target=TARGET
    )
    interior = (slice(None), slice(None), slice(0, 12), slice(0, 12))
    # rows/cols 0..11 are covered by the same windows in both, except where the extra
    # flush window (starting at 11) also covers column/row 11
    assert torch.allclose(got[..., :11, :11], ref[..., :11, :11], atol=TOL)
    assert got[interior].abs().sum() > 0
    assert (got[..., 15] != 0).any(), "the border column must be covered"
