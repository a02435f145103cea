"""Test doubles for the gateway: a fake engine and a server running on a background loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np

from xaiserve.api.types import (
    ClassScore,
    ExplainRequest,
    ExplainResult,
    Explanation,
    ModelInfo,
    Prediction,
)
from xaiserve.api.v1 import explain_pb2_grpc

T = TypeVar("T")

LABELS = ("circle", "square", "triangle")
FAKE_PNG = b"\x89PNG\r\n\x1a\nfake"
MODELS = [
    ModelInfo(
        name="zeta",
        version="2",
        input_shape=(1, 8, 8),
        labels=("a", "b"),
        methods=("saliency", "occlusion", "quantum_cam"),
        onnx_status="check failed: max |logit difference| 1.2e-03 > tolerance 0.0001",
    ),
    ModelInfo(
        name="demo",
        version="1",
        input_shape=(3, 4, 4),
        labels=LABELS,
        methods=("saliency", "grad_cam", "occlusion"),
        cam_layer="features.3",
        forward_backend="onnxruntime",
        onnx_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
        unsupported_methods=("s_grad_cam: needs a calibration (xaiserve calibrate)",),
        device="cuda:1",
    ),
]


def fake_map(index: int, stage: str) -> np.ndarray:
    """The map the fake engine returns for the index-th method: distinct, known values."""
    channels = 3 if stage == "raw" else 1
    return (np.arange(channels * 16, dtype=np.float32).reshape(channels, 4, 4) + index) / 10


@dataclass
class FakeEngine:
    """Stands in for ``xaiserve.engine.engine.Engine``.

    ``behaviour(request, deadline)`` runs first on every call; it may sleep, wait or raise.
    """

    behaviour: Callable[[ExplainRequest, float | None], None] | None = None
    calls: list[tuple[ExplainRequest, float | None]] = field(default_factory=list)

    def explain(self, request: ExplainRequest, deadline: float | None = None) -> ExplainResult:
        self.calls.append((request, deadline))
        if self.behaviour is not None:
            self.behaviour(request, deadline)
        score = ClassScore(index=1, label=LABELS[1], probability=0.75, logit=2.5)
        target = (
            score
            if request.target is None
            else ClassScore(
                index=request.target, label=LABELS[request.target], probability=0.2, logit=0.5
            )
        )
        explanations = tuple(
            Explanation(
                method=m.name,
                stage=m.stage,
                map=fake_map(i, m.stage),
                forward_passes=i + 1,
                timings={"attribute": 0.01 * (i + 1)},
                png=FAKE_PNG if request.want_png else None,
            )
            for i, m in enumerate(request.methods)
        )
        return ExplainResult(
            model=request.model,
            version="1",
            prediction=Prediction(top_k=(score,), target=target),
            explanations=explanations,
            timings={"decode": 0.001, "predict": 0.002, "total": 0.05},
            device_calls=1.5,
        )

    def list_models(self) -> list[ModelInfo]:
        return list(MODELS)


def sleep_for(seconds: float) -> Callable[[ExplainRequest, float | None], None]:
    """A behaviour that keeps the engine busy."""

    def behaviour(request: ExplainRequest, deadline: float | None) -> None:
        time.sleep(seconds)

    return behaviour


def raise_error(error: Exception) -> Callable[[ExplainRequest, float | None], None]:
    """A behaviour that raises ``error``."""

    def behaviour(request: ExplainRequest, deadline: float | None) -> None:
        raise error

    return behaviour


class Gate:
    """A behaviour that holds every call until :meth:`open` (or ``hold_seconds``), and
    counts the calls that arrived, for tests of in-flight limits."""

    def __init__(self, hold_seconds: float = 20.0) -> None:
        self.hold_seconds = hold_seconds
        self.arrived = threading.Semaphore(0)
        self.released = threading.Event()

    def __call__(self, request: ExplainRequest, deadline: float | None) -> None:
        self.arrived.release()
        self.released.wait(self.hold_seconds)

    def entered(self, calls: int = 1, timeout: float = 10.0) -> bool:
        """Whether ``calls`` more calls arrived, each within ``timeout`` seconds."""
        return all(self.arrived.acquire(timeout=timeout) for _ in range(calls))

    def open(self) -> None:
        """Lets the held calls, and every later one, finish."""
        self.released.set()


class LoopThread:
    """An asyncio loop in a daemon thread, for grpc.aio servers under synchronous tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="aio-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Runs ``coroutine`` on the loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class Served:
    """A running test server and a synchronous channel to it."""

    engine: FakeEngine
    port: int
    channel: grpc.Channel

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def stub(self) -> explain_pb2_grpc.ExplanationServiceStub:
        return explain_pb2_grpc.ExplanationServiceStub(self.channel)
