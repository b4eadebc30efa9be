"""The Python client against a real genserve server on loopback."""

from __future__ import annotations

import asyncio
import doctest
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genserve.clients import AsyncClient, Client, GenserveError, Progress, Samples
from genserve.clients import client as client_module
from genserve.serving.server import ServerThread
from genserve.serving.tritonserver import free_port
from tests.integration.server_fixtures import server_config


@pytest.fixture(scope="module")
def server():
    thread = ServerThread(server_config()).start()
    yield thread
    thread.stop()


@pytest.fixture
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


def test_models_describe_every_family(client):
    models = {m.name: m for m in client.models()}
    assert models["vae_mnist"].capabilities == ("sample", "encode", "decode", "score")
    assert models["dcgan_mnist"].num_classes == 10 and models["vae_mnist"].num_classes is None
    assert models["gated_pixelcnn_mnist"].metrics["exact"]["nll_nats"] == pytest.approx(87.92, abs=0.01)
    assert client.model("realnvp_mnist").latent_shape == (1, 28, 28)


def test_sample_returns_numpy_images_equal_to_the_models_own(client, shipped):
    samples = client.sample("dcgan_mnist", 3, seed=4, temperature=0.9, labels=[1, 2, 3])
    expected = shipped("dcgan_mnist").model.sample(3, 4, 0.9, torch.tensor([1, 2, 3]))
    np.testing.assert_array_equal(samples.images, expected.numpy())
    assert (samples.seed, samples.labels.tolist(), samples.images.dtype) == (4, [1, 2, 3], np.uint8)
    one = client.sample("dcgan_mnist", 1, seed=4, temperature=0.9, labels=3, start_index=2)
    np.testing.assert_array_equal(one.images[0], samples.images[2])


def test_sample_stream_yields_progress_then_the_samples(client):
    events = list(client.sample_stream("pixelcnn_mnist", 2, seed=9))
    assert isinstance(events[-1], Samples) and all(isinstance(e, Progress) for e in events[:-1])
    assert len(events) >= 2 and events[-2].rows_done.tolist() == [28, 28]
    np.testing.assert_array_equal(events[-1].images, client.sample("pixelcnn_mnist", 2, seed=9).images)


def test_encode_decode_and_score_round_trip(client):
    x = client.sample("realnvp_mnist", 3, seed=2).images
    encoding = client.encode("realnvp_mnist", x)
    assert encoding.latents.shape == (3, 1, 28, 28) and encoding.log_det.shape == (3,) and encoding.log_var is None
    np.testing.assert_array_equal(client.decode("realnvp_mnist", encoding.latents).images, x)
    iaf = client.encode("iaf_vae_mnist", (x > 127).astype(np.uint8))
    assert iaf.latents.shape == (3, 16) and iaf.log_density.shape == (3,) and iaf.log_var is None
    vae = client.encode("vae_mnist", (x > 127).astype(np.uint8))
    decoded = client.decode("vae_mnist", vae.latents)
    assert decoded.probabilities.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(decoded.images, (decoded.probabilities > 0.5).astype(np.uint8))
    scores = client.score("vae_mnist", (x > 127).astype(np.uint8), importance_samples=5)
    assert [(s.method, s.kind) for s in scores] == [("elbo", "lower bound"), ("iwae-5", "lower bound")]
    np.testing.assert_allclose(scores[1].bits_per_dim, -scores[1].values / (np.log(2) * 784))
    assert client.score("dcgan_mnist", x, labels=0)[0].bits_per_dim is None
    pixel_vae = client.encode("pixel_vae_mnist", (x > 127).astype(np.uint8))
    drawn = client.decode("pixel_vae_mnist", pixel_vae.latents, seed=4)  # pixel by pixel, keyed by the seed
    assert drawn.probabilities is None and drawn.images.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(client.decode("pixel_vae_mnist", pixel_vae.latents, seed=4).images, drawn.images)


