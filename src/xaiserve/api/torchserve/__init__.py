"""Generated stubs of the subset of TorchServe's gRPC inference API the gateway calls
(`make proto`; see inference.proto)."""
