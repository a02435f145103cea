"""A small synchronous Python client of the explanation service.

>>> with XaiClient("127.0.0.1:50051") as client:                      # doctest: +SKIP
...     response = client.explain(Path("cat.png").read_bytes(), methods=("saliency", "grad_cam"))
...     saliency = map_to_array(response.explanations[0].map)        # 1 x H x W float32

Errors from the server arrive as ``grpc.RpcError`` (``.code()``, ``.details()``); mistakes
the client can see itself (unknown method names, parameters) raise ``ValueError``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from xaiserve.api import catalog
from xaiserve.api.v1 import explain_pb2 as pb
from xaiserve.api.v1 import explain_pb2_grpc

#: The largest value of a proto int32 field (target, top_k).
INT32_MAX = 2**31 - 1
#: Registry names of the methods the API knows, in enum order.
METHODS: tuple[str, ...] = catalog.METHODS
#: Map stages by name.
STAGES: dict[str, pb.MapStage] = {
    "raw": pb.RAW,
    "three_channel": pb.THREE_CHANNEL,
    "one_channel": pb.ONE_CHANNEL,
    "times_image": pb.TIMES_IMAGE,
}
#: The oneof field of ``MethodRequest.params`` of each method that takes parameters.
PARAMS_FIELDS: frozenset[str] = frozenset(
    f.name for f in pb.MethodRequest.DESCRIPTOR.oneofs_by_name["params"].fields
)

ImageInput = bytes | np.ndarray | str | os.PathLike[str]


def method_value(name: str) -> pb.Method:
    """The ``Method`` enum value of a registry name (``"grad_cam"`` -> ``GRAD_CAM``).

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return catalog.METHOD_VALUES[name]


def map_to_array(attribution: pb.AttributionMap) -> np.ndarray:
    """The float32 array (its ``shape``, e.g. 1 x H x W) of an ``AttributionMap``.

    Raises:
        ValueError: the map carries no float data (only a PNG was asked for).
    """
    if not attribution.data:
        raise ValueError("the map has no float32 data (ask for FLOAT32 or FLOAT32_AND_PNG)")
    return np.frombuffer(attribution.data, dtype="<f4").reshape(tuple(attribution.shape)).copy()


def image_to_proto(image: ImageInput) -> pb.Image:
    """Encoded bytes, a file path, or a float32 pixel-space array (C x H x W, H x W, ...)."""
    if isinstance(image, bytes):
        return pb.Image(encoded=image)
    if isinstance(image, np.ndarray):
        data = np.ascontiguousarray(image, dtype="<f4").tobytes()
        return pb.Image(tensor=pb.Tensor(shape=list(image.shape), data=data))
    if isinstance(image, (str, os.PathLike)):
        return pb.Image(encoded=Path(image).read_bytes())
    raise TypeError(f"image must be bytes, a path or a numpy array, not {type(image).__name__}")


def fill_message(message: Message, values: Mapping[str, Any], what: str) -> None:
    """Sets fields of ``message`` from a dict, by proto field name.

    Sub-messages take dicts, repeated fields sequences (or one value), enum fields their
    value or its name in any case (``"alpha_beta"``, ``"grad_cam"``).

    Raises:
        ValueError: an unknown field or enum name, or a value of the wrong type; the message
            names it as ``what.field``.
    """
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in values.items():
        where = f"{what}.{key}"
        field = fields.get(key)
        if field is None:
            valid = ", ".join(sorted(fields))
            raise ValueError(f"{what}: unknown field {key!r}; choose from {valid}")
        try:
            if field.is_repeated:
                if isinstance(value, Mapping):
                    raise ValueError(f"{where}: expected a list")
                if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                    value = [value]  # one element
                getattr(message, key).extend(_enum_number(field, v, where) for v in value)
            elif field.message_type is not None:
                if not isinstance(value, Mapping):
                    kind = field.message_type.name
                    raise ValueError(f"{where}: expected a dict of {kind} fields")
                child = getattr(message, key)
                child.SetInParent()
                fill_message(child, value, where)
            else:
                setattr(message, key, _enum_number(field, value, where))
        except TypeError as error:
            raise ValueError(f"{where}: {error}") from None


