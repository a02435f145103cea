"""The small ViT served from a model directory through the engine: what ListModels says it
supports (and why not the rest), and one method per family with its APEM record and the
fast filter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from support.vit_models import write_vit_model_dir
from xaiserve.api.types import (
    ExplainRequest,
    FilterRequest,
    MethodRequest,
    RawTensor,
    ReliabilityRequest,
)
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.runtime.forward.config import ForwardConfig
from xaiserve.runtime.model import load_model_dir

PARAMS = {
    "occlusion": {"window": 4, "stride": 4},
    "rise": {"masks": 16, "cells": 4},
    "lime": {"samples": 24, "segments": 8},
    "integrated_gradients": {"steps": 4},
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    served = load_model_dir(write_vit_model_dir(tmp_path_factory.mktemp("store") / "vit"))
    config = ForwardConfig(backend="torch", export_on_load=False)
    return Engine({"vit": served}, EngineLimits(max_forward_passes=200_000), config)


def test_list_models_gives_the_vit_methods_and_the_reasons_for_the_rest(engine):
    (info,) = engine.list_models()
    assert {"grad_cam", "score_cam", "attention_rollout", "saliency", "occlusion"} <= set(
        info.methods
    )
    reasons = dict(line.split(": ", 1) for line in info.unsupported_methods)
    assert {"lrp", "deeplift", "guided_backprop", "deconvolution", "guided_grad_cam"} <= set(
        reasons
    )
    assert reasons["lrp"].startswith("lrp has no rule set for self-attention")
    assert "nn.ReLU" in reasons["guided_backprop"]


@pytest.mark.parametrize(
    "name", ["saliency", "integrated_gradients", "grad_cam", "occlusion", "rise", "lime"]
)
def test_a_method_of_each_family_with_apem_and_the_filter(engine, name):
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(2)).numpy()
    request = ExplainRequest(
        model="vit",
        image=RawTensor((3, 16, 16), x.astype("<f4").tobytes()),
        methods=(
            MethodRequest(
                name,
                PARAMS.get(name, {}),
                field="methods[0]",
                params_field=name,
                reliability=ReliabilityRequest(shuffles=2),
                filter=FilterRequest("fast", 400),
            ),
        ),
    )
    (explanation,) = engine.explain(request).explanations
    assert explanation.map.shape == (1, 16, 16)
    assert np.isfinite(explanation.map).all() and explanation.map.max() > 0
    assert explanation.reliability is not None and math.isfinite(explanation.reliability.apem)
    filtered = explanation.filtered
    assert filtered is not None and 0 < filtered.kept_fraction <= 1
    assert math.isfinite(filtered.apem_before) and math.isfinite(filtered.apem_after)
    assert filtered.map.shape == (1, 16, 16) and np.isfinite(filtered.map).all()


@pytest.mark.parametrize("name", ["score_cam", "occlusion", "rise"])
def test_forward_only_methods_on_onnx_runtime_equal_torch(engine, tmp_path, name):
    """The ViT exports to ONNX; forward-only methods' batches run on ONNX Runtime and give
    torch's map within 1e-4 (of a map scaled to max 1)."""
    served = load_model_dir(write_vit_model_dir(tmp_path / "vit"))
    onnx = Engine(
        {"vit": served},
        EngineLimits(max_forward_passes=200_000),
        ForwardConfig(backend="onnxruntime", export_on_load=True),
    )
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(4)).numpy()

    def explain(on: Engine) -> np.ndarray:
        request = ExplainRequest(
            model="vit",
            image=RawTensor((3, 16, 16), x.astype("<f4").tobytes()),
            methods=(
                MethodRequest(name, PARAMS.get(name, {}), field="methods[0]", params_field=name),
            ),
        )
        return on.explain(request).explanations[0].map

    (info,) = onnx.list_models()
    assert info.forward_backend == "onnxruntime"
    torch_map, onnx_map = explain(engine), explain(onnx)
    assert torch_map.max() > 0
    assert np.abs(torch_map - onnx_map).max() <= 1e-4
