"""The client-facing side of the gateway: TLS, mutual TLS, bearer tokens, the in-flight
limit (over the fake engine, so for the local backend; the TorchServe tests repeat them)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support.certs import Pki, make_pki
from support.service_fakes import FakeEngine, Gate, Served
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.api.v1 import explain_pb2_grpc
from xaiserve.gateway import security
from xaiserve.gateway.client import XaiClient, tls_credentials

ServeFake = Callable[..., Served]
TOKEN = "s3cret-token-for-tests"


def _request() -> pb.ExplainRequest:
    return pb.ExplainRequest(model_name="demo", image=pb.Image(encoded=b"png"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# clients of the test\nold-token\n{TOKEN}\n")
    return path


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def test_tls_serves_clients_that_trust_its_ca(serve_fake: ServeFake, pki: Pki) -> None:
    served = serve_fake(tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key))
    target = f"127.0.0.1:{served.port}"
    with XaiClient(target, timeout=10, credentials=tls_credentials(pki.ca)) as client:
        assert client.explain(b"png", methods=("saliency",)).model_name == "demo"
    with XaiClient(target, timeout=5, credentials=tls_credentials(pki.other_ca)) as client:
        assert _code(lambda: client.list_models()) == grpc.StatusCode.UNAVAILABLE
    with XaiClient(target, timeout=5) as plaintext:
        assert _code(lambda: plaintext.list_models()) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate(serve_fake: ServeFake, pki: Pki) -> None:
    served = serve_fake(
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca),
    )
    target = f"127.0.0.1:{served.port}"
    with_cert = tls_credentials(pki.ca, pki.client_cert, pki.client_key)
    with XaiClient(target, timeout=10, credentials=with_cert) as client:
        assert [m.name for m in client.list_models().models] == ["demo", "zeta"]
    with XaiClient(target, timeout=5, credentials=tls_credentials(pki.ca)) as client:
        assert _code(lambda: client.list_models()) == grpc.StatusCode.UNAVAILABLE


def test_bearer_token_is_required_except_for_health(
    serve_fake: ServeFake, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    served = serve_fake(auth_token_file=str(token_file))
    target = f"127.0.0.1:{served.port}"
    with caplog.at_level(logging.DEBUG):
        with XaiClient(target, timeout=10) as anonymous:
            assert _code(lambda: anonymous.list_models()) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: anonymous.explain(b"png")) == grpc.StatusCode.UNAUTHENTICATED
        with XaiClient(target, timeout=10, token=TOKEN[:-1] + "X") as wrong:
            assert _code(lambda: wrong.explain(b"png")) == grpc.StatusCode.UNAUTHENTICATED
        with XaiClient(target, timeout=10, token=TOKEN) as client:
            assert client.explain(b"png").model_name == "demo"
            assert len(client.list_models().models) == 2
        with XaiClient(target, timeout=10, token="old-token") as client:  # every line counts
            assert client.explain(b"png").model_name == "demo"
        health = health_pb2_grpc.HealthStub(served.channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert len(served.engine.calls) == 2  # refused calls never reached the engine
    assert TOKEN not in caplog.text and TOKEN[:-1] not in caplog.text
    assert "missing or invalid bearer token" in caplog.text


def test_reflection_needs_the_token_too(serve_fake: ServeFake, token_file: Path) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    served = serve_fake(auth_token_file=str(token_file))
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")

    def call(metadata: tuple[tuple[str, str], ...] | None) -> list[str]:
        replies = stub.ServerReflectionInfo(iter([ask]), timeout=10, metadata=metadata)
        return [s.name for r in replies for s in r.list_services_response.service]

    assert _code(lambda: call(None)) == grpc.StatusCode.UNAUTHENTICATED
    assert "xaiserve.v1.ExplanationService" in call((("authorization", f"Bearer {TOKEN}"),))


def test_calls_beyond_the_in_flight_limit_are_refused_at_once(serve_fake: ServeFake) -> None:
    gate = Gate()
    served = serve_fake(FakeEngine(behaviour=gate), workers=4, max_in_flight=3)
    stub = explain_pb2_grpc.ExplanationServiceStub(served.channel)
    admitted = [stub.Explain.future(_request(), timeout=30) for _ in range(3)]
    try:
        assert gate.entered(3, timeout=10)
        started = time.monotonic()
        with ThreadPoolExecutor(5) as pool:
            codes = list(
                pool.map(lambda _: _code(lambda: stub.Explain(_request(), timeout=20)), range(5))
            )
        assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 5
        assert time.monotonic() - started < 5  # refused at once, not queued
    finally:
        gate.open()
    assert [f.result(20).model_name for f in admitted] == ["demo"] * 3
    assert stub.Explain(_request(), timeout=10).model_name == "demo"  # capacity is back


@pytest.mark.parametrize(
    ("cert", "key", "ca", "message"),
    [
        ("server.pem", "", "", "both a certificate file and a key file"),
        ("", "", "ca.pem", "client CA file needs a server certificate"),
        ("missing.pem", "server.key", "", "cannot read TLS certificate file"),
    ],
)
def test_unusable_tls_settings_are_refused(
    pki: Pki, cert: str, key: str, ca: str, message: str
) -> None:
    root = pki.ca.parent

    def path(name: str) -> str:
        return str(root / name) if name else ""

    with pytest.raises(security.SecurityConfigError, match=message):
        security.server_credentials(path(cert), path(key), path(ca))


def test_empty_token_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# nobody\n\n")
    with pytest.raises(security.SecurityConfigError, match="holds no token"):
        security.read_tokens(str(path))


def test_token_comparison_accepts_only_exact_bearer_tokens() -> None:
    auth = security.BearerTokenAuth([b"abc"])
    assert auth.accepts([("authorization", "Bearer abc")])
    assert auth.accepts([("authorization", "bearer abc")])
    assert not auth.accepts([("authorization", "Bearer abcd")])
    assert not auth.accepts([("authorization", "Basic abc")])
    assert not auth.accepts([("authorization", "Bearer ")])
    assert not auth.accepts([])
    assert "abc" not in repr(auth)
