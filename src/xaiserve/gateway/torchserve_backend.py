"""The ``torchserve`` backend: the engine runs in TorchServe workers.

Calls TorchServe's gRPC inference API (``Predictions``, ``Ping``) with its token
authorization: every call carries ``authorization: Bearer <inference key>``, the key read
from TorchServe's ``key_file.json``. The file is read again whenever it changes (TorchServe
writes new keys on every start, and when a key is rotated) and once more when TorchServe
refuses a key; the key is never logged. Only the inference API is used: the gateway
neither calls nor exposes TorchServe's management API.

Requests travel as described in :mod:`xaiserve.api.worker_protocol`: the plain request
is converted back to the API's ``ExplainRequest`` (:mod:`xaiserve.api.reverse_convert`),
the client's deadline goes with it (as the gRPC deadline of the call and, for the worker,
as Unix time), and the handler's ``ExplainResponse`` or error answer comes back.

TorchServe's failures become domain errors (and so gRPC codes, in ``status``):

- a model that is not one of the backend's models: NOT_FOUND at once, without a call (so
  TorchServe never echoes a client's name back in a trailer too large to receive);
- a model or version TorchServe does not have: NOT_FOUND;
- TorchServe down or restarting, the model's job queue full or no worker for it:
  UNAVAILABLE (TorchServe answers the last two alike, with INTERNAL and "has no worker to
  serve inference request");
- TorchServe at capacity (HTTP 429/413 inside TorchServe): RESOURCE_EXHAUSTED;
- the deadline passing: DEADLINE_EXCEEDED;
- TorchServe refusing the key, even after re-reading the key file: UNAVAILABLE (and an
  error in the gateway's log);
- anything else: INTERNAL with an error id; TorchServe's message is logged, not sent.

ListModels asks each model's handler for its ``ListModelsResponse`` (a ``list_models``
request), so both backends describe a model with the same engine code. The model names
are configured, or read from the manifests of the archives in the model store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2

from xaiserve.api import reverse_convert, worker_protocol
from xaiserve.api.errors import (
    DeadlineExceeded,
    NotFound,
    ResourceExhausted,
    Unavailable,
    XaiError,
    quote,
)
from xaiserve.api.torchserve import inference_pb2, inference_pb2_grpc
from xaiserve.api.types import ExplainRequest, ExplainResult, ModelInfo
from xaiserve.api.v1 import explain_pb2 as pb

logger = logging.getLogger(__name__)

#: Deadline of the calls made without a client deadline (Ping, ListModels).
PROBE_SECONDS = 2.0
LIST_MODELS_SECONDS = 10.0

#: A channel to TorchServe that lost its connection tries again after at most this long
#: (gRPC's default backoff grows to two minutes, far too slow to notice a restart).
#: TorchServe's error trailers quote what the gateway sent (a version, say) in full; the
#: channel receives trailers up to :data:`TRAILER_BYTES` so that such an answer arrives as
#: the error it is (then mapped and quoted short), not as a trailer overflow.
TRAILER_BYTES = 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_metadata_size", TRAILER_BYTES),
    ("grpc.absolute_max_metadata_size", TRAILER_BYTES),
]


class InferenceKey:
    """TorchServe's inference key, read from its key file and re-read when the file changes.

    The key is kept in memory only; ``repr`` does not show it.
    """

    def __init__(self, key_file: Path) -> None:
        self.path = Path(key_file)
        self._key: str | None = None
        self._stamp: tuple[int, int, int] | None = None

    def __repr__(self) -> str:
        return f"InferenceKey({str(self.path)!r})"

    def get(self) -> str:
        """The current key, re-read if the file changed since it was last read.

        Raises:
            Unavailable: the file is missing or holds no inference key.
        """
        try:
            info = os.stat(self.path)
        except OSError:
            raise Unavailable(None, "TorchServe is unavailable (no key file)") from None
        stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        if self._key is None or stamp != self._stamp:
            return self._read(stamp)
        return self._key

    def refresh(self) -> bool:
        """Reads the file again; True when it holds another key than before."""
        before = self._key
        try:
            info = os.stat(self.path)
            self._read((info.st_ino, info.st_mtime_ns, info.st_size))
        except (OSError, Unavailable):
            return False
        return self._key != before

    def _read(self, stamp: tuple[int, int, int]) -> str:
        try:
            document = json.loads(self.path.read_text())
            key = document["inference"]["key"]
        except (OSError, ValueError, KeyError, TypeError):
            raise Unavailable(None, "TorchServe is unavailable (unreadable key file)") from None
        if not isinstance(key, str) or not key:
            raise Unavailable(None, "TorchServe is unavailable (no inference key)")
        if self._key is not None and key != self._key:
            logger.info("TorchServe's inference key changed; using the new one")
        self._key, self._stamp = key, stamp
        return key


def map_rpc_error(error: grpc.RpcError, model: str, version: str) -> XaiError:
    """The domain error for a failed call to TorchServe (see the module docstring)."""
    code = error.code()
    details = error.details() or ""
    if "ModelNotFoundException" in details or details.startswith("Model not found"):
        return NotFound("model_name", f"model {quote(model)} is not served")
    if "ModelVersionNotFoundException" in details:
        return NotFound(
            "model_version", f"model {quote(model)} version {quote(version)} is not served"
        )
    if "has no worker to serve inference request" in details:  # queue full, or no worker
        logger.warning("TorchServe has no capacity for model %r: %s", model, details)
        return Unavailable(
            None, f"TorchServe has no free capacity for model {quote(model)}; retry later"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(None, "deadline exceeded waiting for TorchServe")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(None, f"TorchServe is at capacity for model {quote(model)}")
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        logger.error("TorchServe refused the gateway's inference key: %s", details)
        return Unavailable(None, "TorchServe is unavailable (it refused the gateway's key)")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        logger.warning("TorchServe unavailable for model %r: %s", model, details)
        return Unavailable(None, f"TorchServe is unavailable for model {quote(model)}")
    error_id = uuid.uuid4().hex[:12]
    logger.error("TorchServe error (id %s) %s: %s", error_id, code.name, details)
    return worker_protocol.WorkerError("INTERNAL", f"TorchServe error (id {error_id})")


class TorchServeBackend:
    """The :class:`~xaiserve.gateway.backends.Backend` over TorchServe's inference API.

    target: ``host:port`` of TorchServe's gRPC inference API.
    key_file: TorchServe's ``key_file.json``.
    models: the model names ListModels reports.
    max_message_bytes: largest message sent to or received from TorchServe.
    """

    def __init__(
        self,
        target: str,
        key_file: Path,
        models: Sequence[str],
        max_message_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.target = target
        self.models = tuple(models)
        self._key = InferenceKey(key_file)
        self._options = [
            *_CHANNEL_OPTIONS,
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._channel: grpc.aio.Channel | None = None
        self._stub: inference_pb2_grpc.InferenceAPIsServiceStub | None = None
        self._closed = False

    def _api(self) -> inference_pb2_grpc.InferenceAPIsServiceStub:
        """The stub, over a channel made on first use (in the running event loop)."""
        if self._closed:
            raise Unavailable(None, "server is shutting down")
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            self._stub = inference_pb2_grpc.InferenceAPIsServiceStub(self._channel)
        return self._stub

    async def _call(self, method: str, request: object, timeout: float) -> Any:
        """Calls ``method`` with the key; once more with a re-read key if it is refused.

        Raises:
            grpc.aio.AioRpcError: the call failed.
            Unavailable: no key can be read.
        """
        for attempt in (1, 2):
            metadata = (("authorization", f"Bearer {self._key.get()}"),)
            try:
                return await getattr(self._api(), method)(
                    request, timeout=timeout, metadata=metadata
                )
            except grpc.aio.AioRpcError as error:
                refused = error.code() in (
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED,
                )
                if not (refused and attempt == 1 and self._key.refresh()):
                    raise
        raise RuntimeError("unreachable: the second attempt returns or raises")

    async def _predict(
        self, model: str, version: str, inputs: dict[str, bytes], deadline: float
    ) -> bytes:
        """The handler's answer's success message; raises its error as a domain error."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(None, "deadline exceeded before the call to TorchServe")
        request = inference_pb2.PredictionsRequest(
            model_name=model, model_version=version, input=inputs
        )
        try:
            reply = await self._call("Predictions", request, remaining)
        except grpc.aio.AioRpcError as error:
            raise map_rpc_error(error, model, version) from None
        return worker_protocol.decode_answer(reply.prediction)

    async def explain(self, request: ExplainRequest, deadline: float | None) -> ExplainResult:
        """Sends ``request`` to the model's TorchServe workers and waits for the answer.

        Raises:
            NotFound: the model is not one of :attr:`models` (TorchServe is not asked).
        """
        if request.model not in self.models:
            raise NotFound("model_name", f"model {quote(request.model)} is not served")
        if deadline is None:
            deadline = time.monotonic() + 3600.0
        deadline_unix = time.time() + (deadline - time.monotonic())
        body = reverse_convert.request_to_proto(request).SerializeToString()
        answer = await self._predict(
            request.model,
            request.version,
            worker_protocol.explain_inputs(body, deadline_unix),
            deadline,
        )
        return reverse_convert.result_from_proto(pb.ExplainResponse.FromString(answer))

    async def list_models(self) -> list[ModelInfo]:
        """Each configured model's description, from its handler (concurrently)."""
        deadline = time.monotonic() + LIST_MODELS_SECONDS

        async def describe(name: str) -> list[ModelInfo]:
            answer = await self._predict(name, "", worker_protocol.list_models_inputs(), deadline)
            return reverse_convert.models_from_proto(pb.ListModelsResponse.FromString(answer))

        described = await asyncio.gather(*(describe(name) for name in self.models))
        return [model for models in described for model in models]

    async def ready(self) -> bool:
        """Whether TorchServe answers Ping as healthy (every model has its workers)."""
        try:
            reply = await self._call("Ping", empty_pb2.Empty(), PROBE_SECONDS)
        except (grpc.aio.AioRpcError, XaiError) as error:
            logger.debug("TorchServe not ready: %s", error)
            return False
        try:
            return json.loads(reply.health).get("status") == "Healthy"
        except (ValueError, AttributeError):
            return False

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._closed = True
        if self._channel is not None:
            await self._channel.close()
