"""S-CAM (seed 003): the common intensity scale, the calibration pass and its storage, the
S-CAM methods against hand computations, and the engine's refusal without calibration."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from support.calibrated_models import calibrated_tiny
from support.tiny_models import make_context, write_tiny_model_dir
from xaiserve.api.errors import InvalidArgument
from xaiserve.api.types import ExplainRequest, MethodRequest, RawTensor, ReliabilityRequest
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.methods.cam.grad_cam import GradCam, layer_activations_and_gradients, upsample
from xaiserve.methods.registry import METHODS, get_method
from xaiserve.offline.calibrate import LabeledImage, calibrate, scaled_cams
from xaiserve.runtime.calibration import (
    CALIBRATION_JSON,
    CALIBRATION_NPZ,
    Calibration,
    load_calibration,
    principal_count,
    save_calibration,
    tanh_coefficients,
    tanh_scale,
)
from xaiserve.runtime.model import load_model_dir

S_METHODS = ("s_grad_cam", "s_xgrad_cam", "s_grad_cam_plus_plus", "s_grad_cam_pixel")


# ----------------------------------------------------------------------- the tanh scale


@pytest.mark.parametrize(("p10", "p90"), [(0.0, 1.0), (-0.47, 0.41), (2.0, 12.0), (-5.0, -1.0)])
def test_tanh_scale_maps_p10_and_p90_to_the_seeds_values(p10, p90):
    values = tanh_scale(torch.tensor([p10, p90], dtype=torch.float64), p10, p90)
    assert values.tolist() == pytest.approx([0.1, 0.9], abs=1e-12)
    a, b = tanh_coefficients(p10, p90)  # the seed's constants, written out
    assert a == pytest.approx((math.atanh(0.9) - math.atanh(0.1)) / (p90 - p10))
    assert b == pytest.approx((p90 * math.atanh(0.1) - p10 * math.atanh(0.9)) / (p90 - p10))


def test_tanh_scale_hand_computed():
    # seed 003 eq. 2 with P10 = -0.5, P90 = 1.5: atanh 0.1 = 0.100335, atanh 0.9 = 1.472219,
    # a = (1.472219 - 0.100335) / 2 = 0.685942,
    # b = (1.5 x 0.100335 + 0.5 x 1.472219) / 2 = 0.443306
    x = torch.tensor([[-2.0, -0.5], [0.0, 3.0]], dtype=torch.float64)
    expected = [
        [-0.729930, 0.1],  # tanh(-2 a + b) = tanh(-0.928578); P10 -> 0.1
        [0.416381, 0.986644],  # tanh(b) = tanh(0.443306); tanh(3 a + b) = tanh(2.501133)
    ]
    np.testing.assert_allclose(tanh_scale(x, -0.5, 1.5).numpy(), expected, atol=1e-6)


def test_negative_contributions_come_out_negative_only_below_the_zero_crossing():
    """On a scale like the demo's (P10 = -0.47, P90 = 0.41: a = 1.558959, b = 0.833046)
    a zero activation maps to tanh(b) = 0.682108 and -0.2 to tanh(0.521254) = 0.478668:
    negative contributions stay below a zero activation's value but are positive down to
    the zero crossing -b / a = -0.534360, which lies below P10."""
    x = torch.tensor([-1.0, -0.6, -0.47, -0.2, 0.0], dtype=torch.float64)
    got = tanh_scale(x, -0.47, 0.41).numpy()
    np.testing.assert_allclose(got, [-0.620559, -0.101974, 0.1, 0.478668, 0.682108], atol=1e-6)
    a, b = tanh_coefficients(-0.47, 0.41)
    assert -b / a == pytest.approx(-0.534360, abs=1e-6)


def test_tanh_scale_is_monotone_and_bounded():
    p10, p90 = -0.4, 0.6
    x = torch.linspace(-5, 5, 2001, dtype=torch.float64)
    y = tanh_scale(x, p10, p90)
    assert (y.diff() > 0).all(), "strictly increasing: no clipping outside [P10, P90]"
    assert y.min() > -1 and y.max() < 1
    a, b = tanh_coefficients(p10, p90)
    below = x < -b / a
    assert below.any() and (y[below] < 0).all(), "negative below the zero crossing only"
    assert (y[~below] >= 0).all()
    # a per-image min-max scale would send every map's minimum to 0; this one does not
    assert tanh_scale(torch.tensor(-1.0), p10, p90) < tanh_scale(torch.tensor(-0.5), p10, p90) < 0.1


def test_tanh_scale_needs_p90_above_p10():
    with pytest.raises(ValueError, match="P90 > P10"):
        tanh_coefficients(1.0, 1.0)


def test_principal_count():
    assert principal_count(64, 0.05) == 4  # ceil(3.2)
    assert principal_count(64, 0.25) == 16
    assert principal_count(64, 1e-6) == 1
    assert principal_count(64, 1.0) == 64


# ------------------------------------------------------------------ calibration pass


def _images(n: int, seed: int = 3) -> list[LabeledImage]:
    g = torch.Generator().manual_seed(seed)
    return [LabeledImage(torch.rand(3, 16, 16, generator=g).numpy(), i % 3) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("scam") / "tiny")


@pytest.fixture(scope="module")
def tiny_calibration(tiny_dir) -> Calibration:
    return calibrate(load_model_dir(tiny_dir), _images(24), batch_size=5)


def test_calibration_covers_every_s_method(tiny_calibration):
    assert set(tiny_calibration.cams) == {name.removeprefix("s_") for name in S_METHODS}
    assert set(scaled_cams()) == set(tiny_calibration.cams)
    for cam in tiny_calibration.cams.values():
        assert cam.importance.shape == (8, 3)  # F features x C classes
        assert cam.maps == 24 * 3  # eq. 3: every class for every image
        assert cam.p90 > cam.p10
        assert (np.diff(cam.max_percentiles) >= 0).all()
    assert tiny_calibration.importance_mode == "all_classes"


def test_importance_matrix_and_percentiles_by_hand(tiny_dir, tiny_calibration):
    """IM[f, c] = mean over images of sum over positions of w_f^c A_f (seed eq. 3); the
    scale's P90 is the 90th percentile of the maps' maxima, P10 the 10th of their minima."""
    served = load_model_dir(tiny_dir)
    x = torch.from_numpy(np.stack([item.image for item in _images(24)]))
    ctx = make_context(served)
    sums, maxima, minima = torch.zeros(8, 3, dtype=torch.float64), [], []
    for c in range(3):
        acts, grads = layer_activations_and_gradients(ctx, x, torch.full((24,), c))
        weighted = GradCam().channel_weights(acts, grads) * acts
        sums[:, c] = weighted.sum(dim=(2, 3)).double().mean(dim=0)
        maps = upsample(weighted.sum(dim=1, keepdim=True), (16, 16)).flatten(1)
        maxima.append(maps.amax(1))
        minima.append(maps.amin(1))
    cam = tiny_calibration.cams["grad_cam"]
    np.testing.assert_allclose(cam.importance, sums.numpy(), rtol=1e-5, atol=1e-7)
    assert cam.p90 == pytest.approx(float(np.percentile(torch.cat(maxima).numpy(), 90)), rel=1e-5)
    assert cam.p10 == pytest.approx(float(np.percentile(torch.cat(minima).numpy(), 10)), rel=1e-5)


def test_true_class_importance_averages_each_class_over_its_images(tiny_dir):
    """Seed eq. 4: each image only for its label; column c averages over class c's images."""
    served = load_model_dir(tiny_dir)
    images = _images(12)
    calibration = calibrate(served, images, importance_mode="true_class", batch_size=4)
    x = torch.from_numpy(np.stack([item.image for item in images]))
    labels = torch.tensor([item.label for item in images])
    acts, grads = layer_activations_and_gradients(make_context(served), x, labels)
    per_image = (GradCam().channel_weights(acts, grads) * acts).sum(dim=(2, 3)).double()
    expected = torch.stack([per_image[labels == c].mean(0) for c in range(3)], dim=1)
    cam = calibration.cams["grad_cam"]
    np.testing.assert_allclose(cam.importance, expected.numpy(), rtol=1e-5, atol=1e-7)
    assert cam.maps == 12


