"""Requests on one model at once: every method, from several threads, gives the map and
the forward-pass counts of its single call (issue 22, item 2)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from support.tiny_models import write_tiny_model_dir
from xaiserve.api.types import ExplainRequest, MethodRequest, RawTensor, ReliabilityRequest
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits

THREADS = 8
IMAGES = 3
TOLERANCE = 1e-5  # packed rows may sum in another order


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    root: Path = tmp_path_factory.mktemp("store")
    write_tiny_model_dir(root / "tiny")
    limits = EngineLimits(max_image_pixels=64 * 64, max_methods=4)
    return Engine.from_model_store(root, limits)


def image(seed: int) -> RawTensor:
    rng = np.random.default_rng(seed)
    return RawTensor((1, 3, 16, 16), rng.random((1, 3, 16, 16), dtype=np.float32).tobytes())


def requests(engine: Engine) -> list[ExplainRequest]:
    """One request per method the tiny model supports and image; one more with APEM."""
    (info,) = engine.list_models()
    out = [
        ExplainRequest(
            model="tiny",
            image=image(seed),
            methods=(MethodRequest(name, params_field=name),),
            want_png=False,
        )
        for name in info.methods
        if name != "auto"
        for seed in range(IMAGES)
    ]
    apem = MethodRequest("saliency", reliability=ReliabilityRequest(), params_field="saliency")
    out += [ExplainRequest("tiny", image(9), (apem,), want_png=False)]
    return out


def test_every_method_at_once_equals_its_single_call(engine):
    todo = requests(engine)
    assert len({r.methods[0].name for r in todo}) >= 15  # the tiny model serves most methods
    alone = [engine.explain(r) for r in todo]
    start = threading.Barrier(THREADS)

    def run(r: ExplainRequest):
        return engine.explain(r)

    def first(r: ExplainRequest):
        start.wait()
        return engine.explain(r)

    calls_before = sum(engine.executors["tiny"].counts.calls.values())
    with ThreadPoolExecutor(THREADS) as pool:
        heads = [pool.submit(first, r) for r in todo[:THREADS]]
        rest = [pool.submit(run, r) for r in todo[THREADS:] * 2]
        together = [f.result() for f in heads + rest]
    calls = sum(engine.executors["tiny"].counts.calls.values()) - calls_before

    for want, got in zip(alone + alone[THREADS:], together, strict=True):
        name = want.explanations[0].method
        assert got.forward_passes == want.forward_passes, name
        assert got.prediction == want.prediction, name
        for a, b in zip(want.explanations, got.explanations, strict=True):
            np.testing.assert_allclose(b.map, a.map, rtol=TOLERANCE, atol=TOLERANCE, err_msg=name)
            assert (a.reliability is None) == (b.reliability is None), name
            if a.reliability is not None and b.reliability is not None:
                assert b.reliability.apem == pytest.approx(a.reliability.apem), name
    shares = sum(r.device_calls for r in together)
    assert shares == pytest.approx(calls)  # every call's 1/k shares add up to one
    assert all(r.device_calls > 0 for r in together)