def test_async_client_gives_the_same_answers(server, client):
    async def main():
        async with AsyncClient(server.address) as a:
            samples = await asyncio.gather(*(a.sample("vae_mnist", 2, seed=s) for s in range(3)))
            events = [e async for e in a.sample_stream("gated_pixelcnn_mnist", 1, seed=5)]
            scores = await a.score("pixelcnn_mnist", samples[0].images)
            return samples, events, scores

    samples, events, scores = asyncio.run(main())
    for s, batch in enumerate(samples):
        np.testing.assert_array_equal(batch.images, client.sample("vae_mnist", 2, seed=s).images)
    np.testing.assert_array_equal(events[-1].images, client.sample("gated_pixelcnn_mnist", 1, seed=5).images)
    np.testing.assert_allclose(scores[0].values, client.score("pixelcnn_mnist", samples[0].images)[0].values)


def test_errors_carry_the_status_and_the_servers_message(client):
    with pytest.raises(GenserveError) as caught:
        client.sample("no_such_model", 1)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND and "no_such_model" in caught.value.message
    with pytest.raises(GenserveError) as caught:
        client.decode("vae_mnist", np.zeros((1, 3), np.float32))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "latents.shape" in caught.value.message
    with pytest.raises(GenserveError) as caught:  # ~0.4 s of work on a 2-core CPU, 8 times the deadline
        client.sample("gated_pixelcnn_mnist", 128, seed=0, timeout=0.05)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_unavailable_is_retried_until_the_server_comes_up():
    port = free_port()
    started: list[ServerThread] = []

    def start_late():
        time.sleep(1.0)
        started.append(ServerThread(server_config(port=port)).start())

    late = threading.Thread(target=start_late)
    late.start()
    try:
        with Client(f"127.0.0.1:{port}", retries=30, backoff=0.2, max_backoff=0.5, timeout=60) as c:
            assert c.sample("vae_mnist", 1, seed=0).images.shape == (1, 1, 28, 28)
    finally:
        late.join()
        for s in started:
            s.stop()


def test_unavailable_gives_up_after_the_retries_and_other_codes_are_not_retried(server):
    with Client(f"127.0.0.1:{free_port()}", retries=2, backoff=0.01, max_backoff=0.01) as c:
        with pytest.raises(GenserveError) as caught:
            c.models()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.attempts == 3 and "(after 3 attempts)" in str(caught.value)  # the first and two retries
    before = server.server.metrics.requests.labels("", "Sample", "INVALID_ARGUMENT")._value.get()
    with Client(server.address, retries=5) as c, pytest.raises(GenserveError) as caught:
        c.sample("", 1)
    assert caught.value.attempts == 1  # INVALID_ARGUMENT is not retried
    counted = server.server.metrics.requests.labels("", "Sample", "INVALID_ARGUMENT")._value.get
    give_up = time.monotonic() + 5
    while counted() == before and time.monotonic() < give_up:  # the server counts just after answering
        time.sleep(0.01)
    assert counted() == before + 1


def test_tls_and_bearer_tokens(tmp_path, caplog):
    caplog.set_level("DEBUG")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    thread = ServerThread(server_config(tls_cert=cert, tls_key=key, auth_token="s3cret")).start()
    try:
        address, roots = thread.address, cert.read_bytes()
        with Client(address, tls=True, root_certificates=roots, token="s3cret") as c:
            assert c.sample("vae_mnist", 1, seed=0).images.shape == (1, 1, 28, 28)
        with Client(address, tls=True, root_certificates=roots, token="wrong") as c, \
                pytest.raises(GenserveError) as caught:
            c.models()
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED and "authorization" in caught.value.message
        with Client(address, tls=True, root_certificates=roots) as c, pytest.raises(GenserveError) as caught:
            list(c.sample_stream("pixelcnn_mnist", 1))
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(address, retries=0, timeout=5) as plaintext, pytest.raises(GenserveError) as caught:
            plaintext.models()
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        credentials = grpc.ssl_channel_credentials(roots)
        with grpc.secure_channel(address, credentials) as channel:  # probes need no token
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="vae_mnist"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        # the token appears in no log line and no repr of the configuration (which a log might print)
        assert "s3cret" not in repr(thread.config) and "s3cret" not in caplog.text
    finally:
        thread.stop()


def test_the_docstring_examples_run(server):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(client_module, globs={"SERVER": server.address}) if t.examples]
    assert len(tests) >= 3
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
