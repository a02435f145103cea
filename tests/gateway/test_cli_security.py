"""``xaiserve models`` and ``explain`` against a server that wants mutual TLS and a token:
the command line's --tls-ca/--tls-cert/--tls-key and --token/--token-file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from support.certs import Pki, make_pki
from support.service_fakes import FAKE_PNG, Served
from xaiserve import cli

ServeFake = Callable[..., Served]
TOKEN = "cli-test-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("cli-pki"))


@pytest.fixture
def secured(serve_fake: ServeFake, pki: Pki, tmp_path: Path) -> str:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    served = serve_fake(
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca),
        auth_token_file=str(tokens),
    )
    return f"localhost:{served.port}"


def _tls(pki: Pki) -> list[str]:
    return [
        *("--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert)),
        *("--tls-key", str(pki.client_key), "--timeout", "10"),
    ]


def test_models_and_explain_with_mutual_tls_and_a_token(
    secured: str, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    assert cli.main(["models", "--server", secured, *_tls(pki), "--token", TOKEN]) == 0
    assert "demo" in capsys.readouterr().out

    image = tmp_path / "x.png"
    image.write_bytes(FAKE_PNG)
    explain = ["explain", str(image), "--methods", "saliency", "--out", str(tmp_path / "out")]
    assert (
        cli.main([*explain, "--server", secured, *_tls(pki), "--token-file", str(token_file)]) == 0
    )
    assert (tmp_path / "out" / "x.json").is_file()


def test_a_missing_token_or_certificate_is_refused_by_the_server(
    secured: str, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["models", "--server", secured, *_tls(pki)]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    no_client_cert = ["--tls-ca", str(pki.ca), "--timeout", "5", "--token", TOKEN]
    assert cli.main(["models", "--server", secured, *no_client_cert]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-ca", "nowhere.pem"], "--tls-ca nowhere.pem: no such file"),
        (["--token-file", "nowhere"], "--token-file nowhere: No such file or directory"),
    ],
)
def test_unusable_client_options_are_usage_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["models", "--server", "127.0.0.1:1", *flags]) == 2
    assert message in capsys.readouterr().err
