"""The server around the API: health, reflection, metrics, limits, deadlines, cancellation, shutdown.

Embedded runtime only (what is tested here is the server, not where tensors are computed);
every server is real, on loopback, called by real gRPC clients.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from genserve.serving.config import BatcherConfig, RuntimeConfig
from genserve.serving.server import ServerProcess
from genserve.v1 import generative_pb2 as pb
from tests.integration.conftest import REPOSITORY
from tests.integration.server_fixtures import Connected, images_of, server_config, tensor


@pytest.fixture
def connect():
    opened = []

    def start(**overrides) -> Connected:
        opened.append(Connected(server_config(**overrides)))
        return opened[-1]

    yield start
    for c in opened:
        c.close()


def wait_until(condition, timeout: float = 10.0) -> bool:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def scrape(connected: Connected) -> dict[tuple[str, tuple], float]:
    """The server's /metrics over HTTP: (sample name, sorted labels) → value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{connected.server.metrics_port}/metrics").read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_health_reports_the_service_and_every_model(connect):
    api = connect()
    check = health_pb2_grpc.HealthStub(api.channel).Check
    for service in ("", "genserve.v1.Generative", "vae_mnist", "gated_pixelcnn_mnist", "dcgan_mnist"):
        assert check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as caught:
        check(health_pb2.HealthCheckRequest(service="no_such_model"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_api_to_a_generic_client(connect):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    database = ProtoReflectionDescriptorDatabase(connect().channel)
    assert {"genserve.v1.Generative", "grpc.health.v1.Health"} <= set(database.get_services())
    service = DescriptorPool(database).FindServiceByName("genserve.v1.Generative")
    assert [m.name for m in service.methods] == ["ListModels", "GetModel", "Sample", "SampleStream", "Encode",
                                                 "Decode", "Score"]
    assert service.methods_by_name["Sample"].input_type.fields_by_name["seed"].has_presence


def test_metrics_count_requests_by_code_samples_and_batches(connect):
    api = connect()
    z = tensor(np.zeros((2, 16), np.float32))
    for _ in range(3):
        api.stub.Decode(pb.DecodeRequest(model="vae_mnist", latents=z))
    api.stub.Sample(pb.SampleRequest(model="vae_mnist", num_samples=5, seed=1))
    with pytest.raises(grpc.RpcError):
        api.stub.Decode(pb.DecodeRequest(model="vae_mnist", latents=tensor(np.zeros((2, 3), np.float32))))
    with pytest.raises(grpc.RpcError):
        api.stub.Sample(pb.SampleRequest(model="no_such_model", num_samples=1))
    # The server counts a request just after answering it: wait for all six.
    assert wait_until(lambda: sum(v for (name, _), v in scrape(api).items() if name == "genserve_requests_total") == 6)
    m = scrape(api)
    assert m[("genserve_requests_total", (("code", "OK"), ("method", "Decode"), ("model", "vae_mnist")))] == 3
    decode_labels = (("method", "Decode"), ("model", "vae_mnist"))
    assert m[("genserve_requests_total", (("code", "INVALID_ARGUMENT"), *decode_labels))] == 1
    assert m[("genserve_requests_total", (("code", "NOT_FOUND"), ("method", "Sample"), ("model", "unknown")))] == 1
    assert m[("genserve_samples_total", (("model", "vae_mnist"),))] == 5
    assert m[("genserve_request_duration_seconds_count", (("method", "Decode"), ("model", "vae_mnist")))] == 4
    # 3 decodes of 2 rows + the sample's decode of 5 rows went through the vae_mnist_decode batcher.
    assert m[("genserve_batch_size_sum", (("entry_point", "vae_mnist_decode"),))] == 11
    assert m[("genserve_queue_duration_seconds_count", (("entry_point", "vae_mnist_decode"),))] == 4
    assert m[("genserve_requests_in_flight", (("method", "Decode"),))] == 0


def test_concurrent_requests_are_merged_into_batches(connect):
    # A long queue delay makes merging certain: the batch closes when 16 rows are in.
    api = connect(batcher=BatcherConfig(max_batch_size=16, max_queue_delay_us=2_000_000))
    z = np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(
            lambda k: api.stub.Decode(pb.DecodeRequest(model="vae_mnist", latents=tensor(z[k : k + 1]))), range(16)))
    merged = np.concatenate([images_of(a) for a in answers])
    alone = images_of(api.stub.Decode(pb.DecodeRequest(model="vae_mnist", latents=tensor(z))))
    np.testing.assert_array_equal(merged, alone)
    batcher = api.server.runtime.batchers["vae_mnist_decode"]
    assert batcher.batches_run == 2  # the 16 single-row requests ran as one batch; then the 16-row one


def test_with_batching_off_every_request_runs_alone(connect):
    api = connect(batcher=BatcherConfig(enabled=False))
    z = tensor(np.zeros((1, 16), np.float32))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: api.stub.Decode(pb.DecodeRequest(model="vae_mnist", latents=z)), range(8)))
    assert api.server.runtime.batchers["vae_mnist_decode"].batches_run == 8


