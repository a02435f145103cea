"""A model store in which some directories fail to load: the others are served, the failed
ones listed with their reason and answered FAILED_PRECONDITION; model code that imports
the files next to it; weights files refused with what to save instead."""

from __future__ import annotations

import io
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from support.broken_models import BROKEN, GOOD, WEIGHTS_ADVICE, write_store
from support.tiny_models import tiny_served, write_tiny_model_dir
from xaiserve.api.errors import FailedPrecondition, ModelLoadError, NotFound
from xaiserve.api.types import EncodedImage, ExplainRequest, MethodRequest
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.runtime.forward.config import ForwardConfig
from xaiserve.runtime.model import PixelSpaceModel, ServedModel, load_model_dir

#: No ONNX export at load: these tests are about loading, not about the forward backends.
TORCH_ONLY = ForwardConfig(export_on_load=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def engine(store: Path) -> Engine:
    return Engine.from_model_store(store, EngineLimits(), TORCH_ONLY)


def _png() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _request(model: str) -> ExplainRequest:
    return ExplainRequest(
        model=model, image=EncodedImage(_png()), methods=(MethodRequest("saliency"),)
    )


def test_the_good_model_is_served_and_every_failure_listed(engine: Engine, store: Path) -> None:
    assert set(engine.models) == {GOOD}
    infos = {info.name: info for info in engine.list_models()}
    assert set(infos) == {GOOD, *BROKEN}
    assert infos[GOOD].status == "AVAILABLE" and infos[GOOD].status_reason == ""
    assert "saliency" in infos[GOOD].methods
    for name, (_, reason) in BROKEN.items():
        info = infos[name]
        assert info.status == "FAILED", name
        assert reason in info.status_reason, (name, info.status_reason)
        assert info.methods == () and info.input_shape == ()
        assert str(store) not in info.status_reason  # paths are relative to the store
        assert info.status_reason.startswith(name), info.status_reason
    assert [i.name for i in engine.list_models()] == sorted(infos)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_explain_on_a_failed_model_names_the_reason(engine: Engine, name: str) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        engine.explain(_request(name))
    assert caught.value.field == "model_name"
    assert f"model {name!r} failed to load: " in str(caught.value)
    assert BROKEN[name][1] in str(caught.value)


def test_explain_on_the_good_model_and_an_unknown_one(engine: Engine) -> None:
    result = engine.explain(_request(GOOD))
    assert result.model == GOOD and result.explanations[0].map.shape == (1, 16, 16)
    with pytest.raises(NotFound, match=r"served: tiny$"):
        engine.explain(_request("nope"))


def test_weights_refusals_say_what_to_save_instead(store: Path) -> None:
    for name in ("pickled", "scripted"):
        with pytest.raises(ModelLoadError) as caught:
            load_model_dir(store / name)
        assert WEIGHTS_ADVICE in str(caught.value)
        assert "add_safe_globals" not in str(caught.value)  # not torch's own advice
        assert "Re-running" not in str(caught.value)


def test_a_store_where_nothing_loads_refuses_to_start(tmp_path: Path) -> None:
    write_store(tmp_path, good=False)
    with pytest.raises(ModelLoadError) as caught:
        Engine.from_model_store(tmp_path, EngineLimits(), TORCH_ONLY)
    message = str(caught.value)
    assert "no model could be loaded" in message
    for name, (_, reason) in BROKEN.items():
        assert f"{name}: {name}" in message and reason in message


def test_a_repeated_name_serves_the_first_directory(tmp_path: Path) -> None:
    write_tiny_model_dir(tmp_path / "a")
    write_tiny_model_dir(tmp_path / "b", seed=1)
    engine = Engine.from_model_store(tmp_path, EngineLimits(), TORCH_ONLY)
    assert engine.models[GOOD].directory == tmp_path / "a"
    statuses = [(i.name, i.status, i.status_reason) for i in engine.list_models()]
    assert statuses == [
        (GOOD, "AVAILABLE", ""),
        (GOOD, "FAILED", "model name 'tiny' repeated: a is served"),
    ]
    assert engine.explain(_request(GOOD)).model == GOOD


class _Raises(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("refuses batches")


def test_a_model_whose_forward_setup_fails_is_listed_as_failed() -> None:
    good = tiny_served()
    config = good.config.__class__(**{**good.config.__dict__, "name": "raises"})
    module = PixelSpaceModel(_Raises(), config.mean, config.std).eval()
    bad = ServedModel(config, module, None, Path("raises"))
    engine = Engine({GOOD: good, "raises": bad}, EngineLimits(), TORCH_ONLY)
    assert set(engine.models) == set(engine.forwards) == {GOOD}
    (failed,) = engine.failed
    assert (failed.name, failed.version) == ("raises", "1")
    assert failed.reason == "RuntimeError: refuses batches"
    with pytest.raises(FailedPrecondition, match="'raises' failed to load: RuntimeError"):
        engine.explain(_request("raises"))


# ------------------------------------------------------------------ sibling imports

_HELPERS = """\
import torch
from torch import nn

FACTOR = {factor}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(2, 3))) * FACTOR
"""

_MODEL = """\
from torch import nn

{import_line}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()

    def forward(self, x):
        return self.block(x)
"""


def _helper_dir(root: Path, name: str, factor: float, import_line: str) -> Path:
    """A model directory whose model.py imports Block from the helpers.py next to it;
    its logits for an image of 0.5 everywhere are 1.5 * factor (both classes)."""
    directory = root / name
    directory.mkdir()
    (directory / "helpers.py").write_text(_HELPERS.format(factor=factor))
    (directory / "model.py").write_text(_MODEL.format(import_line=import_line))
    weights = {"block.linear.weight": torch.ones(2, 3), "block.linear.bias": torch.zeros(2)}
    torch.save(weights, directory / "weights.pt")
    config = {
        "name": name,
        "model": {"class": "Net"},
        "input": {"channels": 3, "height": 4, "width": 4},
        "labels": ["a", "b"],
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return directory


def test_model_code_imports_its_own_helpers(tmp_path: Path, monkeypatch) -> None:
    factors = {"alpha": 1.0, "beta": 2.0, "gamma": 3.0}
    for name, line in (
        ("alpha", "from helpers import Block"),
        ("beta", "from helpers import Block"),
        ("gamma", "from .helpers import Block"),
    ):
        _helper_dir(tmp_path, name, factors[name], line)
    image = torch.full((1, 3, 4, 4), 0.5)
    monkeypatch.delitem(sys.modules, "helpers", raising=False)
    engine = Engine.from_model_store(tmp_path, EngineLimits(), TORCH_ONLY)
    assert set(engine.models) == set(factors) and not engine.failed
    for name, factor in factors.items():  # each model got its own helpers.py
        logits = engine.models[name].module(image)
        torch.testing.assert_close(logits, torch.full((1, 2), 1.5 * factor))
    assert "helpers" not in sys.modules  # nothing leaked to the next directory
    assert not any(str(tmp_path) in entry for entry in sys.path)
    elsewhere = types.ModuleType("helpers")  # a module of the same name imported before
    monkeypatch.setitem(sys.modules, "helpers", elsewhere)
    served = load_model_dir(tmp_path / "beta")
    torch.testing.assert_close(served.module(image), torch.full((1, 2), 3.0))
    assert sys.modules["helpers"] is elsewhere  # shadowed while beta loaded, then put back


def test_a_failed_import_leaves_no_module_behind(tmp_path: Path) -> None:
    directory = _helper_dir(tmp_path, "delta", 1.0, "from helpers import Missing")
    before = set(sys.modules)
    with pytest.raises(ModelLoadError, match="import failed: ImportError: cannot import name"):
        load_model_dir(directory)
    assert set(sys.modules) - before == set()
