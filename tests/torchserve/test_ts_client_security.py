"""The client-facing side of a gateway over TorchServe: TLS with a generated certificate,
the bearer token, the in-flight limit."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from support.certs import make_pki
from support.demo_images import demo_png
from support.gateway import open_channel
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.api.v1 import explain_pb2_grpc
from xaiserve.gateway.client import XaiClient, tls_credentials

pytestmark = pytest.mark.torchserve
TOKEN = "token-of-the-torchserve-tests"


def test_tls_token_and_in_flight_limit(torchserve, start_gateway: Callable, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    gateway = start_gateway(
        torchserve.backend(),
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        auth_token_file=str(tokens),
        max_in_flight=2,
    )
    credentials = tls_credentials(pki.ca)

    with XaiClient(gateway.target, timeout=60, credentials=credentials) as anonymous:
        with pytest.raises(grpc.RpcError) as caught:
            anonymous.explain(demo_png(0))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    with (
        XaiClient(gateway.target, timeout=120, credentials=credentials, token=TOKEN) as client,
        open_channel(gateway.target, credentials) as channel,
    ):
        assert client.explain(demo_png(0), methods=("grad_cam",)).model_name == "demo"
        assert [m.name for m in client.list_models().models] == ["demo", "tiny"]

        # admitted calls must still run when the extra ones arrive 0.5 s later, on a fast or a
        # loaded machine: one call repeats a measured piece of work to last >= 1.5 s. The
        # piece is timed on its second run (the first also plans incremental occlusion),
        # and each repeat has its own baseline (the engine computes identical ones once)
        def occlusion(i: int) -> pb.MethodRequest:
            params = pb.OcclusionParams(window=4, stride=2, baseline=0.5 + 0.01 * i)
            return pb.MethodRequest(method=pb.OCCLUSION, occlusion=params)

        piece = pb.ExplainRequest(
            model_name="demo", image=pb.Image(encoded=demo_png(1)), methods=[occlusion(0)]
        )
        stub = explain_pb2_grpc.ExplanationServiceStub(channel)
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        stub.Explain(piece, timeout=120, metadata=metadata)
        started = time.monotonic()
        stub.Explain(piece, timeout=120, metadata=metadata)
        repeats = min(16, math.ceil(1.5 / (time.monotonic() - started)))
        slow = pb.ExplainRequest(
            model_name="demo",
            image=pb.Image(encoded=demo_png(1)),
            methods=[occlusion(i) for i in range(repeats)],
        )

        def admitted(_: int) -> pb.ExplainResponse:
            return stub.Explain(slow, timeout=300, metadata=metadata)

        def extra(_: int) -> tuple[grpc.StatusCode, float]:
            started = time.monotonic()
            try:
                client.explain(demo_png(2), methods=("saliency",))
                return grpc.StatusCode.OK, time.monotonic() - started
            except grpc.RpcError as error:
                return error.code(), time.monotonic() - started

        with ThreadPoolExecutor(2) as first, ThreadPoolExecutor(4) as second:
            running = [first.submit(admitted, i) for i in range(2)]
            time.sleep(0.5)  # both are in flight now (each lasts >= 1.5 s)
            refused = list(second.map(extra, range(4)))
            answers = [future.result(300) for future in running]
        assert [code for code, _ in refused] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4
        assert max(seconds for _, seconds in refused) < 2
        assert [len(a.explanations) for a in answers] == [repeats, repeats]
        assert client.explain(demo_png(3), methods=("saliency",)).model_name == "demo"
