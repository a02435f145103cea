"""APEM's map parts (seed 004, chapter 3): relevance from a map and the directed map."""

from __future__ import annotations

import pytest
import torch

from xaiserve.reliability.score import directed, relevance_from_map


def test_relevance_from_map_scales_magnitude():
    raw = torch.tensor([[[-2.0, 1.0], [0.5, 0.0]], [[0.0, 4.0], [-1.0, 2.0]]])
    got = relevance_from_map(raw)
    assert torch.equal(got, raw.abs() / 4.0)
    unit = torch.tensor([[[0.0, 0.25], [1.0, 0.5]]])
    assert torch.equal(relevance_from_map(unit), unit)
    assert torch.equal(relevance_from_map(torch.zeros(1, 2, 2)), torch.zeros(1, 2, 2))


def test_directed_is_l1_normalized_over_the_broadcast():
    relevance = torch.tensor([[[0.0, 0.5], [1.0, 0.5]]])  # 1 x 2 x 2
    sign = torch.tensor([1.0, -1.0, 1.0]).view(3, 1, 1).expand(3, 2, 2)
    d = directed(relevance, sign)
    assert d.shape == (3, 2, 2)
    assert d.abs().sum().item() == pytest.approx(1.0)
    assert torch.allclose(d, relevance / (3 * 2.0) * sign)
    assert directed(torch.zeros(1, 2, 2), sign) is None