def test_calibration_is_deterministic_and_round_trips(tiny_dir, tiny_calibration, tmp_path):
    again = calibrate(load_model_dir(tiny_dir), _images(24), batch_size=5)
    for key, cam in tiny_calibration.cams.items():
        other = again.cams[key]
        for name in ("importance", "max_percentiles", "min_percentiles"):
            np.testing.assert_array_equal(getattr(cam, name), getattr(other, name))
    save_calibration(tmp_path, tiny_calibration)
    assert (tmp_path / CALIBRATION_JSON).is_file() and (tmp_path / CALIBRATION_NPZ).is_file()
    with np.load(tmp_path / CALIBRATION_NPZ, allow_pickle=False) as packed:
        assert all(packed[name].dtype == np.float64 for name in packed.files)
    loaded = load_calibration(tmp_path, "features.4", tiny_calibration.weights_sha256)
    assert loaded is not None
    np.testing.assert_array_equal(
        loaded.cams["grad_cam"].importance, tiny_calibration.cams["grad_cam"].importance
    )
    assert loaded.cams["grad_cam"].p90 == tiny_calibration.cams["grad_cam"].p90


def test_stale_calibration_is_ignored(tiny_calibration, tmp_path, caplog):
    save_calibration(tmp_path, tiny_calibration)
    assert load_calibration(tmp_path, "features.4", "0" * 64) is None
    assert "other weights" in caplog.text
    assert load_calibration(tmp_path / "absent", "features.4", "0" * 64) is None


