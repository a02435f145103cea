"""The engine (model loading, preprocessing, attribution methods, map post-processing) and
the TorchServe handler that hosts it. Nothing here imports gRPC; only the handler module
imports TorchServe."""
