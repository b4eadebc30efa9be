"""Faults inside the server, with the real processes: a sampling engine whose thread dies, a tampered artifact.

In both the broken model is reported NOT_SERVING by health, its requests end UNAVAILABLE with a
message saying why (no hang, no INTERNAL), and every other model keeps serving.
"""

from __future__ import annotations

import logging
import shutil

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genserve.v1 import generative_pb2 as pb
from tests.integration.conftest import REPOSITORY
from tests.integration.server_fixtures import Connected, images_of, server_config
from tests.integration.test_server_behaviour import wait_until

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def health(api: Connected, model: str) -> int:
    return health_pb2_grpc.HealthStub(api.channel).Check(health_pb2.HealthCheckRequest(service=model)).status


class InjectedFault(BaseException):
    """Not an Exception: what a step's own error handling does not catch, so the engine thread ends."""


def test_a_dead_sampling_engine_answers_unavailable_and_health_says_not_serving(caplog):
    api = Connected(server_config())
    try:
        engine = api.server.runtime.engines["pixelcnn_mnist_sample"]
        # 512 samples: ~0.2 s of work on a 2-core CPU, far more than the engine does before its step is replaced
        stream = api.stub.SampleStream(pb.SampleRequest(model="pixelcnn_mnist", num_samples=512, seed=1), timeout=60)
        assert next(stream).WhichOneof("event") == "progress"  # the samples are in the engine

        def die():
            raise InjectedFault("injected by the test")

        with caplog.at_level(logging.ERROR, logger="genserve.engine"):
            engine.step = die  # the engine thread's next step ends it
            with pytest.raises(grpc.RpcError) as caught:
                list(stream)  # the waiting request ends, it does not hang
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "pixelcnn_mnist_sample is not serving: its sampling engine has stopped" in caught.value.details()
        assert "InjectedFault: injected by the test" in caught.value.details()
        assert any("sampling engine of pixelcnn_mnist_sample died" in r.getMessage() for r in caplog.records)
        assert wait_until(lambda: health(api, "pixelcnn_mnist") == NOT_SERVING)
        with pytest.raises(grpc.RpcError) as caught:  # new requests are refused at once
            api.stub.Sample(pb.SampleRequest(model="pixelcnn_mnist", num_samples=1), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert health(api, "gated_pixelcnn_mnist") == SERVING  # the other engine is untouched
        assert images_of(api.stub.Sample(pb.SampleRequest(model="gated_pixelcnn_mnist", num_samples=1))).shape[0] == 1
    finally:
        api.close()


def test_a_tampered_artifact_refuses_that_model_and_the_others_serve(tmp_path, caplog):
    repository = tmp_path / "repo"
    for folder in REPOSITORY.glob("*_mnist_*"):
        if folder.name.startswith(("vae_", "realnvp_")):
            shutil.copytree(folder, repository / folder.name)
    artifact = repository / "vae_mnist_decode" / "1" / "model.onnx"
    artifact.write_bytes(artifact.read_bytes()[:-1] + b"\0")  # one byte changed: the sha256 no longer matches
    with caplog.at_level(logging.ERROR, logger="genserve.embedded"):
        api = Connected(server_config(repository=repository))
    try:
        assert any("not serving vae_mnist_decode" in r.getMessage() and "sha256" in r.getMessage()
                   for r in caplog.records)
        assert health(api, "vae_mnist") == NOT_SERVING and health(api, "realnvp_mnist") == SERVING
        with pytest.raises(grpc.RpcError) as caught:
            api.stub.Decode(pb.DecodeRequest(model="vae_mnist", latents=pb.Tensor(
                shape=[1, 16], dtype=pb.DATA_TYPE_FLOAT32, data=b"\0" * 64)), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "vae_mnist_decode is not serving" in caught.value.details() and "sha256" in caught.value.details()
        assert images_of(api.stub.Sample(pb.SampleRequest(model="realnvp_mnist", num_samples=2))).shape[0] == 2
        encoded = api.stub.Encode(pb.EncodeRequest(model="vae_mnist", images=pb.Tensor(
            shape=[1, 1, 28, 28], dtype=pb.DATA_TYPE_UINT8, data=b"\0" * 784)))  # vae's intact entry points serve
        assert list(encoded.latents.shape) == [1, 16]
    finally:
        api.close()
