"""Every exported model, called through a real Triton over gRPC, against eager PyTorch."""

from __future__ import annotations

import queue
import time
from functools import partial

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from genserve.export.checkpoint import load_checkpoint
from genserve.export.data import fixed_held_out, load_mnist5k
from genserve.export.entry_points import entry_points
from genserve.serving.artifacts import load_manifest
from tests.integration.conftest import REPOSITORY
from tests.rounding import assert_within_rounding, rounding_sigma
from tests.unit.test_export import as_list, real_inputs

NP_TO_TRITON = {np.uint8: "UINT8", np.int64: "INT64", np.float32: "FP32"}


def infer_input(name: str, array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), NP_TO_TRITON[array.dtype.type])
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.fixture(scope="module")
def client(triton):
    with grpcclient.InferenceServerClient(triton) as c:
        yield c


def entry_point_models() -> list[str]:
    """Every Triton model of the repository but the samplers (tested on their own below)."""
    return sorted(p.parent.name for p in REPOSITORY.glob("*/genserve.json") if not p.parent.name.endswith("_sample"))


def test_every_model_in_the_repository_is_ready(client):
    names = sorted(p.name for p in REPOSITORY.iterdir() if (p / "config.pbtxt").exists())
    assert names == sorted(
        ["pixelcnn_mnist_logits", "pixelcnn_mnist_sample", "gated_pixelcnn_mnist_logits", "gated_pixelcnn_mnist_sample",
         "vae_mnist_encode", "vae_mnist_decode", "vae_mnist_score", "dcgan_mnist_generate", "dcgan_mnist_discriminate",
         "realnvp_mnist_encode", "realnvp_mnist_decode", "realnvp_mnist_score"]
    )
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert {n: index.get(n) for n in names} == {n: "READY" for n in names}


@pytest.mark.parametrize("triton_name", entry_point_models())
def test_triton_matches_eager_pytorch(triton_name, client):
    manifest = load_manifest(REPOSITORY / triton_name)
    model = load_checkpoint(manifest.model).model
    entry = next(e for e in entry_points(model) if e.name == manifest.entry_point)
    inputs = real_inputs(entry, model, n=5)
    result = client.infer(triton_name, [infer_input(s.name, t.numpy()) for s, t in zip(entry.inputs, inputs)])
    with torch.no_grad():
        eager = as_list(entry.module(*inputs))
    for spec, expected, sigma in zip(entry.outputs, eager, rounding_sigma(entry.module, inputs)):
        got = result.as_numpy(spec.name)
        assert got.shape == expected.shape and got.dtype == expected.dtype, spec.name
        if spec.dtype == torch.uint8:
            assert np.array_equal(got, expected), spec.name
        else:
            assert_within_rounding(got, expected, sigma, f"{triton_name}.{spec.name}")


def sampler_inputs(seed: int, indices: list[int], temperature: float = 1.0, labels: list[int] | None = None):
    n = len(indices)
    inputs = [
        infer_input("seed", np.full((n, 1), seed, np.int64)),
        infer_input("index", np.array(indices, np.int64).reshape(n, 1)),
        infer_input("temperature", np.full((n, 1), temperature, np.float32)),
    ]
    if labels is not None:
        inputs.append(infer_input("labels", np.array(labels, np.int64).reshape(n, 1)))
    return inputs


def execution_counts(client, model: str) -> tuple[int, int]:
    """(model executions, batch rows inferred) from Triton's own statistics."""
    (stats,) = client.get_inference_statistics(model).model_stats
    return stats.execution_count, stats.inference_count