def test_a_full_batcher_queue_answers_resource_exhausted(connect):
    api = connect(batcher=BatcherConfig(max_queued_rows=3))
    with pytest.raises(grpc.RpcError) as caught:
        api.stub.Decode(pb.DecodeRequest(model="vae_mnist", latents=tensor(np.zeros((4, 16), np.float32))))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue of vae_mnist_decode is full" in caught.value.details()
    api.stub.Decode(pb.DecodeRequest(model="vae_mnist", latents=tensor(np.zeros((3, 16), np.float32))))


def test_a_full_sampling_queue_answers_resource_exhausted(connect):
    api = connect(runtime_config=RuntimeConfig(max_waiting_samples=2))
    with pytest.raises(grpc.RpcError) as caught:
        api.stub.Sample(pb.SampleRequest(model="pixelcnn_mnist", num_samples=3, seed=0))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "sampling queue of pixelcnn_mnist_sample is full" in caught.value.details()
    assert images_of(api.stub.Sample(pb.SampleRequest(model="pixelcnn_mnist", num_samples=2, seed=0))).shape[0] == 2


@pytest.mark.parametrize("budget_ms, calls", [(0.0, 28), (60_000.0, 2)])
def test_the_call_budget_sets_the_rows_per_sampling_call(connect, budget_ms, calls):
    # One 28-row image on the fused CPU operators. The engine has no time per row before its first
    # call, so that call runs one row; the budget then sets the rest: 0 → one row per call, a minute →
    # the 27 rows left in one call.
    api = connect(runtime_config=RuntimeConfig(call_budget_ms=budget_ms))
    engine = api.server.runtime.engines["gated_pixelcnn_mnist_sample"]
    assert images_of(api.stub.Sample(pb.SampleRequest(model="gated_pixelcnn_mnist", num_samples=1))).shape[0] == 1
    assert engine.steps_run == calls


def test_messages_over_the_size_limit_are_refused_and_the_server_keeps_serving(connect):
    api = connect(max_message_bytes=16 * 1024)
    with pytest.raises(grpc.RpcError) as caught:  # 32 images = 25 KB in
        api.stub.Score(pb.ScoreRequest(model="vae_mnist", images=tensor(np.zeros((32, 1, 28, 28), np.uint8))))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as caught:  # 32 images = 25 KB out
        api.stub.Sample(pb.SampleRequest(model="vae_mnist", num_samples=32, seed=0))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert images_of(api.stub.Sample(pb.SampleRequest(model="vae_mnist", num_samples=4, seed=0))).shape[0] == 4


