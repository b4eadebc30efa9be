"""Every exported model over KServe v2 (tritonclient), against eager PyTorch, on two servers.

The same test code runs against a real tritonserver serving the repository and against genserve's
KServe v2 front end (embedded runtime): a client written for Triton must get the same answers
from both. The samplers are decoupled on both: ModelStreamInfer streams progress, then images.
"""

from __future__ import annotations

import functools
import queue
import re
import time
import urllib.request
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from genserve.export.checkpoint import load_checkpoint
from genserve.export.data import fixed_held_out, load_mnist5k
from genserve.export.entry_points import entry_points
from genserve.export.models.pixel_vae import prior_latents
from genserve.export.steps import cached_sample
from genserve.serving.artifacts import load_manifest
from tests.integration.conftest import REPOSITORY
from tests.integration.server_fixtures import Connected, server_config
from tests.rounding import assert_within_rounding, rounding_sigma
from tests.unit.test_export import as_list, real_inputs

NP_TO_TRITON = {np.uint8: "UINT8", np.int64: "INT64", np.float32: "FP32"}


def infer_input(name: str, array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), NP_TO_TRITON[array.dtype.type])
    tensor.set_data_from_numpy(array)
    return tensor


@dataclass
class V2Server:
    """A server speaking KServe v2: its tritonclient, and its Prometheus endpoint."""

    kind: str
    client: grpcclient.InferenceServerClient
    metrics_url: str


@pytest.fixture(scope="module", params=["triton", "genserve"])
def server(request):
    """The same tests, unchanged, against a real tritonserver and against genserve (embedded runtime)."""
    if request.param == "triton":
        triton = request.getfixturevalue("triton_server")
        url, metrics_port, api = triton.config.grpc_url, triton.config.metrics_port, None
    else:
        api = Connected(server_config())
        url, metrics_port = api.thread.address, api.server.metrics_port
    with grpcclient.InferenceServerClient(url) as c:
        yield V2Server(request.param, c, f"http://127.0.0.1:{metrics_port}/metrics")
    if api is not None:
        api.close()


@pytest.fixture
def client(server):
    return server.client


def entry_point_models() -> list[str]:
    """Every Triton model of the repository but the samplers (tested on their own below)."""
    return sorted(p.parent.name for p in REPOSITORY.glob("*/genserve.json") if not p.parent.name.endswith("_sample"))


def test_every_model_in_the_repository_is_ready(client):
    names = sorted(p.name for p in REPOSITORY.iterdir() if (p / "config.pbtxt").exists())
    assert names == sorted(
        ["pixelcnn_mnist_logits", "pixelcnn_mnist_sample", "gated_pixelcnn_mnist_logits", "gated_pixelcnn_mnist_sample",
         "vae_mnist_encode", "vae_mnist_decode", "vae_mnist_score", "dcgan_mnist_generate", "dcgan_mnist_discriminate",
         "realnvp_mnist_encode", "realnvp_mnist_decode", "realnvp_mnist_score",
         "iaf_vae_mnist_encode", "iaf_vae_mnist_decode", "iaf_vae_mnist_score",
         "aae_mnist_encode", "aae_mnist_decode", "aae_mnist_score",
         "vae_gan_mnist_encode", "vae_gan_mnist_decode", "vae_gan_mnist_score", "vae_gan_mnist_discriminate",
         "flow_gan_mnist_encode", "flow_gan_mnist_decode", "flow_gan_mnist_score", "flow_gan_mnist_discriminate",
         "pixel_vae_mnist_encode", "pixel_vae_mnist_score", "pixel_vae_mnist_logits", "pixel_vae_mnist_sample",
         "maf_mnist_encode", "maf_mnist_score", "maf_mnist_sample", "pixelcnn_pp_mnist_logits",
         "pixelcnn_pp_mnist_sample", "wavenet_speech_logits", "wavenet_speech_sample"]
    )
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert {n: index.get(n) for n in names} == {n: "READY" for n in names}


