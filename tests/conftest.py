"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread in the test process: the models under test are small, and on a
    shared 2-core machine two threads per process ran the method tests several times
    slower than one."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The trained demo model directory, built once per machine into var/test-cache/demo."""
    from xaiserve.model_store.build_demo import ensure_demo_model

    return ensure_demo_model(REPO_ROOT / "var" / "test-cache" / "demo")
