"""Generated protobuf and gRPC stubs of the xaiserve v1 API (`make proto`)."""
