"""GAD (seed 002): distanced targets, deterministic support training and its storage, the
GAD map in the engine (a subset of the original's important pixels, with an APEM record),
the region metrics RC and RS by hand, and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from support.tiny_models import write_tiny_model_dir
from xaiserve.api.errors import InvalidArgument
from xaiserve.api.types import ExplainRequest, MethodRequest, RawTensor, ReliabilityRequest
from xaiserve.engine.engine import Engine
from xaiserve.engine.gad import gad_keep_mask, important_pixels, pixel_relevance
from xaiserve.engine.limits import EngineLimits
from xaiserve.offline.evaluate_gad import hull_region, region_sensitivity
from xaiserve.offline.gad_train import GadTrainSettings, distanced_targets, train_pair
from xaiserve.runtime.gad_store import GAD_DIR, INDEX_FILE, read_index
from xaiserve.runtime.model import load_model_dir

SETTINGS = GadTrainSettings(epochs=2, learning_rate=1e-2, batch_size=8)


def test_distanced_targets_lower_the_other_class_logit():
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, -1.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 2, 0])
    targets = distanced_targets(logits, labels, (0, 2), alpha=4.0)
    assert targets.tolist() == [[2.0, 1.0, -3.5], [-4.0, 3.0, -1.0], [1.0, 1.0, -3.0]]
    assert logits[0, 2] == 0.5, "the original logits are not modified"


# ----------------------------------------------------------------------------- training


def _pair_data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.rand(n, 3, 16, 16, generator=g), torch.tensor([0, 1] * (n // 2))


@pytest.fixture(scope="module")
def gad_dir(tmp_path_factory) -> Path:
    """A tiny model directory with support models for the pair (a, b)."""
    directory = write_tiny_model_dir(tmp_path_factory.mktemp("gad") / "tiny")
    x, labels = _pair_data()
    train_pair(load_model_dir(directory), x, labels, (0, 1), [0, 2, 8], SETTINGS)
    return directory


def test_training_stores_one_model_per_positive_alpha(gad_dir):
    index = read_index(gad_dir)
    assert index is not None
    (entry,) = index["pairs"]
    assert entry["classes"] == [0, 1] and entry["labels"] == ["a", "b"]
    assert entry["alphas"] == [0.0, 2.0, 8.0]
    assert entry["files"] == ["", "pair_0_1_alpha_2.pt", "pair_0_1_alpha_8.pt"]
    assert entry["settings"]["learning_rate"] == 1e-2 and entry["images"] == 24
    for name in entry["files"][1:]:
        state = torch.load(gad_dir / GAD_DIR / name, weights_only=True)
        assert set(state) == set(load_model_dir(gad_dir).module.net.state_dict())
    served = load_model_dir(gad_dir)
    assert served.gad is not None
    (pair,) = served.gad.pairs
    assert pair.alphas == (2.0, 8.0) and len(pair.modules) == 2
    x, _ = _pair_data()
    with torch.no_grad():
        assert not torch.equal(pair.modules[1](x), served.module(x)), "the support model moved"


def test_training_is_deterministic(tmp_path):
    x, labels = _pair_data()
    states = []
    for name in ("one", "two"):
        directory = write_tiny_model_dir(tmp_path / name)
        train_pair(load_model_dir(directory), x, labels, (0, 1), [4], SETTINGS)
        states.append(torch.load(directory / GAD_DIR / "pair_0_1_alpha_4.pt", weights_only=True))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_training_moves_the_logits_towards_the_distanced_targets(tmp_path):
    directory = write_tiny_model_dir(tmp_path / "tiny")
    served = load_model_dir(directory)
    x, labels = _pair_data(48)
    entry = train_pair(
        served, x, labels, (0, 1), [4], GadTrainSettings(epochs=4, learning_rate=1e-2, batch_size=8)
    )
    with torch.no_grad():
        before = served.module(x)
    initial_mse = float(((distanced_targets(before, labels, (0, 1), 4.0) - before) ** 2).mean())
    assert entry["alphas"] == [4.0] and entry["final_mse"][0] < initial_mse


def test_stale_support_models_are_ignored(gad_dir, tmp_path, caplog):
    import shutil

    copy = tmp_path / "tiny"
    shutil.copytree(gad_dir, copy)
    index = json.loads((copy / GAD_DIR / INDEX_FILE).read_text())
    index["weights_sha256"] = "0" * 64
    (copy / GAD_DIR / INDEX_FILE).write_text(json.dumps(index))
    assert load_model_dir(copy).gad is None
    assert "other weights" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pair": (0, 0)}, "two different classes"),
        ({"alphas": [0]}, "at least one > 0"),
        ({"labels": torch.tensor([0, 2] * 12)}, "one of the pair's classes"),
    ],
)
def test_training_refuses_bad_input(tmp_path, kwargs, message):
    served = load_model_dir(write_tiny_model_dir(tmp_path / "tiny"))
    x, labels = _pair_data()
    args = {"x": x, "labels": labels, "pair": (0, 1), "alphas": [2], **kwargs}
    with pytest.raises(ValueError, match=message):
        train_pair(served, args["x"], args["labels"], args["pair"], args["alphas"], SETTINGS)


# -------------------------------------------------------------------------- the masks


def test_important_pixels_are_the_top_fraction_and_never_zero():
    relevance = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    assert important_pixels(relevance, 0.5).tolist() == [[False] * 4, [False, True, True, True]]
    assert important_pixels(relevance, 0.25).tolist() == [[False] * 4, [False, False, True, True]]


def test_keep_mask_is_the_intersection_over_maps():
    a = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])  # top half: (0,0), (0,1)
    b = torch.tensor([[[1.0, 3.0], [4.0, 2.0]]])  # top half: (0,1), (1,0)
    assert gad_keep_mask([a, b], 0.5).tolist() == [[False, True], [False, False]]
    raw = torch.tensor([[[1.0, -2.0]], [[0.5, 0.5]]])  # C x H x W: |.| summed over C
    assert pixel_relevance(raw).tolist() == [[1.5, 2.5]]


def test_hull_region_by_hand():
    pixels = np.zeros((6, 6), dtype=bool)
    pixels[1, 1] = pixels[1, 4] = pixels[4, 1] = True  # an L of three unit squares
    area, mask = hull_region(pixels)
    # hull of the squares' corners: (1,1),(1,5),(2,5),(5,2),(5,1): the 4 x 4 square from
    # (1,1) to (5,5) less the triangle (2,5),(5,5),(5,2) of area 4.5
    assert area == pytest.approx(11.5)
    assert mask[1, 1] and mask[1, 4] and mask[4, 1] and mask[2, 2] and not mask[4, 4]
    one = np.zeros((3, 3), dtype=bool)
    one[2, 0] = True
    area, mask = hull_region(one)
    assert area == pytest.approx(1.0) and mask.tolist() == one.tolist()
    assert hull_region(np.zeros((3, 3), dtype=bool))[0] == 0.0


def test_region_sensitivity_by_hand():
    """A linear model: the logit change of occluding M is the sum of its weights there."""
    weights = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)

    class Linear(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([(x * weights).sum(dim=(1, 2, 3)), -x.sum(dim=(1, 2, 3))], 1)

    image = torch.ones(1, 4, 4)
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, :2] = True  # weights 0 and 1
    assert region_sensitivity(Linear(), image, mask, 0) == pytest.approx(1 / 2)
    assert region_sensitivity(Linear(), image, mask, 1) == pytest.approx(2 / 2)
    assert math.isnan(region_sensitivity(Linear(), image, np.zeros((4, 4), bool), 0))


# ------------------------------------------------------------------------- the engine


def _request(*methods: MethodRequest, target: int | None = None, seed: int = 1):
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(seed)).numpy()
    raw = RawTensor((3, 16, 16), image.astype("<f4").tobytes())
    return ExplainRequest(model="tiny", image=raw, methods=methods, target=target)


@pytest.fixture(scope="module")
def gad_engine(gad_dir) -> Engine:
    return Engine.from_model_store(gad_dir.parent, EngineLimits())


@pytest.mark.parametrize(
    "name",
    ["saliency", "input_x_gradient", "integrated_gradients", "guided_backprop", "deconvolution"],
)
@pytest.mark.parametrize("stage", ["one_channel", "raw"])
@pytest.mark.parametrize("target", [0, 1])
def test_gad_map_is_a_subset_of_the_original_important_pixels(gad_engine, name, stage, target):
    params = {"steps": 8} if name == "integrated_gradients" else {}
    result = gad_engine.explain(
        _request(
            MethodRequest(name, params=params, stage=stage),
            MethodRequest(
                name,
                params=params,
                stage=stage,
                gad=True,
                field="methods[1]",
                reliability=ReliabilityRequest(resolution=0.2),
            ),
            target=target,
        )
    )
    original, gad = result.explanations
    assert gad.map.shape == original.map.shape
    important = important_pixels(pixel_relevance(torch.from_numpy(original.map))).numpy()
    kept = pixel_relevance(torch.from_numpy(gad.map)).numpy() > 0
    assert kept.any() and (kept <= important).all(), "GAD adds no new important pixel"
    assert kept.sum() <= important.sum()
    np.testing.assert_array_equal(gad.map, original.map * kept)  # the original's values
    assert gad.reliability is not None and "gad" in gad.timings
    assert gad.forward_passes > original.forward_passes  # the support models' passes


def test_list_models_shows_the_pairs(gad_engine):
    info = gad_engine.list_models()[0]
    assert info.gad_class_pairs == ("a,b",)


def test_gad_refused_for_a_class_in_no_pair(gad_engine):
    with pytest.raises(InvalidArgument) as caught:
        gad_engine.explain(_request(MethodRequest("saliency", gad=True), target=2))
    assert caught.value.field == "methods[0].gad"
    assert "the explained class 2 ('c') is in no GAD class pair of model 'tiny' (pairs: a,b)" in (
        str(caught.value)
    )


@pytest.mark.parametrize("name", ["grad_cam", "occlusion", "auto", "s_grad_cam"])
def test_gad_refused_for_methods_that_are_not_input_gradients(gad_engine, name):
    with pytest.raises(InvalidArgument) as caught:
        gad_engine.explain(_request(MethodRequest(name, gad=True), target=0))
    if name == "s_grad_cam":  # uncalibrated: the method itself is refused first
        assert caught.value.field == "methods[0].method"
        return
    assert caught.value.field == "methods[0].gad"
    assert "GAD works with gradient methods on the input" in str(caught.value)
    assert f"{name} is not one" in str(caught.value)


def test_gad_refused_without_support_models(tmp_path):
    write_tiny_model_dir(tmp_path / "tiny")
    engine = Engine.from_model_store(tmp_path, EngineLimits())
    assert engine.list_models()[0].gad_class_pairs == ()
    with pytest.raises(InvalidArgument) as caught:
        engine.explain(
            _request(
                MethodRequest("saliency"), MethodRequest("saliency", gad=True, field="methods[1]")
            )
        )
    assert caught.value.code == "INVALID_ARGUMENT"
    assert str(caught.value) == (
        "methods[1].gad: model 'tiny' has no GAD support models (train them with "
        "`xaiserve gad-train --model tiny --classes A,B`)"
    )
