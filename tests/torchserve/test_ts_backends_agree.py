"""The same request through the local and the torchserve backends: same prediction, same
maps, same ListModels."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from support.demo_images import demo_png, demo_tensor
from support.gateway import open_channel
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.api.v1 import explain_pb2_grpc
from xaiserve.gateway.backends import LocalBackend
from xaiserve.gateway.client import XaiClient, map_to_array

pytestmark = pytest.mark.torchserve


def _requests() -> list[pb.ExplainRequest]:
    return [
        pb.ExplainRequest(
            model_name="demo",
            image=pb.Image(encoded=demo_png(1)),
            methods=[
                pb.MethodRequest(method=pb.SALIENCY),
                pb.MethodRequest(method=pb.GRAD_CAM, stage=pb.RAW),
                pb.MethodRequest(
                    method=pb.OCCLUSION, occlusion=pb.OcclusionParams(window=8, stride=8)
                ),
                pb.MethodRequest(
                    method=pb.INTEGRATED_GRADIENTS,
                    stage=pb.TIMES_IMAGE,
                    integrated_gradients=pb.IntegratedGradientsParams(steps=16),
                ),
            ],
            map_encoding=pb.FLOAT32_AND_PNG,
        ),
        pb.ExplainRequest(
            model_name="demo",
            image=demo_tensor(6),
            target=3,
            top_k=2,
            methods=[
                pb.MethodRequest(
                    method=pb.SMOOTHGRAD,
                    stage=pb.RAW,
                    smoothgrad=pb.SmoothGradParams(samples=4, seed=1),
                )
            ],
        ),
    ]


def test_local_and_torchserve_answer_the_same(
    torchserve, start_gateway: Callable, local_backend: LocalBackend
) -> None:
    local = start_gateway(local_backend)
    remote = start_gateway(torchserve.backend())
    with (
        XaiClient(local.target, timeout=60) as a,
        XaiClient(remote.target, timeout=60) as b,
        open_channel(local.target) as to_local,
        open_channel(remote.target) as to_remote,
    ):
        stubs = [explain_pb2_grpc.ExplanationServiceStub(c) for c in (to_local, to_remote)]
        for request in _requests():
            mine, theirs = (stub.Explain(request, timeout=60) for stub in stubs)
            assert mine.prediction == theirs.prediction
            assert (mine.model_name, mine.model_version) == (theirs.model_name, "1")
            assert dict(mine.forward_passes) == dict(theirs.forward_passes)
            assert len(mine.explanations) == len(request.methods) == len(theirs.explanations)
            for x, y in zip(mine.explanations, theirs.explanations, strict=True):
                assert (x.method, x.stage, list(x.map.shape)) == (
                    y.method,
                    y.stage,
                    list(y.map.shape),
                )
                difference = np.abs(map_to_array(x.map) - map_to_array(y.map)).max()
                assert difference <= 1e-5
                assert x.map.png_overlay == y.map.png_overlay
                assert x.forward_passes == y.forward_passes
        local_models = a.list_models()
        remote_models = b.list_models()
    assert [m.name for m in remote_models.models] == ["demo", "tiny"]
    assert local_models.models[0] == remote_models.models[0]  # demo, described alike