def _enum_number(field: FieldDescriptor, value: Any, where: str) -> Any:
    """An enum name (any case) as its number; other values unchanged."""
    if field.enum_type is None or not isinstance(value, str):
        return value
    enum_value = field.enum_type.values_by_name.get(value.upper())
    if enum_value is None or enum_value.number == 0:
        names = [v.name.lower() for v in field.enum_type.values if v.number != 0]
        raise ValueError(f"{where}: unknown value {value!r}; choose from {', '.join(names)}")
    return enum_value.number


def _method_request(
    name: str,
    stage: str,
    params: Mapping[str, Any] | None,
    reliability: bool | Mapping[str, Any],
    filter: bool | Mapping[str, Any],
) -> pb.MethodRequest:
    message = pb.MethodRequest(method=method_value(name), stage=STAGES[stage])
    if params:
        if name not in PARAMS_FIELDS:
            raise ValueError(f"method {name!r} takes no parameters")
        fill_message(getattr(message, name), params, f"params[{name!r}]")
    if reliability:
        message.reliability.enabled = True
        if isinstance(reliability, Mapping):
            fill_message(message.reliability, reliability, "reliability")
    if filter:
        message.filter.enabled = True
        if isinstance(filter, Mapping):
            fill_message(message.filter, filter, "filter")
    return message


def build_request(
    image: ImageInput,
    model: str = "demo",
    methods: Iterable[str] = ("saliency",),
    target: int | None = None,
    top_k: int | None = None,
    stage: str = "one_channel",
    png: bool = False,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    reliability: bool | Mapping[str, Any] = False,
    filter: bool | Mapping[str, Any] = False,
    version: str = "",
) -> pb.ExplainRequest:
    """The ``ExplainRequest`` that :meth:`XaiClient.explain` sends (see there)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    names = list(methods)
    params = dict(params or {})
    for name in params:
        if name not in names:
            raise ValueError(f"params given for {name!r}, which is not among the methods {names}")
    request = pb.ExplainRequest(
        model_name=model,
        model_version=version,
        image=image_to_proto(image),
        methods=[
            _method_request(name, stage, params.get(name), reliability, filter) for name in names
        ],
        map_encoding=pb.FLOAT32_AND_PNG if png else pb.FLOAT32,
    )
    for name, value, least in (("target", target, 0), ("top_k", top_k, 1)):
        if value is not None and not least <= value <= INT32_MAX:
            raise ValueError(f"{name} must be in {least}..{INT32_MAX}, got {value}")
    if target is not None:
        request.target = target
    if top_k is not None:
        request.top_k = top_k
    return request


def tls_credentials(
    ca_file: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials from PEM files: the CA that signed the server's certificate (default:
    the system's roots) and, for servers that require one, the client's certificate and key."""

    def read(path: str | os.PathLike[str] | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca_file),
        private_key=read(key_file),
        certificate_chain=read(cert_file),
    )


