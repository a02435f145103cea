"""Visualization stages (seed 004, 4.2 / 4.4) on hand-computed values."""

from __future__ import annotations

import numpy as np
import torch

from xaiserve.engine.postprocess import apply_stage, clamp_abs


def test_clamp_at_99th_percentile_like_numpy():
    a = torch.randn(1, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    bound = np.percentile(a.abs().numpy(), 99)
    got = clamp_abs(a)
    np.testing.assert_allclose(got.numpy(), np.minimum(a.abs().numpy(), bound), rtol=1e-6)


def test_one_channel_hand_computed():
    # 100 values per channel: the 99th percentile of |a| over all 200 values is known
    a = torch.zeros(1, 2, 10, 10)
    a[0, 0, 0, 0] = -10.0  # outlier, clamped
    a[0, 0, 0, 1] = 2.0
    a[0, 1, 0, 1] = -1.0
    a[0, 1, 5, 5] = 0.5
    bound = float(np.percentile(a.abs().numpy(), 99))  # between 0.5 and 2.0 here
    out = apply_stage(a, torch.ones_like(a), "one_channel")
    assert out.shape == (1, 1, 10, 10)
    expected = np.zeros((10, 10))
    expected[0, 0] = min(10.0, bound)
    expected[0, 1] = min(2.0, bound) + min(1.0, bound)
    expected[5, 5] = min(0.5, bound)
    expected /= expected.max()
    np.testing.assert_allclose(out[0, 0].numpy(), expected, rtol=1e-5)


def test_times_image_weights_by_pixels():
    a = torch.ones(1, 3, 4, 4)
    image = torch.zeros(1, 3, 4, 4)
    image[0, :, 1, 2] = 0.5
    image[0, 0, 3, 3] = 1.0
    out = apply_stage(a, image, "times_image")[0, 0]
    assert out[1, 2] == 1.0  # 1.5 / 1.5
    assert abs(out[3, 3].item() - 1.0 / 1.5) < 1e-6
    assert abs(out.sum().item() - (1.0 + 1.0 / 1.5)) < 1e-6  # nothing else lit


def test_zero_map_stays_zero_and_raw_is_untouched():
    zero = torch.zeros(1, 3, 4, 4)
    assert apply_stage(zero, torch.ones_like(zero), "one_channel").abs().sum() == 0
    a = torch.randn(1, 3, 4, 4)
    assert torch.equal(apply_stage(a, torch.ones_like(a), "raw"), a)


def test_cam_maps_broadcast_over_image_channels():
    cam = torch.rand(2, 1, 4, 4)
    image = torch.rand(2, 3, 4, 4)
    assert apply_stage(cam, image, "times_image").shape == (2, 1, 4, 4)
