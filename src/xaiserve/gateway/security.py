"""The client-facing security of the gateway: TLS and bearer-token authentication.

TLS: a server certificate and key (PEM) turn TLS on; a client CA file in addition makes
client certificates mandatory (mutual TLS). Bearer tokens: when a token file is configured,
every call (health checks excepted, so probes work unauthenticated) must carry
``authorization: Bearer <token>`` with one of the file's tokens, or it is refused with
UNAUTHENTICATED. Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import grpc

from xaiserve.gateway.admission import RejectHook, split_method

logger = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
_BEARER = "bearer "


class SecurityConfigError(ValueError):
    """A TLS or token setting cannot be used (missing file, half a key pair, ...)."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SecurityConfigError(f"cannot read {what} {path}: {error.strerror}") from None


def server_credentials(
    cert_file: str, key_file: str, client_ca_file: str = ""
) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files; None when no certificate is configured.

    Raises:
        SecurityConfigError: only one of certificate and key, a client CA without a
            certificate, or an unreadable file.
    """
    if not cert_file and not key_file:
        if client_ca_file:
            raise SecurityConfigError("a client CA file needs a server certificate and key")
        return None
    if not (cert_file and key_file):
        raise SecurityConfigError("TLS needs both a certificate file and a key file")
    pair = (_read(key_file, "TLS key file"), _read(cert_file, "TLS certificate file"))
    client_ca = _read(client_ca_file, "client CA file") if client_ca_file else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def read_tokens(path: str) -> list[bytes]:
    """The tokens of a token file: one per line, blank lines and ``#`` comments skipped.

    Raises:
        SecurityConfigError: the file cannot be read or holds no token.
    """
    lines = _read(path, "token file").decode("utf-8", errors="strict").splitlines()
    tokens = [line.strip().encode() for line in lines]
    tokens = [t for t in tokens if t and not t.startswith(b"#")]
    if not tokens:
        raise SecurityConfigError(f"token file {path} holds no token")
    return tokens


def _refusal(
    handler: grpc.RpcMethodHandler,
    code: grpc.StatusCode,
    message: str,
    on_refuse: Callable[[], None] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that aborts every call with ``code``.

    on_refuse: called as a call is refused (not when gRPC refused it earlier, reading an
        oversized message, and the handler never ran).
    """

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if on_refuse is not None:
            on_refuse()
        await context.abort(code, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid ``authorization: Bearer <token>`` (UNAUTHENTICATED).

    tokens: the accepted tokens.
    exempt: services callable without a token (health checks).
    on_reject: told of each refused call of a ``metered`` service (for metrics), as the
        refusal is sent.
    """

    def __init__(
        self,
        tokens: Sequence[bytes],
        exempt: Collection[str] = (HEALTH_SERVICE,),
        on_reject: RejectHook | None = None,
        metered: Collection[str] = (),
    ) -> None:
        if not tokens:
            raise ValueError("at least one token is needed")
        self._tokens = tuple(tokens)
        self._exempt = frozenset(exempt)
        self._on_reject = on_reject
        self._metered = frozenset(metered)

    def __repr__(self) -> str:
        return f"BearerTokenAuth({len(self._tokens)} tokens)"

    def accepts(self, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        """Whether ``metadata`` carries one of the tokens (constant time per token)."""
        given = b""
        for key, value in metadata or ():
            if key.lower() == "authorization":
                text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                if text[: len(_BEARER)].lower() == _BEARER:
                    given = text[len(_BEARER) :].strip().encode("latin-1", errors="replace")
                break
        matched = False
        for token in self._tokens:  # every token is compared, whichever matches
            matched |= hmac.compare_digest(given, token)
        return matched and bool(given)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service, rpc = split_method(handler_call_details.method)
        if handler is None or service in self._exempt:
            return handler
        if self.accepts(handler_call_details.invocation_metadata):
            return handler
        logger.info("refused %s: missing or invalid bearer token", handler_call_details.method)
        on_reject = self._on_reject
        count = None
        if on_reject is not None and service in self._metered:

            def count() -> None:
                on_reject(rpc, grpc.StatusCode.UNAUTHENTICATED.name)

        return _refusal(
            handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token", count
        )