class XaiClient:
    """Blocking client over one channel; use it as a context manager or call :meth:`close`.

    target: ``host:port`` of the server.
    timeout: deadline of each call, in seconds (``None``: the server's default applies).
    max_message_bytes: largest response accepted (maps with PNGs add up).
    credentials: TLS credentials (see :func:`tls_credentials`); ``None``: plaintext.
    token: bearer token sent with every call, for a server that requires one.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        timeout: float | None = 60.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._stub = explain_pb2_grpc.ExplanationServiceStub(self._channel)

    def explain(
        self,
        image: ImageInput,
        model: str = "demo",
        methods: Iterable[str] = ("saliency",),
        target: int | None = None,
        top_k: int | None = None,
        stage: str = "one_channel",
        png: bool = False,
        params: Mapping[str, Mapping[str, Any]] | None = None,
        reliability: bool | Mapping[str, Any] = False,
        filter: bool | Mapping[str, Any] = False,
        version: str = "",
    ) -> pb.ExplainResponse:
        """Predicts and explains one image.

        image: encoded PNG/JPEG/WebP bytes, a path to such a file, or a float32 array in
            pixel space [0, 1] (C x H x W, 1 x C x H x W or H x W).
        methods: registry names (:data:`METHODS`: "saliency", "grad_cam", "occlusion", ...),
            answered in this order.
        target: class to explain (default: the predicted class).
        stage: "raw", "three_channel", "one_channel" or "times_image", for every map.
        png: also return PNG overlays (FLOAT32_AND_PNG); float32 data always comes back.
        params: per-method parameters by proto field name, e.g.
            ``{"occlusion": {"window": 16, "adaptive": {"enabled": True}}}``,
            ``{"lrp": {"rule": "alpha_beta"}}``, ``{"auto": {"candidates": ["saliency"]}}``.
        reliability: True, or ReliabilityOptions fields (``{"eps_max": 50.0}``), for an APEM
            record of each map.
        filter: True, or FilterOptions fields (``{"mode": "exact"}``), for filtered maps.

        Raises:
            ValueError: an unknown method, stage or parameter name.
            grpc.RpcError: the server's error status.
        """
        request = build_request(
            image, model, methods, target, top_k, stage, png, params, reliability, filter, version
        )
        return self._stub.Explain(request, timeout=self.timeout, metadata=self._metadata)

    def list_models(self) -> pb.ListModelsResponse:
        """The served models."""
        return self._stub.ListModels(
            pb.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata
        )

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def __enter__(self) -> XaiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# ----------------------------------------------------- the command line's connection
# --server, --timeout, the bearer token (--token, XAISERVE_TOKEN, --token-file) and TLS
# (--tls, --tls-ca, --tls-cert, --tls-key), shared by `xaiserve models` and `explain`.

DEFAULT_SERVER = "127.0.0.1:50051"


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """--server, --timeout, and the token and TLS options of :func:`connect`."""
    parser.add_argument(
        "--server",
        default=os.environ.get("XAISERVE_SERVER", DEFAULT_SERVER),
        metavar="HOST:PORT",
        help=f"server address (env XAISERVE_SERVER; default {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, metavar="S", help="deadline in seconds (120)"
    )
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument(
        "--token",
        default=os.environ.get("XAISERVE_TOKEN"),
        help="bearer token (env XAISERVE_TOKEN)",
    )
    auth.add_argument("--token-file", type=Path, help="file whose first line is the bearer token")
    parser.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the system's CAs"
    )
    parser.add_argument("--tls-ca", type=Path, help="PEM CA of the server's certificate (TLS)")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert (mutual TLS)")


class ClientSetupError(ValueError):
    """A token or TLS file the command line names cannot be used."""


def connect(args: argparse.Namespace) -> XaiClient:
    """The client of ``--server`` with the token and TLS options.

    Raises:
        ClientSetupError: a named file cannot be read, or --tls-cert comes without
            --tls-key (or the reverse).
    """
    token = args.token
    if args.token_file is not None:
        try:
            lines = args.token_file.read_text().split()
        except OSError as error:
            raise ClientSetupError(f"--token-file {args.token_file}: {error.strerror}") from None
        if not lines:
            raise ClientSetupError(f"--token-file {args.token_file}: empty")
        token = lines[0]
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ClientSetupError("--tls-cert and --tls-key go together (mutual TLS)")
    credentials = None
    if args.tls or args.tls_ca or args.tls_cert:
        for flag, path in (
            ("--tls-ca", args.tls_ca),
            ("--tls-cert", args.tls_cert),
            ("--tls-key", args.tls_key),
        ):
            if path is not None and not path.is_file():
                raise ClientSetupError(f"{flag} {path}: no such file")
        credentials = tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    return XaiClient(args.server, timeout=args.timeout, credentials=credentials, token=token)
