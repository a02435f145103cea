"""The gRPC gateway of xaiserve.

A thin ``grpc.aio`` server over a backend: protobuf requests are converted to the engine's
plain request objects (:mod:`xaiserve.api.convert`), handed to a backend
(:mod:`xaiserve.gateway.backends`: the in-process engine, later TorchServe) and the result is
converted back. Domain errors become gRPC status codes in one place
(:mod:`xaiserve.gateway.status`). :mod:`xaiserve.gateway.server` runs it,
:mod:`xaiserve.gateway.client` and :mod:`xaiserve.gateway.cli` call it.

Nothing here does tensor math, and nothing runs at import time.
"""
