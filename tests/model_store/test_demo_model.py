"""The demo model directory: schema, loadable weights, held-out accuracy, deterministic training."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from xaiserve.model_store import nets, synthetic
from xaiserve.model_store.build_demo import (
    EXPORT_FILES,
    MODEL_FILES,
    build_demo,
    ensure_demo_model,
    main,
)
from xaiserve.model_store.train import train_demo

FRESH_SEED = 3  # neither the training nor the held-out seed
MIN_ACCURACY = 0.94
"""Over eight independently trained demo models (other training seeds, other CPU kernels:
training is bit-for-bit deterministic on one CPU only) the held-out accuracy was
0.970-0.993 (mean 0.981, sd 0.008) and on 500 fresh images 0.968-0.984 (mean 0.976, sd
0.005): 0.94 is 5 standard deviations below either mean."""


def _import_file(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def _load(directory: Path) -> tuple[dict, nn.Module]:
    """config.yaml and the model built from model.py and weights.pt (weights_only)."""
    config = yaml.safe_load((directory / "config.yaml").read_text())
    module = _import_file(directory / config["model"]["file"], f"_demo_model_{id(directory)}")
    model = getattr(module, config["model"]["class"])(**config["model"]["kwargs"])
    state = torch.load(directory / config["weights"], map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return config, model.eval()


def _accuracy(config: dict, model: nn.Module, n: int, seed: int) -> float:
    images, _, labels = synthetic.make_dataset(n, seed)
    mean = torch.tensor(config["normalize"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["normalize"]["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model((torch.from_numpy(images) - mean) / std)
    return float((logits.argmax(1).numpy() == labels).mean())


def _check_config(config: dict, report: dict) -> None:
    assert config == {
        "name": "demo",
        "version": "1",
        "model": {"file": "model.py", "class": "DemoCNN", "kwargs": {"num_classes": 4}},
        "weights": "weights.pt",
        "input": {"channels": 3, "height": 64, "width": 64},
        "normalize": {"mean": report["mean"], "std": report["std"]},
        "labels": ["circle", "square", "triangle", "cross"],
        "cam_layer": nets.DEMO_CAM_LAYER,
    }
    assert all(0.0 < m < 1.0 for m in report["mean"]) and all(0.0 < s < 1.0 for s in report["std"])


def test_cam_layer_is_the_last_spatial_feature_map() -> None:
    model = nets.DemoCNN().eval()
    layer = model.get_submodule(nets.DEMO_CAM_LAYER)
    assert isinstance(layer, nn.ReLU) and not layer.inplace
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    seen: list[torch.Tensor] = []
    layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        model(torch.zeros(2, 3, 64, 64))
        assert seen[0].shape == (2, 64, 8, 8)
        features = model.features(torch.zeros(2, 3, 64, 64))
    assert torch.equal(features, seen[1])
    assert model(torch.zeros(1, 3, 40, 56)).shape == (1, 4)  # any input size runs


def test_training_is_deterministic(tmp_path: Path) -> None:
    kwargs = {"epochs": 1, "progress": False, "n_train": 256, "n_test": 32}
    first = train_demo(tmp_path / "a", **kwargs)
    second = train_demo(tmp_path / "b", **kwargs)
    a = torch.load(tmp_path / "a" / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "weights.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.test_accuracy == second.test_accuracy and first.mean == second.mean


def test_tiny_build_writes_a_complete_directory_and_skips_a_rebuild(tmp_path: Path) -> None:
    out = tmp_path / "store" / "demo"
    build_demo(out, progress=False, epochs=1, n_train=64, n_test=16)
    assert sorted(p.name for p in out.iterdir()) == sorted(MODEL_FILES + EXPORT_FILES)
    leftovers = [p.name for p in out.parent.iterdir() if p.name not in ("demo", ".demo.lock")]
    assert leftovers == [], "no staging directory left behind"
    assert (out / "model.py").read_bytes() == Path(nets.__file__).read_bytes()
    report = json.loads((out / "training.json").read_text())
    assert report["n_train"] == 64 and report["epochs"] == 1
    assert report["train_seed"] == synthetic.TRAIN_SEED
    assert report["test_seed"] == synthetic.TEST_SEED
    config, _ = _load(out)
    _check_config(config, report)

    stamp = (out / "weights.pt").stat().st_mtime_ns
    main(["--out", str(out)])  # exists: nothing to do
    assert ensure_demo_model(out) == out
    assert (out / "weights.pt").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_demo_model_reports_held_out_accuracy(demo_model_dir: Path) -> None:
    report = json.loads((demo_model_dir / "training.json").read_text())
    assert report["test_accuracy"] >= MIN_ACCURACY
    assert report["n_test"] >= 1000 and report["train_seed"] != report["test_seed"]
    config, _ = _load(demo_model_dir)
    _check_config(config, report)


@pytest.mark.slow
def test_demo_model_loads_and_classifies_fresh_images(demo_model_dir: Path) -> None:
    config, model = _load(demo_model_dir)
    assert _accuracy(config, model, n=500, seed=FRESH_SEED) >= MIN_ACCURACY
    with torch.no_grad():
        logits = model(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, 4) and np.isfinite(logits.numpy()).all()
