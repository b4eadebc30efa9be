"""The triton runtime when Triton fails: killed under load, back again, a model unloaded and loaded.

A real tritonserver (explicit model control, the VAE's entry points only, so it restarts in
seconds) behind a real genserve with `--runtime triton`.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from genserve.serving.tritonserver import TritonServer, TritonServerConfig
from genserve.v1 import generative_pb2 as pb
from tests.integration.conftest import REPOSITORY
from tests.integration.server_fixtures import Connected, server_config, tensor
from tests.integration.test_faults import NOT_SERVING, SERVING, health
from tests.integration.test_server_behaviour import wait_until


def decode_request() -> pb.DecodeRequest:
    return pb.DecodeRequest(model="vae_mnist", latents=tensor(np.zeros((2, 16), np.float32)))


class Load:
    """Threads calling Decode back to back, recording (time answered, status code name)."""

    def __init__(self, api: Connected, threads: int = 4) -> None:
        self.api, self.answers, self._stop = api, [], threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.api.stub.Decode(decode_request(), timeout=30)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            self.answers.append((time.monotonic(), code))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(60)


@pytest.fixture
def vae_repository(tmp_path):
    repository = tmp_path / "repo"
    for folder in REPOSITORY.glob("vae_mnist_*"):
        shutil.copytree(folder, repository / folder.name)
    return repository


def test_triton_killed_under_load_then_back_and_models_unloaded(vae_repository, capsys):
    triton = TritonServer(TritonServerConfig(vae_repository, 0, 0, 0, explicit_model_control=True)).start()
    config = triton.config  # the ports it got: Triton comes back on the same ones below
    api = Connected(server_config(runtime="triton", triton_url=config.grpc_url, repository=vae_repository))
    try:
        assert health(api, "vae_mnist") == SERVING
        with Load(api) as load:
            assert wait_until(lambda: sum(code == "OK" for _, code in load.answers) >= 20)
            killed = time.monotonic()
            os.killpg(triton.process.pid, signal.SIGKILL)  # Triton and its Python-backend stubs
            triton.process.wait()
            assert wait_until(lambda: any(t > killed and code != "OK" for t, code in load.answers), timeout=30)
        after = [(t - killed, code) for t, code in load.answers if t > killed]
        failed = [code for _, code in after if code != "OK"]
        # in-flight and later calls end UNAVAILABLE: not INTERNAL, and not left to their 30 s deadline
        assert set(failed) == {"UNAVAILABLE"}, after
        with capsys.disabled():
            print(f"\n[triton killed] first failure {min(t for t, c in after if c != 'OK'):.3f} s after SIGKILL")
        assert wait_until(lambda: health(api, "vae_mnist") == NOT_SERVING)
        with pytest.raises(grpc.RpcError) as caught:
            api.stub.Decode(decode_request(), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "unavailable" in caught.value.details()

        triton = TritonServer(config).start()  # back on the same ports: genserve recovers by itself
        assert wait_until(lambda: health(api, "vae_mnist") == SERVING, timeout=30)
        assert list(api.stub.Decode(decode_request(), timeout=30).images.shape) == [2, 1, 28, 28]

        # a model unloaded in Triton: that model's health follows, its calls are UNAVAILABLE
        with grpcclient.InferenceServerClient(config.grpc_url) as client:
            client.unload_model("vae_mnist_decode")
            assert wait_until(lambda: health(api, "vae_mnist") == NOT_SERVING)
            with pytest.raises(grpc.RpcError) as caught:
                api.stub.Decode(decode_request(), timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
            client.load_model("vae_mnist_decode")
            assert wait_until(lambda: health(api, "vae_mnist") == SERVING)
        assert list(api.stub.Decode(decode_request(), timeout=30).images.shape) == [2, 1, 28, 28]
    finally:
        api.close()
        triton.stop()


def test_a_tampered_artifact_is_refused_inside_triton_and_the_other_models_serve(vae_repository):
    artifact = vae_repository / "vae_mnist_encode" / "1" / "model.onnx"
    artifact.write_bytes(artifact.read_bytes()[:-1] + b"\0")  # the sha256 no longer matches the manifest
    triton = TritonServer(TritonServerConfig(vae_repository, 0, 0, 0, exit_on_model_error=False)).start()
    config = triton.config
    api = Connected(server_config(runtime="triton", triton_url=config.grpc_url, repository=vae_repository))
    try:
        with grpcclient.InferenceServerClient(config.grpc_url) as client:
            index = {m.name: m for m in client.get_model_repository_index().models}
        assert index["vae_mnist_encode"].state == "UNAVAILABLE" and index["vae_mnist_decode"].state == "READY"
        assert "sha256" in index["vae_mnist_encode"].reason and "refusing to load" in index["vae_mnist_encode"].reason
        assert health(api, "vae_mnist") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:
            api.stub.Encode(pb.EncodeRequest(model="vae_mnist", images=tensor(np.zeros((1, 1, 28, 28), np.uint8))))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
        assert list(api.stub.Decode(decode_request(), timeout=30).images.shape) == [2, 1, 28, 28]
    finally:
        api.close()
        triton.stop()
