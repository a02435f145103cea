"""The engine: one Explain from a plain request to a plain result (plan and cost, decoding,
prediction, methods, reliability, post-processing, rendering). Imports nothing from gRPC,
TorchServe or the gateway."""
