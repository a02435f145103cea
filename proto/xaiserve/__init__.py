"""xaiserve: prediction, attribution maps and their reliability in one gRPC call.

The generated API stubs live in ``xaiserve.v1``; the gateway in ``xaiserve.service``; the
engine and TorchServe handler in ``xaiserve.handlers``; archive building and the demo
model in ``xaiserve.model_store``.
"""
