"""Fixtures of the engine tests."""

from __future__ import annotations

import pytest
import torch

from support.tiny_models import tiny_served
from xaiserve.runtime.model import ServedModel


@pytest.fixture
def served() -> ServedModel:
    return tiny_served()


@pytest.fixture
def images() -> torch.Tensor:
    """Two pixel-space images, 2 x 3 x 16 x 16 in [0, 1]."""
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