def test_concurrent_sampling_requests_share_the_loop_and_match_eager_sampling(client):
    # Three requests in flight at once: Triton's dynamic batcher hands them to one execute(),
    # which runs a single sampling loop over all four rows (sample 2 of seed 13 alone). Each
    # sample must still be the one its (seed, index) names: pixel values are chosen by inverse
    # CDF on per-sample noise, so runtimes agree unless a noise value lands within float error
    # (~1e-6) of a CDF edge.
    model = load_checkpoint("gated_pixelcnn_mnist").model
    requests = [(11, [0, 1]), (12, [0]), (13, [2])]
    before = execution_counts(client, "gated_pixelcnn_mnist_sample")
    results: queue.Queue = queue.Queue()
    for k, (seed, indices) in enumerate(requests):
        client.async_infer(
            "gated_pixelcnn_mnist_sample", sampler_inputs(seed, indices),
            partial(lambda k, result, error: results.put((k, result, error)), k),
        )
    answers = {}
    for _ in requests:
        k, result, error = results.get(timeout=600)
        assert error is None, error
        answers[k] = result.as_numpy("images")
    # Triton records an execution's statistics after it has sent the responses: read them once all
    # 4 rows are counted (bounded; a missing row fails below).
    give_up = time.monotonic() + 30
    while True:
        executions, rows = (a - b for a, b in zip(execution_counts(client, "gated_pixelcnn_mnist_sample"), before))
        if rows >= 4 or time.monotonic() > give_up:
            break
        time.sleep(0.05)
    # 4 rows in fewer executions than requests: at most the first ran alone, the rest shared a loop.
    assert rows == 4 and executions < len(requests), (executions, rows)
    for k, (seed, indices) in enumerate(requests):
        eager = model.sample(max(indices) + 1, seed)[indices].numpy().astype(np.uint8)
        assert np.array_equal(answers[k], eager), f"request {k} (seed {seed})"


def test_temperature_zero_sampling_is_the_argmax_image(client):
    model = load_checkpoint("pixelcnn_mnist").model
    result = client.infer("pixelcnn_mnist_sample", sampler_inputs(5, [0], temperature=0.0))
    images = torch.from_numpy(result.as_numpy("images").copy()).long()
    with torch.no_grad():
        assert torch.equal(model.logits(images).argmax(dim=1), images)


def test_bad_requests_get_errors_and_the_server_keeps_serving(client):
    z = np.zeros((2, 16), np.float32)
    with pytest.raises(InferenceServerException, match="(?i)shape"):
        client.infer("vae_mnist_decode", [infer_input("z", np.zeros((2, 15), np.float32))])
    with pytest.raises(InferenceServerException, match="(?i)data-type|datatype|dtype"):
        client.infer("vae_mnist_decode", [infer_input("z", z.astype(np.int64))])
    with pytest.raises(InferenceServerException, match="(?i)unknown model|not found"):
        client.infer("no_such_model", [infer_input("z", z)])
    with pytest.raises(InferenceServerException, match="temperature: must be finite and >= 0"):
        client.infer("pixelcnn_mnist_sample", sampler_inputs(1, [0], temperature=-1.0))
    with pytest.raises(InferenceServerException, match="seed: must be >= 0"):
        client.infer("pixelcnn_mnist_sample", sampler_inputs(-3, [0]))
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


def test_exact_log_likelihood_through_triton_matches_eager(client):
    # Scoring = one parallel logits pass: Triton's exact log p(x) for 64 real held-out digits
    # (summed from its logits) agrees with eager PyTorch's.
    held = fixed_held_out(load_mnist5k(), 2)
    images = held.images[:64].numpy()  # the configured max batch size
    logits = client.infer("gated_pixelcnn_mnist_logits", [infer_input("images", images)]).as_numpy("logits")
    targets = torch.from_numpy(images).long()
    nll = torch.nn.functional.cross_entropy(torch.from_numpy(logits.copy()), targets, reduction="none")
    model = load_checkpoint("gated_pixelcnn_mnist").model
    with torch.no_grad():
        eager = -model.log_prob(torch.from_numpy(images))
    # 8 draws, not 16: 64 full-image passes per draw; the t quantile widens the tolerance to match.
    (sigma,) = rounding_sigma(lambda x: -model.log_prob(x), [torch.from_numpy(images)], draws=8)
    assert_within_rounding(nll.flatten(1).sum(1).numpy(), eager.numpy(), sigma, "nll", draws=8)
