"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The trained demo model directory, built once per machine into var/test-cache/demo."""
    from xaiserve.model_store.build_demo import ensure_demo_model

    return ensure_demo_model(REPO_ROOT / "var" / "test-cache" / "demo")
