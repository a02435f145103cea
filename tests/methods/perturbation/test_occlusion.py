"""``methods.perturbation.occlusion``: the module's helpers against direct computation."""

from __future__ import annotations

import itertools

import pytest
import torch

from xaiserve.methods.perturbation.occlusion import windows_that_change


@pytest.mark.parametrize("shape,window", [((3, 20, 17), 4), ((2, 9), 3), ((1, 6, 7, 5), 2)])
def test_windows_that_change_nothing_are_found_by_summed_areas(shape, window):
    """windows_that_change (a summed-area table) against looking at every window, in 1 to 3
    spatial dimensions: an occluded window changes the image unless all its values already equal
    the baseline."""
    generator = torch.Generator().manual_seed(len(shape))
    x = torch.full(shape, 0.5)
    spots = torch.randperm(x.numel(), generator=generator)[: max(2, x.numel() // 60)]
    x.view(-1)[spots] = 0.8
    corners = list(itertools.product(*[range(n - window + 1) for n in shape[1:]]))
    expected = [
        not bool((x[(slice(None), *[slice(c, c + window) for c in corner])] == 0.5).all())
        for corner in corners
    ]
    got = windows_that_change(x, corners, window, 0.5).tolist()
    assert got == expected and 0 < sum(expected) < len(expected)