@functools.cache
def eager_reference(triton_name: str) -> tuple:
    """A model's entry point, real inputs, its eager outputs and their rounding σ: computed once for both
    servers (the σ alone is 17 runs of the model, 16 of them perturbed)."""
    manifest = load_manifest(REPOSITORY / triton_name)
    model = load_checkpoint(manifest.model).model
    entry = next(e for e in entry_points(model) if e.name == manifest.entry_point)
    inputs = real_inputs(entry, model, n=5)
    with torch.no_grad():
        eager = as_list(entry.module(*inputs))
    return entry, inputs, eager, rounding_sigma(entry.module, inputs)


@pytest.mark.parametrize("triton_name", entry_point_models())
def test_triton_matches_eager_pytorch(triton_name, client):
    entry, inputs, eager, sigmas = eager_reference(triton_name)
    result = client.infer(triton_name, [infer_input(s.name, t.numpy()) for s, t in zip(entry.inputs, inputs)])
    for spec, expected, sigma in zip(entry.outputs, eager, sigmas):
        got = result.as_numpy(spec.name)
        assert got.shape == expected.shape and got.dtype == expected.dtype, spec.name
        if spec.dtype == torch.uint8:
            assert np.array_equal(got, expected), spec.name
        else:
            assert_within_rounding(got, expected, sigma, f"{triton_name}.{spec.name}")


def sampler_inputs(seed: int, indices: list[int], temperature: float = 1.0, labels: list[int] | None = None,
                   latents: np.ndarray | None = None):
    n = len(indices)
    inputs = [
        infer_input("seed", np.full((n, 1), seed, np.int64)),
        infer_input("index", np.array(indices, np.int64).reshape(n, 1)),
        infer_input("temperature", np.full((n, 1), temperature, np.float32)),
    ]
    if labels is not None:
        inputs.append(infer_input("labels", np.array(labels, np.int64).reshape(n, 1)))
    if latents is not None:
        inputs.append(infer_input("latents", latents.astype(np.float32)))
    return inputs


class Stream:
    """One ModelStreamInfer stream of a client; responses arrive in order on `answers`."""

    def __init__(self, client) -> None:
        self.client, self.answers = client, queue.Queue()
        client.start_stream(callback=lambda result, error: self.answers.put((result, error)))

    def send(self, model: str, inputs, request_id: str = "", parameters: dict | None = None) -> None:
        self.client.async_stream_infer(model, inputs, request_id=request_id, parameters=parameters)

    def next(self):
        result, error = self.answers.get(timeout=600)
        if error is not None:
            raise error
        return result

    def until_final(self, ids: set[str]) -> dict[str, list]:
        """Every response per request id, until each of `ids` has had its final one."""
        responses: dict[str, list] = {key: [] for key in ids}
        waiting = set(ids)
        while waiting:
            result = self.next()
            response = result.get_response()
            responses[response.id].append(result)
            if response.parameters["triton_final_response"].bool_param:
                waiting.discard(response.id)
        return responses

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)


def sample_stream(client, model: str, inputs) -> list:
    """One sampler request on its own stream: its responses, the final one last."""
    stream = Stream(client)
    try:
        stream.send(model, inputs, "only")
        return stream.until_final({"only"})["only"]
    finally:
        stream.close()


