"""Server configuration: one frozen :class:`Settings`, parsed in ``main()``.

Every setting is a command-line flag with an ``XAISERVE_*`` environment variable as its
fallback (flag > environment > default), so the same image runs from a shell, a Makefile
or a Kubernetes manifest. ``xaiserve-server --help`` lists them all.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from xaiserve.engine.limits import EngineLimits
from xaiserve.runtime.forward.config import BACKENDS as FORWARD_BACKENDS
from xaiserve.runtime.forward.config import CONCURRENCY, SERIAL, ForwardConfig, device_spec

ENV_PREFIX = "XAISERVE_"
#: Backends that can be selected.
BACKENDS = ("local", "torchserve")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_MIB = 1024 * 1024
_LIMIT_DEFAULTS = EngineLimits()
_FORWARD_DEFAULTS = ForwardConfig()


@dataclass(frozen=True)
class Settings:
    """Everything the server is configured with.

    host: address to listen on. The default, 127.0.0.1, only accepts local clients (a safe
        developer default); use ``0.0.0.0`` or ``[::]`` in a container.
    port: port to listen on; 0 picks a free one (it is logged).
    processes, reuse_port: server processes sharing the port, and whether this one shares
        it (``SO_REUSEPORT``; set for the children): see :mod:`xaiserve.gateway.processes`.
    metrics_port: port of the Prometheus ``/metrics`` endpoint (HTTP, on ``host``); 0 turns
        it off. The default, 9464, stays clear of Prometheus (9090), the Pushgateway (9091),
        node exporters (9100) and TorchServe (8080-8082, 7070-7071).
    model_store: directory with one sub-directory per model (each with a ``config.yaml``);
        for the torchserve backend, TorchServe's model store (``.mar`` archives), whose
        model names ListModels reports unless ``torchserve_models`` names them.
    build_demo: build the demo model into ``<model_store>/demo`` first if it is missing.
    backend: where requests go: ``local`` (the engine in this process) or ``torchserve``
        (TorchServe's gRPC inference API, see ``xaiserve.gateway.torchserve_backend``).
    workers: requests the local backend runs at once (threads); their device work shares
        each model's calls (the executor), so more requests in flight pack fuller calls.
    device: the torch device of the local backend's models (a model's config.yaml
        ``device`` wins): ``auto`` (the GPU when torch sees one, else the CPU), ``cpu``,
        ``cuda`` or ``cuda:N``; a GPU torch does not see stops the server with an error.
    torch_threads: torch's intra-op threads in the local backend; 0: the CPUs this process
        may use (affinity, cgroup quota), or what ``OMP_NUM_THREADS`` says when it is set.
    concurrency: ``batched`` (the work of a model's requests in flight shares device
        calls) or ``serial`` (one request at a time per model, for benchmarks).
    max_in_flight: Explain and ListModels calls the gateway handles at once, for either
        backend; a call beyond that is refused at once with RESOURCE_EXHAUSTED.
    torchserve_target: ``host:port`` of TorchServe's gRPC inference API.
    torchserve_key_file: TorchServe's ``key_file.json`` (token authorization).
    torchserve_models: comma-separated model names served by TorchServe; empty: the
        names of the archives in ``model_store``.
    tls_cert_file, tls_key_file: PEM server certificate (chain) and private key; when set,
        the gateway accepts TLS connections only.
    tls_client_ca_file: PEM CA certificates; when set, clients must present a certificate
        signed by one of them (mutual TLS). Needs ``tls_cert_file``.
    auth_token_file: file with the bearer tokens clients must send (one per line, in
        ``authorization: Bearer <token>``); empty: no token needed. Health checks need none.
    max_message_bytes: largest gRPC message received or sent.
    max_image_bytes, max_image_pixels, max_methods, max_forward_passes: per-request limits
        of the engine (see :class:`~xaiserve.engine.limits.EngineLimits`).
    forward_backend, onnx_threads, onnx_providers, onnx_device_id, forward_memory_mb,
    forward_max_batch, forward_call_batch, incremental_occlusion:
        how forward-only batches run on the local backend (see
        :class:`~xaiserve.runtime.forward.config.ForwardConfig`); ``onnx_providers`` is
        comma-separated, by default ``CUDAExecutionProvider,CPUExecutionProvider`` (CUDA
        where onnxruntime-gpu finds a GPU, else the CPU); ``onnx_device_id`` None: the
        GPU of each model's torch device.
    default_deadline_seconds: deadline applied to calls that arrive without one.
    grace_seconds, log_level: time in-flight calls get on SIGTERM/SIGINT; logging level.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    processes: int = 1
    reuse_port: bool = False
    metrics_port: int = 9464
    model_store: str = "var/models"
    build_demo: bool = False
    backend: str = "local"
    workers: int = 32
    concurrency: str = CONCURRENCY[0]
    device: str = _FORWARD_DEFAULTS.device
    torch_threads: int = 0
    max_in_flight: int = 64
    torchserve_target: str = "127.0.0.1:7070"
    torchserve_key_file: str = "var/stack/torchserve/key_file.json"
    torchserve_models: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    auth_token_file: str = ""
    max_message_bytes: int = 32 * _MIB
    max_image_bytes: int = _LIMIT_DEFAULTS.max_image_bytes
    max_image_pixels: int = _LIMIT_DEFAULTS.max_image_pixels
    max_methods: int = _LIMIT_DEFAULTS.max_methods
    max_forward_passes: int = _LIMIT_DEFAULTS.max_forward_passes
    forward_backend: str = _FORWARD_DEFAULTS.backend
    onnx_threads: int = _FORWARD_DEFAULTS.onnx_threads
    onnx_providers: str = ",".join(_FORWARD_DEFAULTS.onnx_providers)
    onnx_device_id: int | None = _FORWARD_DEFAULTS.onnx_device_id
    forward_memory_mb: int = _FORWARD_DEFAULTS.memory_mb
    forward_max_batch: int = _FORWARD_DEFAULTS.max_batch
    forward_call_batch: int = _FORWARD_DEFAULTS.call_batch
    incremental_occlusion: bool = _FORWARD_DEFAULTS.incremental_occlusion
    default_deadline_seconds: float = 60.0
    grace_seconds: float = 10.0
    log_level: str = "INFO"

    @property
    def address(self) -> str:
        """``host:port`` as gRPC wants it (IPv6 hosts in brackets)."""
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    def engine_limits(self) -> EngineLimits:
        """The per-request limits handed to the engine."""
        return EngineLimits(
            max_image_bytes=self.max_image_bytes,
            max_image_pixels=self.max_image_pixels,
            max_methods=self.max_methods,
            max_forward_passes=self.max_forward_passes,
        )

    @property
    def serial(self) -> bool:
        """One request at a time per model (``--concurrency serial``)."""
        return self.concurrency == SERIAL

    def forward_config(self) -> ForwardConfig:
        """How the engine runs forward-only batches (torch or ONNX Runtime)."""
        return ForwardConfig(
            backend=self.forward_backend,
            device=self.device,
            onnx_threads=self.onnx_threads,
            onnx_providers=tuple(p.strip() for p in self.onnx_providers.split(",") if p.strip()),
            onnx_device_id=self.onnx_device_id,
            memory_mb=self.forward_memory_mb,
            max_batch=self.forward_max_batch,
            call_batch=self.forward_call_batch,
            incremental_occlusion=self.incremental_occlusion,
        )


