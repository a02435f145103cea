"""Gradient and perturbation methods on the small ViT against Captum (max abs difference
<= 1e-5), and the reliability record (APEM) of a ViT map."""

from __future__ import annotations

import math

import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr import Occlusion as CaptumOcclusion
from captum.attr import Saliency as CaptumSaliency

from support.tiny_models import make_context
from support.vit_models import vit_served
from xaiserve.api.types import ReliabilityRequest
from xaiserve.engine.postprocess import apply_stage
from xaiserve.methods.registry import get_method
from xaiserve.reliability.apem import apem
from xaiserve.reliability.options import resolve_options
from xaiserve.reliability.probe import Probe
from xaiserve.reliability.score import relevance_from_map

TOL = 1e-5
TARGET = torch.tensor([2, 0])


@pytest.fixture(scope="module")
def served():
    return vit_served()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def ours(served, name: str, x: torch.Tensor, **params) -> torch.Tensor:
    method = get_method(name)
    assert method.unsupported_reason(served) is None
    resolved = method.resolve_params(params, served.config.input_shape, name)
    return method.attribute(make_context(served), x, TARGET, resolved)


def assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape
    assert ref.abs().max() > 1e-3  # a map that is not all zero
    assert (got - ref).abs().max() <= TOL


def test_saliency(served, images):
    ref = CaptumSaliency(served.module).attribute(images, target=TARGET, abs=False)
    assert_close(ours(served, "saliency", images), ref)


def test_integrated_gradients(served, images):
    ref = CaptumIG(served.module).attribute(
        images, baselines=0.25, target=TARGET, n_steps=8, method="gausslegendre"
    )
    assert_close(ours(served, "integrated_gradients", images, steps=8, baseline=0.25), ref)


def test_occlusion(served, images):
    ref = CaptumOcclusion(served.module).attribute(
        images,
        sliding_window_shapes=(3, 4, 4),
        strides=(3, 4, 4),
        baselines=0.5,
        target=TARGET,
        perturbations_per_eval=16,
    )
    assert_close(ours(served, "occlusion", images, window=4, stride=4, baseline=0.5), ref)


@pytest.mark.parametrize("name", ["grad_cam", "attention_rollout", "saliency"])
def test_apem_of_a_vit_map_is_defined(served, images, name):
    ctx = make_context(served)
    with torch.no_grad():
        predicted = served.module(images[:1]).argmax(dim=1)
    raw = get_method(name).attribute(ctx, images[:1], predicted, {})
    record = apem(
        Probe.of(ctx.forward, served.module, images[0], int(predicted[0]), ctx.budget),
        relevance_from_map(apply_stage(raw, images[:1], "one_channel")[0]),
        resolve_options(ReliabilityRequest(resolution=0.5), images[0].numel()),
    )
    assert record.undefined_reason == ""
    assert math.isfinite(record.apem) and record.apem >= 0
    assert record.forward_passes > 0
