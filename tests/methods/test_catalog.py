"""Every registered method on a 2-D tiny model, a ResNet-18-shaped network and a 3-D CNN.

Table-driven over ``registry.METHODS``: output shape, finite values, forward passes
counted, batched == one image at a time (same parameters and seeds), a defined APEM
record for each map, and, where a method declines a model, a reason that says why.

Left out: ``auto`` (it runs other methods) and the S-CAM methods ``s_*`` (seed 003; they
need the data set's common intensity scale and are tested by their own module), detected
by the name prefix or a class attribute ``needs_calibration``.
"""

from __future__ import annotations

import math

import pytest
import torch

from support.method_models import resnet_served, volume_served
from support.tiny_models import make_context, tiny_served
from support.vit_models import vit_served
from xaiserve.api.types import ReliabilityRequest
from xaiserve.engine.postprocess import apply_stage
from xaiserve.methods.registry import METHODS, get_method
from xaiserve.reliability.apem import apem
from xaiserve.reliability.options import resolve_options
from xaiserve.reliability.probe import Probe
from xaiserve.reliability.score import relevance_from_map

SMALL_PARAMS: dict[str, dict[str, float]] = {
    "smoothgrad": {"samples": 3},
    "vargrad": {"samples": 3},
    "integrated_gradients": {"steps": 4},
    "occlusion": {"window": 8, "stride": 8},
    "lime": {"samples": 24, "segments": 8},
    "kernel_shap": {"samples": 24, "segments": 8},
    "rise": {"masks": 16, "cells": 4},
}
"""Parameters small enough for a fast test; the rest run with defaults."""


MODELS = {
    "tiny": tiny_served,
    "resnet18": resnet_served,
    "volume": volume_served,
    "vit": vit_served,
}

DECLINED: dict[tuple[str, str], str] = {
    **{(model, "attention_rollout"): "nn.Softmax" for model in ("tiny", "resnet18")},
    ("vit", "guided_backprop"): "nn.ReLU",
    ("vit", "deconvolution"): "nn.ReLU",
    ("vit", "guided_grad_cam"): "nn.ReLU",
    ("vit", "deeplift"): "no rescale rule for layer type LayerNorm",
    ("vit", "lrp"): "no rule set for self-attention (blocks.0.attn.softmax)",
}
"""(model, method) -> words of the reason the method declines the model with; every method
declines the 3-D model, if at all, by saying it handles 2-D inputs ("3-D")."""


def catalog() -> list[str]:
    return [
        name
        for name, cls in METHODS.items()
        if name != "auto"
        and not name.startswith("s_")
        and not getattr(cls, "needs_calibration", False)
    ]


@pytest.fixture(scope="module", params=list(MODELS))
def served(request):
    return MODELS[request.param]()


def _inputs(served) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images and the classes the model predicts for them (APEM needs those)."""
    x = torch.rand(2, *served.config.input_shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        target = served.module(x).argmax(dim=1)
    return x, target


@pytest.mark.parametrize("name", catalog())
def test_method(served, name, request):
    model = request.node.callspec.params["served"]
    method = get_method(name)
    reason = method.unsupported_reason(served)
    expected = DECLINED.get((model, name))
    if model == "volume" and reason is not None:
        assert "3-D" in reason, reason
        return
    assert (reason is None) == (expected is None), reason
    if reason is not None:
        assert expected in reason, reason
        return
    params = method.resolve_params(
        SMALL_PARAMS.get(name, {}), served.config.input_shape, f"methods[0].{name}"
    )
    x, target = _inputs(served)
    ctx = make_context(served, max_batch=8)
    raw = method.attribute(ctx, x, target, params)

    channels = 1 if raw.shape[1] == 1 else served.config.channels
    assert raw.shape == (2, channels, *served.config.spatial)
    assert torch.isfinite(raw).all()
    if (model, name) == ("vit", "hires_cam"):
        # ~zero on a pre-norm ViT: see test_cam_vit.test_hires_cam_is_zero_on_a_pre_norm_vit
        assert raw.abs().max() < 1e-4
        return
    if model == "vit":
        assert (raw.flatten(1).abs().amax(1) > 0).all(), "an all-zero map"
    assert ctx.budget.spent > 0, "forward passes must be counted"

    one_by_one = torch.cat(
        [
            method.attribute(make_context(served), x[i : i + 1], target[i : i + 1], params)
            for i in range(2)
        ]
    )
    scale = raw.abs().max().clamp(min=1e-12)
    assert (one_by_one - raw).abs().max() <= 1e-4 * scale

    one_channel = apply_stage(raw, x, "one_channel")
    record = apem(
        Probe.of(ctx.forward, served.module, x[0], int(target[0]), ctx.budget),
        relevance_from_map(one_channel[0]),
        resolve_options(ReliabilityRequest(resolution=0.5), x[0].numel()),
    )
    assert record.undefined_reason or math.isfinite(record.apem)


def test_catalog_covers_the_proto():
    """Every proto method except AUTO and the S-CAM family is registered and in the table."""
    from xaiserve.api.v1 import explain_pb2 as pb

    wanted = {
        v.name.lower()
        for v in pb.Method.DESCRIPTOR.values
        if v.number != 0 and v.name != "AUTO" and not v.name.startswith("S_")
    }
    assert wanted <= set(catalog())