# ------------------------------------------------------------------- the S-CAM methods


@pytest.mark.parametrize("name", S_METHODS)
def test_s_cam_is_the_tanh_of_the_unrectified_weighted_sum(name, images):
    served = calibrated_tiny()
    method = get_method(name)
    assert method.unsupported_reason(served) is None
    target = torch.tensor([0, 2])
    ctx = make_context(served)
    out = method.attribute(ctx, images, target, method.resolve_params({}, (3, 16, 16), "m"))
    acts, grads = layer_activations_and_gradients(make_context(served), images, target)
    cam = METHODS[name].cam().channel_weights(acts, grads) * acts
    scale = served.calibration.cams[name.removeprefix("s_")]
    expected = tanh_scale(upsample(cam.sum(1, keepdim=True), (16, 16)), scale.p10, scale.p90)
    assert out.shape == (2, 1, 16, 16)
    torch.testing.assert_close(out, expected)
    assert scale.p10 == pytest.approx(-1.8) and scale.p90 == pytest.approx(1.8)


def test_fs_s_cam_sums_only_the_principal_features(images):
    served = calibrated_tiny()
    method = get_method("s_grad_cam")
    params = method.resolve_params({"principal_fraction": 0.25}, (3, 16, 16), "m")
    target = torch.tensor([1, 1])
    out = method.attribute(make_context(served), images, target, params)
    acts, grads = layer_activations_and_gradients(make_context(served), images, target)
    weighted = GradCam().channel_weights(acts, grads) * acts
    # importance column 1 is decreasing in the feature index: the top 25% are features 0, 1
    assert served.calibration.cams["grad_cam"].principal_features(1, 0.25).tolist() == [0, 1]
    cam = weighted[:, :2].sum(1, keepdim=True)
    expected = tanh_scale(upsample(cam, (16, 16)), -1.8, 1.8)
    torch.testing.assert_close(out, expected)


def test_principal_fraction_must_be_positive():
    with pytest.raises(InvalidArgument, match=r"m.principal_fraction: must be in \(0, 1\]"):
        get_method("s_grad_cam").resolve_params({"principal_fraction": 0.0}, (3, 16, 16), "m")


# ------------------------------------------------------------------------- the engine


def _request(*methods: MethodRequest, target: int | None = None) -> ExplainRequest:
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)).numpy()
    raw = RawTensor((3, 16, 16), image.astype("<f4").tobytes())
    return ExplainRequest(model="tiny", image=raw, methods=methods, target=target)


@pytest.mark.parametrize("name", S_METHODS)
def test_engine_refuses_s_cam_without_calibration(tmp_path, name):
    write_tiny_model_dir(tmp_path / "tiny")
    engine = Engine.from_model_store(tmp_path, EngineLimits())
    with pytest.raises(InvalidArgument) as caught:
        engine.explain(_request(MethodRequest("saliency"), MethodRequest(name, field="methods[1]")))
    assert caught.value.code == "INVALID_ARGUMENT"
    assert caught.value.field == "methods[1].method"
    assert str(caught.value) == (
        f"methods[1].method: {name} cannot run on model 'tiny': the model has no "
        "calibration: run `xaiserve calibrate --model tiny`"
    )
    info = engine.list_models()[0]
    assert not info.calibrated and name not in info.methods
    assert f"{name}: the model has no calibration: run `xaiserve calibrate --model tiny`" in (
        info.unsupported_methods
    )


def test_engine_serves_s_cam_once_calibrated(tmp_path):
    directory = write_tiny_model_dir(tmp_path / "tiny")
    save_calibration(directory, calibrate(load_model_dir(directory), _images(9)))
    engine = Engine.from_model_store(tmp_path, EngineLimits())
    assert engine.list_models()[0].calibrated
    assert set(S_METHODS) <= set(engine.list_models()[0].methods)
    result = engine.explain(
        _request(
            MethodRequest("s_grad_cam", stage="raw"),
            MethodRequest(
                "s_grad_cam", stage="raw", params={"principal_fraction": 0.25}, field="methods[1]"
            ),
            MethodRequest(
                "s_xgrad_cam", field="methods[2]", reliability=ReliabilityRequest(resolution=0.2)
            ),
        )
    )
    full, selected, scaled = result.explanations
    assert full.map.shape == (1, 16, 16) and full.map.min() > -1 and full.map.max() < 1
    assert not np.array_equal(full.map, selected.map)
    assert scaled.reliability is not None
