"""Visualization stages (seed 004, 4.2 / 4.4) on hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xaiserve.engine.postprocess import apply_stage, clamp_abs


def test_clamp_at_99th_percentile_like_numpy():
    a = torch.randn(1, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    bound = np.percentile(a.abs().numpy(), 99)
    got = clamp_abs(a)
    np.testing.assert_allclose(got.numpy(), np.minimum(a.abs().numpy(), bound), rtol=1e-6)


def _tiny() -> tuple[torch.Tensor, torch.Tensor]:
    """1 x 2 x 10 x 10: |a| = 0.1 everywhere (signs mixed) but four values, so the sorted
    200 values end 0.5, 1, 2, 10 and the 99th percentile (position 0.99 x 199 = 197.01) is
    1 + 0.01 x (2 - 1) = 1.01. The image is 1 on channel 0, 0.5 on channel 1."""
    a = torch.full((1, 2, 10, 10), 0.1)
    a[0, 1] = -0.1
    a[0, 0, 0, 0] = -10.0  # clamped to 1.01
    a[0, 0, 0, 1] = 2.0  # clamped to 1.01
    a[0, 1, 0, 1] = -1.0
    a[0, 1, 5, 5] = 0.5
    image = torch.ones(1, 2, 10, 10)
    image[0, 1] = 0.5
    return a, image


def test_three_channel_hand_computed():
    # c = min(|a|, 1.01): 1.01, 1.01, 1, 0.5 and 0.1 elsewhere; min-max over all of c
    a, image = _tiny()
    out = apply_stage(a, image, "three_channel")
    assert out.shape == (1, 2, 10, 10)
    expected = np.zeros((2, 10, 10))
    expected[0, 0, 0] = 1.0  # (1.01 - 0.1) / (1.01 - 0.1)
    expected[0, 0, 1] = 1.0
    expected[1, 0, 1] = 0.9 / 0.91  # (1 - 0.1) / 0.91 = 0.98901
    expected[1, 5, 5] = 0.4 / 0.91  # (0.5 - 0.1) / 0.91 = 0.43956
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-4)  # float32


def test_one_channel_hand_computed():
    # sum over channels of c: 1.11 at (0,0), 2.01 at (0,1), 0.6 at (5,5), 0.2 elsewhere
    a, image = _tiny()
    out = apply_stage(a, image, "one_channel")
    assert out.shape == (1, 1, 10, 10)
    expected = np.zeros((10, 10))
    expected[0, 0] = 0.91 / 1.81  # (1.11 - 0.2) / (2.01 - 0.2) = 0.50276
    expected[0, 1] = 1.0
    expected[5, 5] = 0.4 / 1.81  # 0.22099
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-4)  # float32


def test_times_image_hand_computed():
    # sum of c x image: 1.06 at (0,0), 1.51 at (0,1), 0.35 at (5,5), 0.15 elsewhere
    a, image = _tiny()
    out = apply_stage(a, image, "times_image")
    assert out.shape == (1, 1, 10, 10)
    expected = np.zeros((10, 10))
    expected[0, 0] = 0.91 / 1.36  # (1.06 - 0.15) / (1.51 - 0.15) = 0.66912
    expected[0, 1] = 1.0
    expected[5, 5] = 0.2 / 1.36  # 0.14706
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-4)  # float32


@pytest.mark.parametrize("stage", ["three_channel", "one_channel", "times_image"])
def test_stages_follow_the_reference_pipeline(stage):
    """The public reference code (danvalle/adversarial_metric, utils.visualization): abs,
    clamp at np.percentile(99), then channels kept / summed / times image and summed, then
    save_image(normalize=True), i.e. min-max; here without its 8-bit PNG rounding."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 3, 8, 8, generator=g)
    image = torch.rand(2, 3, 8, 8, generator=g)
    out = apply_stage(a, image, stage)
    for i in range(2):
        mag = np.abs(a[i].numpy())
        c = np.minimum(mag, np.percentile(mag, 99))
        if stage == "one_channel":
            c = c.sum(axis=0, keepdims=True)
        elif stage == "times_image":
            c = (c * image[i].numpy()).sum(axis=0, keepdims=True)
        reference = (c - c.min()) / (c.max() - c.min())
        np.testing.assert_allclose(out[i].numpy(), reference, atol=1e-6)


def test_maps_without_spread_become_zero_and_raw_is_untouched():
    for fill in (0.0, 0.3):
        flat = torch.full((1, 3, 4, 4), fill)
        for stage in ("three_channel", "one_channel", "times_image"):
            assert apply_stage(flat, torch.ones_like(flat), stage).abs().sum() == 0
    a = torch.randn(1, 3, 4, 4)
    assert torch.equal(apply_stage(a, torch.ones_like(a), "raw"), a)


def test_cam_maps_broadcast_over_image_channels():
    cam = torch.rand(2, 1, 4, 4)
    image = torch.rand(2, 3, 4, 4)
    assert apply_stage(cam, image, "times_image").shape == (2, 1, 4, 4)
    assert apply_stage(cam, image, "three_channel").shape == (2, 1, 4, 4)