class SettingError(ValueError):
    """A setting that parsed but cannot be used on this machine (a GPU torch does not
    see); the message names the flag and its environment variable."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"--{name.replace('_', '-')} ({env_var(name)}): {reason}")
        self.setting = name


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be in 0..65535, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(f"must be >= 0, got {text}")
    return value


def _providers(text: str) -> str:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise ValueError("name at least one execution provider")
    return ",".join(names)


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _typed(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """Wraps a parser so argparse reports its ValueError message."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = name
    return convert


# field name -> (parser, help text). Order is the order of --help.
_FLAGS: dict[str, tuple[Callable[[str], Any], str]] = {
    "host": (
        str,
        "address to listen on; 127.0.0.1 accepts local clients only, use 0.0.0.0 or [::] "
        "in a container",
    ),
    "port": (_port, "port to listen on; 0 picks a free one"),
    "processes": (_positive_int, "server processes sharing the port, each its own models"),
    "reuse_port": (_boolean, "share the port (SO_REUSEPORT); --processes sets it for its own"),
    "metrics_port": (_port, "port of the Prometheus /metrics endpoint (HTTP, on HOST); 0: off"),
    "model_store": (str, "directory with one sub-directory (with a config.yaml) per model"),
    "build_demo": (_boolean, "build the demo model into MODEL_STORE/demo first if it is missing"),
    "backend": (str, "where requests go"),
    "workers": (_positive_int, "requests the local backend runs at once"),
    "concurrency": (
        str.lower,
        "batched: the work of the requests in flight on a model shares device calls; "
        "serial: one request at a time per model (as before issue 22, for comparison)",
    ),
    "device": (
        device_spec,
        "torch device of the models (a model's config.yaml device wins): auto (the GPU when "
        "torch sees one, else the CPU), cpu, cuda or cuda:N",
    ),
    "torch_threads": (
        _non_negative_int,
        "torch intra-op threads; 0: the CPUs this process may use (affinity, cgroup "
        "quota), or OMP_NUM_THREADS when set",
    ),
    "max_in_flight": (
        _positive_int,
        "Explain/ListModels calls handled at once (either backend); more get "
        "RESOURCE_EXHAUSTED at once",
    ),
    "torchserve_target": (str, "host:port of TorchServe's gRPC inference API"),
    "torchserve_key_file": (str, "TorchServe's key_file.json (token authorization)"),
    "torchserve_models": (
        str,
        "comma-separated models served by TorchServe; empty: the archives in MODEL_STORE",
    ),
    "tls_cert_file": (str, "PEM server certificate chain; with --tls-key-file turns TLS on"),
    "tls_key_file": (str, "PEM private key of the server certificate"),
    "tls_client_ca_file": (str, "PEM CA certificates; when set, clients need a certificate"),
    "auth_token_file": (
        str,
        "file of bearer tokens clients must send, one per line; empty: no token needed",
    ),
    "max_message_bytes": (_positive_int, "largest gRPC message received or sent, in bytes"),
    "max_image_bytes": (_positive_int, "largest encoded image or raw tensor, in bytes"),
    "max_image_pixels": (
        _positive_int,
        "largest decoded image, width x height, checked before decoding (the only pixel "
        "limit: Pillow's own default does not apply)",
    ),
    "max_methods": (_positive_int, "methods in one call"),
    "max_forward_passes": (_positive_int, "images the model may evaluate for one call"),
    "forward_backend": (
        str,
        "default backend of forward-only batches for models whose ONNX export passed its check",
    ),
    "onnx_threads": (
        _non_negative_int,
        "intra-op threads per ONNX Runtime session; 0: the CPUs this process may use "
        "(affinity, cgroup quota)",
    ),
    "onnx_providers": (
        _providers,
        "ONNX Runtime execution providers, comma-separated, in order of preference",
    ),
    "onnx_device_id": (
        _non_negative_int,
        "the GPU of ONNX Runtime's GPU providers (CUDA); unset: the GPU of the model's device",
    ),
    "forward_memory_mb": (
        _positive_int,
        "memory budget of one forward-only batch in MiB (bytes per image x batch <= it)",
    ),
    "forward_max_batch": (
        _positive_int,
        "images per forward-only batch, at most, however many the memory budget allows",
    ),
    "forward_call_batch": (
        _non_negative_int,
        "images per forward-only backend call, at most; 0: on ONNX Runtime the fastest "
        "batch measured at load, on torch the memory budget's",
    ),
    "incremental_occlusion": (
        _boolean,
        "occlusion recomputes only what each window changes in the early layers (exact)",
    ),
    "default_deadline_seconds": (_positive_float, "deadline for calls that arrive without one"),
    "grace_seconds": (_non_negative_float, "time in-flight calls get to finish on SIGTERM/SIGINT"),
    "log_level": (str.upper, "logging level"),
}
_CHOICES: dict[str, Sequence[str]] = {
    "backend": BACKENDS,
    "log_level": LOG_LEVELS,
    "forward_backend": FORWARD_BACKENDS,
    "concurrency": CONCURRENCY,
}