def engine_metric(server: V2Server, name: str, model: str) -> float:
    """One of the sampling engine's metrics, scraped from the server's /metrics as Prometheus would."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    found = re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.MULTILINE)
    assert found, f"{name} for {model} not on {server.metrics_url}"
    return float(found.group(1))


def assert_streamed_rows(responses: list, final: np.ndarray) -> None:
    """Progress responses: rows done rise to 28, done rows already final, the rest zeros; the last is final."""
    flags = [r.get_response().parameters["triton_final_response"].bool_param for r in responses]
    assert flags == [False] * (len(responses) - 1) + [True]
    done = [int(r.as_numpy("rows_done").min()) for r in responses]
    assert len(responses) >= 2 and done == sorted(set(done)) and done[-1] == 28, done
    for r in responses:
        partial, rows = r.as_numpy("images"), r.as_numpy("rows_done")[:, 0]
        for k, row in enumerate(rows):
            assert np.array_equal(partial[k, :, :row], final[k, :, :row]) and not partial[k, :, row:].any()


SAMPLER = "gated_pixelcnn_mnist_sample"


def test_concurrent_sampling_requests_share_the_engine_and_match_eager_sampling(server):
    # Three requests on one stream at once share one engine run. Each sample must still be the one
    # its (seed, index) names: pixel values are chosen by inverse CDF on per-sample noise, so runtimes
    # agree unless a noise value lands within float error (~1e-6) of a CDF edge. The reference is the
    # in-process engine (`cached_sample`), which tests/unit holds equal to naive sampling of this
    # model: naive sampling here would be half a minute of the test.
    model = load_checkpoint("gated_pixelcnn_mnist").model
    requests = {"a": (11, [0, 1]), "b": (12, [0]), "c": (13, [2])}
    runs = engine_metric(server, "genserve_engine_runs_total", SAMPLER)
    stream = Stream(server.client)
    try:
        for key, (seed, indices) in requests.items():
            stream.send(SAMPLER, sampler_inputs(seed, indices), key)
        responses = stream.until_final(set(requests))
    finally:
        stream.close()
    assert engine_metric(server, "genserve_engine_runs_total", SAMPLER) - runs < len(requests)
    for key, (seed, indices) in requests.items():
        final = responses[key][-1].as_numpy("images")
        eager = cached_sample(model, max(indices) + 1, seed)[indices].numpy().astype(np.uint8)
        assert np.array_equal(final, eager), f"request {key} (seed {seed})"
        assert_streamed_rows(responses[key], final)


def test_a_late_request_joins_the_running_engine(server):
    # B is sent once A's first rows are back: it joins A's engine run between steps (one run for
    # both) instead of waiting for A to end, and its images are still its own seed's.
    model = load_checkpoint("gated_pixelcnn_mnist").model
    runs = engine_metric(server, "genserve_engine_runs_total", SAMPLER)
    stream = Stream(server.client)
    try:
        stream.send(SAMPLER, sampler_inputs(21, list(range(48))), "a")
        first = stream.next()
        assert first.get_response().id == "a" and first.as_numpy("rows_done").max() < 28
        stream.send(SAMPLER, sampler_inputs(22, [0, 1]), "b")
        responses = stream.until_final({"a", "b"})
    finally:
        stream.close()
    assert engine_metric(server, "genserve_engine_runs_total", SAMPLER) - runs == 1
    assert responses["a"][-1].as_numpy("images").shape == (48, 1, 28, 28)
    assert np.array_equal(responses["b"][-1].as_numpy("images"), cached_sample(model, 2, 22).numpy().astype(np.uint8))


def test_cancelling_the_stream_frees_the_samples_slots(server):
    finished = engine_metric(server, "genserve_engine_samples_total", SAMPLER)
    stream = Stream(server.client)
    stream.send(SAMPLER, sampler_inputs(31, list(range(64))), "doomed")
    assert stream.next().as_numpy("rows_done").max() < 28  # running: 64 slots busy
    stream.close(cancel=True)
    give_up = time.monotonic() + 30  # bounded: the engine drops the samples at its next step
    while engine_metric(server, "genserve_engine_active_slots", SAMPLER) > 0 and time.monotonic() < give_up:
        time.sleep(0.05)
    assert engine_metric(server, "genserve_engine_active_slots", SAMPLER) == 0
    assert engine_metric(server, "genserve_engine_samples_total", SAMPLER) == finished  # none ran to the end
    assert sample_stream(server.client, SAMPLER, sampler_inputs(32, [0]))[-1].as_numpy("images").shape == \
        (1, 1, 28, 28)  # and the sampler serves the next caller


def test_a_request_without_progress_gets_only_its_final_response(server):
    stream = Stream(server.client)
    try:
        stream.send(SAMPLER, sampler_inputs(41, [0, 1]), "quiet", parameters={"progress": False})
        stream.send(SAMPLER, sampler_inputs(41, [0, 1]), "streamed")
        responses = stream.until_final({"quiet", "streamed"})
        stream.send(SAMPLER, sampler_inputs(41, [0]), "bad", parameters={"progress": "no"})
        with pytest.raises(InferenceServerException, match="parameter progress: must be a bool"):
            stream.next()
    finally:
        stream.close()
    (quiet,), streamed = responses["quiet"], responses["streamed"]
    assert len(streamed) > 1 and quiet.get_response().parameters["triton_final_response"].bool_param
    assert quiet.as_numpy("rows_done")[:, 0].tolist() == [28, 28]
    assert np.array_equal(quiet.as_numpy("images"), streamed[-1].as_numpy("images"))


def test_the_pixel_vae_sampler_draws_from_the_latents_each_sample_brings(client):
    # One request, two kinds of rows: z from the prior (what Sample sends) and z from the encoder (Decode);
    # each sample's image is the decode of its own z with its (seed, index) noise, as the in-process
    # engine draws it (held equal to the model's naive decode in tests/unit).
    model = load_checkpoint("pixel_vae_mnist").model
    with torch.no_grad():
        z = torch.cat([prior_latents(model, 4, [0, 1]), model.encode(torch.ones(1, 1, 28, 28, dtype=torch.long))[0]])
    final = sample_stream(client, "pixel_vae_mnist_sample", sampler_inputs(4, [0, 1, 2], latents=z.numpy()))[-1]
    expected = cached_sample(model, 3, 4, latents=z).numpy().astype(np.uint8)
    assert np.array_equal(final.as_numpy("images"), expected)
    assert np.array_equal(final.as_numpy("images")[:2], cached_sample(model, 2, 4).numpy().astype(np.uint8))
    with pytest.raises(InferenceServerException, match="latents"):  # NaN z: refused, naming the input
        sample_stream(client, "pixel_vae_mnist_sample", sampler_inputs(4, [0], latents=np.full((1, 16), np.nan)))
    assert client.is_model_ready("pixel_vae_mnist_sample")


def test_the_maf_sampler_inverts_the_flow_from_each_samples_latents(client):
    # Its states are float64 (the step graphs' pixel bins must not see float32 rounding): through Triton's
    # Python backend too, the encoded latents of real digits come back as the digits themselves.
    model = load_checkpoint("maf_mnist").model
    digits = fixed_held_out(load_mnist5k(), 256).images[:3]
    with torch.no_grad():
        z, _ = model.encode(digits)
    final = sample_stream(client, "maf_mnist_sample", sampler_inputs(0, [0, 1, 2], latents=z.numpy()))[-1]
    assert np.array_equal(final.as_numpy("images"), digits.numpy())


def test_the_pixelcnn_pp_sampler_draws_what_the_eager_engine_does(client):
    # One pixel per call through three resolutions' row states, inside Triton's Python backend.
    final = sample_stream(client, "pixelcnn_pp_mnist_sample", sampler_inputs(3, [0], temperature=0.9))[-1]
    expected = cached_sample(load_checkpoint("pixelcnn_pp_mnist").model, 1, 3, 0.9)
    assert np.array_equal(final.as_numpy("images"), expected.numpy().astype(np.uint8))


def test_temperature_zero_sampling_is_the_argmax_image(client):
    model = load_checkpoint("pixelcnn_mnist").model
    result = sample_stream(client, "pixelcnn_mnist_sample", sampler_inputs(5, [0], temperature=0.0))[-1]
    images = torch.from_numpy(result.as_numpy("images").copy()).long()
    with torch.no_grad():
        assert torch.equal(model.logits(images).argmax(dim=1), images)


def test_metadata_and_config_describe_the_repository_models(client):
    metadata = client.get_model_metadata(SAMPLER)
    assert (metadata.name, list(metadata.versions), metadata.platform) == (SAMPLER, ["1"], "python")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("images", "UINT8", [-1, 1, 28, 28]), ("rows_done", "INT64", [-1, 1])]
    config = client.get_model_config("vae_mnist_score").config
    assert (config.max_batch_size, config.backend, config.model_transaction_policy.decoupled) == (64, "python", False)
    assert [i.name for i in config.input] == ["images", "eps"]
    assert client.get_model_config(SAMPLER).config.model_transaction_policy.decoupled
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'nope' is not found"):
        client.get_model_metadata("nope")
    assert not client.is_model_ready("nope") and client.is_server_ready()


def test_bad_requests_get_errors_and_the_server_keeps_serving(client):
    z = np.zeros((2, 16), np.float32)
    with pytest.raises(InferenceServerException, match="(?i)shape"):
        client.infer("vae_mnist_decode", [infer_input("z", np.zeros((2, 15), np.float32))])
    with pytest.raises(InferenceServerException, match="(?i)data-type|datatype|dtype"):
        client.infer("vae_mnist_decode", [infer_input("z", z.astype(np.int64))])
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'no_such_model' is not found"):
        client.infer("no_such_model", [infer_input("z", z)])
    with pytest.raises(InferenceServerException, match="temperature: must be finite and >= 0"):
        sample_stream(client, "pixelcnn_mnist_sample", sampler_inputs(1, [0], temperature=-1.0))
    with pytest.raises(InferenceServerException, match="seed: must be >= 0"):
        sample_stream(client, "pixelcnn_mnist_sample", sampler_inputs(-3, [0]))
    with pytest.raises(InferenceServerException, match="ModelInfer RPC doesn't support models with decoupled"):
        client.infer("pixelcnn_mnist_sample", sampler_inputs(1, [0]))
    # A free axis is bounded too: Triton checks rows against max_batch_size, the model checks K.
    images = np.zeros((2, 1, 28, 28), np.uint8)
    eps = np.zeros((2, 1001, 16), np.float32)
    with pytest.raises(InferenceServerException, match="eps: has 1001 entries on axis 1, over the limit of 1000"):
        client.infer("vae_mnist_score", [infer_input("images", images), infer_input("eps", eps)])
    iwae = client.infer("vae_mnist_score", [infer_input("images", images), infer_input("eps", eps[:, :1000])])
    assert iwae.as_numpy("iwae").shape == (2, 1)
    # ...and after all of that, a good request is answered.
    probs = client.infer("vae_mnist_decode", [infer_input("z", z)]).as_numpy("probs")
    assert probs.shape == (2, 1, 28, 28)
    assert client.is_server_live() and client.is_model_ready("pixelcnn_mnist_sample")


def test_conditional_generation_takes_a_label_per_sample(client):
    model = load_checkpoint("dcgan_mnist").model
    z = torch.randn(4, model.config.latent_dim, generator=torch.Generator().manual_seed(0))
    labels = np.array([[0], [3], [7], [9]], np.int64)
    images = client.infer("dcgan_mnist_generate", [infer_input("z", z.numpy()), infer_input("labels", labels)])
    with torch.no_grad():
        expected = model.decode(z, torch.from_numpy(labels[:, 0])).numpy().astype(np.uint8)
    assert np.array_equal(images.as_numpy("images"), expected)


@functools.cache
def held_out_nll() -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """64 real held-out digits (the configured max batch size), the Gated PixelCNN's eager -log p(x) of
    each and its rounding σ, computed once for both servers."""
    images = fixed_held_out(load_mnist5k(), 2).images[:64].numpy()
    model = load_checkpoint("gated_pixelcnn_mnist").model
    with torch.no_grad():
        eager = -model.log_prob(torch.from_numpy(images))
    # 8 draws, not 16: 64 full-image passes per draw; the t quantile widens the tolerance to match.
    (sigma,) = rounding_sigma(lambda x: -model.log_prob(x), [torch.from_numpy(images)], draws=8)
    return images, eager, sigma


def test_exact_log_likelihood_through_triton_matches_eager(client):
    # Scoring = one parallel logits pass: Triton's exact log p(x) for 64 real held-out digits
    # (summed from its logits) agrees with eager PyTorch's.
    images, eager, sigma = held_out_nll()
    logits = client.infer("gated_pixelcnn_mnist_logits", [infer_input("images", images)]).as_numpy("logits")
    targets = torch.from_numpy(images).long()
    nll = torch.nn.functional.cross_entropy(torch.from_numpy(logits.copy()), targets, reduction="none")
    assert_within_rounding(nll.flatten(1).sum(1).numpy(), eager.numpy(), sigma, "nll", draws=8)