def test_an_expired_deadline_frees_the_sampling_slots(connect):
    api = connect()
    engine = api.server.runtime.engines["gated_pixelcnn_mnist_sample"]
    before = engine.steps_run
    count = 1024  # seconds of work even for the fused operators (~3 ms per image on a 2-core CPU)
    with pytest.raises(grpc.RpcError) as caught:
        api.stub.Sample(pb.SampleRequest(model="gated_pixelcnn_mnist", num_samples=count, seed=1), timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: engine.active == 0 and engine.queued_samples == 0)  # idle: it steps no more
    # the engine's own count: fewer steps than finishing the samples takes (one step per row per slot-full)
    batches = -(-count // engine.config.num_slots)
    assert engine.steps_run - before < batches * (engine.spec.length // engine.spec.span)


async def progress_waits() -> list[asyncio.Task]:
    """The server loop's tasks that wait for a stream's next progress update."""
    return [task for task in asyncio.all_tasks() if task.get_coro().__qualname__ == "Queue.get"]


def test_a_cancelled_stream_stops_its_samples(connect):
    api = connect()
    engine = api.server.runtime.engines["gated_pixelcnn_mnist_sample"]
    before = engine.steps_run
    stream = api.stub.SampleStream(pb.SampleRequest(model="gated_pixelcnn_mnist", num_samples=64, seed=2))
    first = next(stream)
    assert first.WhichOneof("event") == "progress" and max(first.progress.rows_done) < 28
    stream.cancel()
    assert wait_until(lambda: engine.active == 0 and engine.queued_samples == 0)  # idle: it steps no more
    assert wait_until(lambda: not api.thread.call(progress_waits()))  # nothing left pending on the loop
    assert engine.steps_run - before < engine.spec.length // engine.spec.span
    assert images_of(api.stub.Sample(pb.SampleRequest(model="gated_pixelcnn_mnist", num_samples=1))).shape[0] == 1
    stream_labels = (("method", "SampleStream"), ("model", "gated_pixelcnn_mnist"))
    assert wait_until(lambda: scrape(api).get(("genserve_requests_total", (("code", "CANCELLED"), *stream_labels))))
    assert scrape(api)[("genserve_requests_in_flight", (("method", "SampleStream"),))] == 0


def test_graceful_shutdown_finishes_in_flight_requests_and_refuses_new_ones():
    server = ServerProcess("--repository", str(REPOSITORY), "--metrics-port", "-1", "--grace", "60").start()
    try:
        channel = grpc.insecure_channel(server.address)
        from genserve.v1 import generative_pb2_grpc as pb_grpc

        stub = pb_grpc.GenerativeStub(channel)
        stream = stub.SampleStream(pb.SampleRequest(model="gated_pixelcnn_mnist", num_samples=64, seed=3))
        first = next(stream)  # the request is in flight
        assert first.WhichOneof("event") == "progress"
        server.process.send_signal(signal.SIGTERM)
        with grpc.insecure_channel(server.address) as fresh:  # new requests are refused...
            with pytest.raises(grpc.RpcError) as caught:
                for _ in range(100):
                    pb_grpc.GenerativeStub(fresh).ListModels(pb.ListModelsRequest(), timeout=5)
                    time.sleep(0.05)
            # Refused either at the connection (UNAVAILABLE) or by the stopping server (CANCELLED).
            assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        rest = list(stream)  # ...while the one in flight still completes
        assert rest[-1].WhichOneof("event") == "result"
        assert images_of(rest[-1].result).shape == (64, 1, 28, 28)
        assert server.process.wait(60) == 0
        channel.close()
    finally:
        server.stop()


def test_a_server_keeps_serving_while_other_requests_fail(connect):
    api = connect()
    errors, answers = [], []

    def bad():
        try:
            api.stub.Score(pb.ScoreRequest(model="vae_mnist", images=tensor(np.full((1, 1, 28, 28), 9, np.uint8))))
        except grpc.RpcError as e:
            errors.append(e.code())

    def good():
        answers.append(images_of(api.stub.Sample(pb.SampleRequest(model="vae_mnist", num_samples=2, seed=8))))

    threads = [threading.Thread(target=f) for f in (bad, good) * 8]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [grpc.StatusCode.INVALID_ARGUMENT] * 8
    assert len(answers) == 8 and all(np.array_equal(a, answers[0]) for a in answers)


def test_shutdown_turns_health_not_serving_and_the_grace_period_ends_what_is_left():
    api = Connected(server_config())
    stopping = threading.Thread(target=api.thread.stop, kwargs={"grace": 3.0})
    # A stopping server refuses new RPCs, health checks included: a Watch opened before sees the change.
    watch = health_pb2_grpc.HealthStub(api.channel).Watch(health_pb2.HealthCheckRequest(service="vae_mnist"),
                                                         timeout=60)
    try:
        # 1,024 PixelCNN++ samples (the most a request may ask for): about 10 s of work on a 2-core CPU on its
        # fused operators, several times the 3 s grace (512 of the Gated PixelCNN's, ~3 ms each, once finished
        # within it), so the grace period ends it
        stream = api.stub.SampleStream(pb.SampleRequest(model="pixelcnn_pp_mnist", num_samples=1024, seed=4))
        assert next(stream).WhichOneof("event") == "progress"
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopping.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # pushed as the shutdown begins
        with pytest.raises(grpc.RpcError) as caught:
            list(stream)  # the grace period ran out: the stream is ended, not left hanging
        assert caught.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        stopping.join(60)
        assert not stopping.is_alive()
    finally:
        if stopping.is_alive():
            stopping.join(60)
        elif api.thread.server is not None:  # stopped before the stop thread started
            api.thread.stop(0)
        api.channel.close()


def test_the_torchscript_backend_serves_the_same_answers(connect):
    from genserve.export.checkpoint import load_checkpoint
    from tests.rounding import assert_within_rounding, rounding_sigma

    api = connect(runtime_config=RuntimeConfig(backend="torchscript"))
    z = np.random.default_rng(3).standard_normal((3, 16)).astype(np.float32)
    decoded = api.stub.Decode(pb.DecodeRequest(model="vae_mnist", latents=tensor(z)))
    model = load_checkpoint("vae_mnist").model
    with torch.inference_mode():
        probs = model.decode(torch.from_numpy(z)).numpy()
    (sigma,) = rounding_sigma(model.decode, [torch.from_numpy(z)])
    got = np.frombuffer(decoded.probabilities.data, np.float32).reshape(probs.shape)
    assert_within_rounding(got, probs, sigma, "probabilities")
    # the sampler's step program runs in TorchScript too: the same images as the ONNX engine's
    onnx = connect()
    request = pb.SampleRequest(model="pixelcnn_mnist", num_samples=2, seed=6)
    assert np.array_equal(images_of(api.stub.Sample(request)), images_of(onnx.stub.Sample(request)))


def test_a_server_fault_answers_internal_without_internal_detail(connect, caplog):
    api = connect()
    batcher = api.server.runtime.batchers["vae_mnist_decode"]

    def broken(requests):
        raise RuntimeError("secret detail /srv/models/vae.onnx")

    batcher.run_merged = broken
    with caplog.at_level("ERROR", logger="genserve.server"), pytest.raises(grpc.RpcError) as caught:
        api.stub.Decode(pb.DecodeRequest(model="vae_mnist", latents=tensor(np.zeros((1, 16), np.float32))))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == "internal error; the server logged the details"
    assert any("secret detail" in r.getMessage() or "secret detail" in str(r.exc_info) for r in caplog.records)
    assert images_of(api.stub.Sample(pb.SampleRequest(model="realnvp_mnist", num_samples=1))).shape[0] == 1
