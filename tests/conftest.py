"""Fixtures shared by every test package."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from support.service_fakes import LoopThread
from support.tiny_models import tiny_served
from xaiserve.runtime.model import ServedModel

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


@pytest.fixture(scope="session")
def aio_loop() -> Iterator[LoopThread]:
    """An asyncio loop in a daemon thread, for grpc.aio servers under synchronous tests."""
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture
def served() -> ServedModel:
    return tiny_served()


@pytest.fixture
def images() -> torch.Tensor:
    """Two pixel-space images, 2 x 3 x 16 x 16 in [0, 1]."""
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """The server and the TorchServe handler set torch's threads when they start (to the
    usable CPUs); tests that start them in this process get the test process's one back."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
