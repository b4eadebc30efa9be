"""Starting genserve servers for tests, and small request factories."""

from __future__ import annotations

import grpc
import numpy as np

from genserve.serving.config import BatcherConfig, RuntimeConfig, ServerConfig
from genserve.serving.server import ServerThread
from genserve.serving.tensors import from_numpy, to_numpy
from genserve.v1 import generative_pb2 as pb
from genserve.v1 import generative_pb2_grpc as pb_grpc
from tests.integration.conftest import REPOSITORY


def server_config(runtime: str = "embedded", triton_url: str | None = None, **overrides) -> ServerConfig:
    batcher = overrides.pop("batcher", BatcherConfig())
    runtime_config = overrides.pop("runtime_config", RuntimeConfig(kind=runtime, triton_url=triton_url))
    defaults = dict(repository=REPOSITORY, port=0, metrics_port=0, grace_seconds=5)
    return ServerConfig(**{**defaults, **overrides}, runtime=runtime_config, batcher=batcher)


class Connected:
    """A running ServerThread and a stub on a channel to it."""

    def __init__(self, config: ServerConfig) -> None:
        self.thread = ServerThread(config).start()
        self.server = self.thread.server
        self.channel = grpc.insecure_channel(self.thread.address)
        self.stub = pb_grpc.GenerativeStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.thread.stop()


def images_of(response) -> np.ndarray:
    return to_numpy(response.images, "images", pb.DATA_TYPE_UINT8, (None, None, None, None))


def tensor(array: np.ndarray) -> pb.Tensor:
    return from_numpy(array)
