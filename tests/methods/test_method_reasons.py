"""Bad input for the catalog: models a method declines (with a reason that names what is
missing) and parameters out of range (the error names the request field)."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from support.method_models import FunctionalRelu, WithGelu, served_from_net, volume_served
from support.tiny_models import write_tiny_model_dir
from xaiserve.api.errors import InvalidArgument
from xaiserve.api.types import ExplainRequest, MethodRequest, RawTensor
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.methods.base import AttributionMethod
from xaiserve.methods.registry import METHODS, get_method

TANH_NET = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(144, 3))


@pytest.mark.parametrize("name", ["guided_backprop", "deconvolution", "guided_grad_cam"])
def test_relu_override_needs_relu_modules(name):
    functional = get_method(name).unsupported_reason(
        served_from_net(FunctionalRelu(), (3, 8, 8), cam_layer="conv")
    )
    assert functional == (
        f"the network applies ReLU as a function (torch.relu), which {name} cannot override; "
        "it needs every ReLU to be an nn.ReLU module"
    )
    none = get_method(name).unsupported_reason(served_from_net(TANH_NET, (3, 8, 8), cam_layer="1"))
    assert none == f"{name} overrides the backward pass of nn.ReLU modules and the network has none"


def test_deeplift_reasons():
    gelu = get_method("deeplift").unsupported_reason(served_from_net(WithGelu(), (3, 8, 8)))
    assert gelu == "deeplift has no rescale rule for layer type GELU (act)"
    functional = get_method("deeplift").unsupported_reason(
        served_from_net(FunctionalRelu(), (3, 8, 8))
    )
    assert "applies a nonlinearity as a function (torch.relu)" in functional
    assert get_method("deeplift").unsupported_reason(served_from_net(TANH_NET, (3, 8, 8))) is None


def test_layer_methods_without_a_cam_layer():
    served = served_from_net(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)), (3, 8, 8)
    )
    needing = {name for name, cls in METHODS.items() if cls.needs_layer}
    assert {
        "grad_cam_plus_plus",
        "xgrad_cam",
        "hires_cam",
        "layer_cam",
        "score_cam",
        "guided_grad_cam",
    } <= needing
    for name in needing:
        assert get_method(name).unsupported_reason(served) == "the model configures no cam_layer"


def test_a_2d_only_method_says_so_for_volumes():
    class Flat(AttributionMethod):
        name = "flat"
        spatial_dims = (2,)

    reason = Flat().unsupported_reason(volume_served())
    assert reason == "flat handles 2-D inputs; the model takes 3-D inputs"


@pytest.mark.parametrize(
    "name,params,field,words",
    [
        ("lime", {"samples": 4}, "samples", "must be between 8 and 4096, got 4"),
        ("kernel_shap", {"segments": 2000}, "segments", "must be between 4 and 1024"),
        ("kernel_shap", {"baseline": 1.5}, "baseline", "must be between 0 and 1"),
        ("rise", {"keep_probability": 1.0}, "keep_probability", "strictly between 0 and 1"),
        ("rise", {"cells": 32}, "cells", "32 cells per side is more than the input's 16 pixels"),
        ("rise", {"masks": 9000}, "masks", "must be between 8 and 8192"),
        ("deeplift", {"baseline": -0.1}, "baseline", "must be between 0 and 1"),
        ("vargrad", {"samples": 0}, "samples", "must be between 1 and 1024"),
        ("vargrad", {"seed": 1.5}, "seed", "must be an integer"),
        ("lrp", {"epsilon": float("nan")}, "epsilon", "must be a finite number"),
        ("score_cam", {"channels": 3}, "channels", "unknown parameter of score_cam"),
    ],
)
def test_params_out_of_range_name_the_field(name, params, field, words):
    with pytest.raises(InvalidArgument) as info:
        get_method(name).resolve_params(params, (3, 16, 16), f"methods[0].{name}")
    assert info.value.field == f"methods[0].{name}.{field}"
    assert words in str(info.value)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp("store")
    write_tiny_model_dir(root / "tiny", cam_layer="")
    return Engine.from_model_store(root, EngineLimits())


def explain(engine: Engine, *methods: MethodRequest):
    image = np.random.default_rng(0).random((3, 16, 16), dtype=np.float32)
    return engine.explain(
        ExplainRequest(model="tiny", image=RawTensor((3, 16, 16), image.tobytes()), methods=methods)
    )


def test_engine_refuses_cam_methods_without_a_layer(engine):
    (info,) = engine.list_models()
    assert "score_cam" not in info.methods and "lrp" in info.methods
    assert any(m.startswith("score_cam: ") and "cam_layer" in m for m in info.unsupported_methods)
    with pytest.raises(InvalidArgument) as err:
        explain(engine, MethodRequest("layer_cam", field="methods[0]", params_field="layer_cam"))
    assert err.value.field == "methods[0].method"
    assert "layer_cam cannot run on model 'tiny': the model configures no cam_layer" in str(
        err.value
    )


def test_engine_names_the_lrp_field(engine):
    with pytest.raises(InvalidArgument) as err:
        explain(
            engine,
            MethodRequest("saliency", field="methods[0]"),
            MethodRequest("lrp", {"epsilon": -1.0}, field="methods[1]", params_field="lrp"),
        )
    assert err.value.field == "methods[1].lrp.epsilon"
    assert "must be >= 0, got -1" in str(err.value)


def test_engine_runs_the_catalog_on_a_served_model(engine):
    """One call with several of the new methods, through the engine."""
    result = explain(
        engine,
        MethodRequest(
            "lrp", {"rule": "alpha_beta", "alpha": 2.0}, field="methods[0]", params_field="lrp"
        ),
        MethodRequest("deeplift", field="methods[1]"),
        MethodRequest("rise", {"masks": 16, "cells": 4}, field="methods[2]", params_field="rise"),
    )
    assert [e.method for e in result.explanations] == ["lrp", "deeplift", "rise"]
    assert all(e.map.shape == (1, 16, 16) for e in result.explanations)