def env_var(name: str) -> str:
    """The environment variable of a setting: ``max_methods`` -> ``XAISERVE_MAX_METHODS``."""
    return ENV_PREFIX + name.upper()


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The ``xaiserve-server`` argument parser; defaults come from ``environ`` when set.

    Raises:
        SystemExit: via ``parser.error`` when an environment variable holds a bad value.
    """
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="xaiserve-server",
        description="Serve attribution maps and their reliability over gRPC "
        "(xaiserve.v1.ExplanationService, with grpc.health.v1 and reflection).",
        epilog=f"Every flag falls back to its {ENV_PREFIX}* environment variable, then to "
        "its default.",
    )
    defaults = Settings()
    for spec in fields(Settings):
        parse, text = _FLAGS[spec.name]
        flag = "--" + spec.name.replace("_", "-")
        var = env_var(spec.name)
        convert = _typed(parse, spec.name)
        default = getattr(defaults, spec.name)
        if var in environ:
            try:
                default = convert(environ[var])
            except argparse.ArgumentTypeError as err:
                parser.error(f"{var}={environ[var]!r}: {err}")
            choices = _CHOICES.get(spec.name)
            if choices is not None and default not in choices:
                parser.error(f"{var}={environ[var]!r}: choose from {', '.join(choices)}")
        help_text = f"{text} (env {var}; default {getattr(defaults, spec.name)!r})"
        if spec.type in (bool, "bool"):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
            continue
        parser.add_argument(
            flag,
            type=convert,
            default=default,
            choices=_CHOICES.get(spec.name),
            metavar=None if spec.name in _CHOICES else spec.name.upper(),
            help=help_text,
        )
    return parser


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Flags (``argv``, default ``sys.argv[1:]``) over ``XAISERVE_*`` variables over defaults."""
    namespace = build_parser(environ).parse_args(argv)
    return Settings(**{spec.name: getattr(namespace, spec.name) for spec in fields(Settings)})


def configure_logging(level: str, process_ids: bool = False) -> None:
    """One line per record on stderr: time, level, logger, message; with ``process_ids``
    (several server processes write to one stream), the process id after the level."""
    pid = " [%(process)d]" if process_ids else ""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s{pid} %(name)s: %(message)s",
    )
