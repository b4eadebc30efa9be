"""genserve's gRPC API, generated from generative.proto by `make proto` (do not edit the *_pb2* files)."""
