"""The gRPC gateway of xaiserve.

A thin ``grpc.aio`` server over a backend: protobuf requests are converted to the engine's
plain request objects (:mod:`xaiserve.service.convert`), handed to a backend
(:mod:`xaiserve.service.backends`: the in-process engine, later TorchServe) and the result is
converted back. Domain errors become gRPC status codes in one place
(:mod:`xaiserve.service.status`). :mod:`xaiserve.service.server` runs it,
:mod:`xaiserve.service.client` and :mod:`xaiserve.service.cli` call it.

Nothing here does tensor math, and nothing runs at import time.
"""
