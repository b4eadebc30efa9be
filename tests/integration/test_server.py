"""The gRPC API conformance suite: the same tests against both runtimes.

`embedded` runs the models in the server's process; `triton` forwards every entry point to a
real tritonserver (the session's `triton` fixture) over gRPC. Expected values come from the
eager PyTorch models' own methods (sample, encode, decode, scores) on real MNIST digits, so a
served answer must equal what the model itself says, whichever runtime computed it.
"""

from __future__ import annotations

import functools
import math

import grpc
import numpy as np
import pytest
import torch

from genserve.export.data import fixed_held_out, load_mnist5k
from genserve.export.steps import cached_sample
from genserve.v1 import generative_pb2 as pb
from tests.integration.server_fixtures import images_of, tensor
from tests.rounding import assert_within_rounding, rounding_sigma


@pytest.fixture(scope="module")
def digits(shipped):
    """Real held-out MNIST digits in each model's pixel levels: name → uint8 (8, 1, 28, 28)."""
    dataset = load_mnist5k()
    return lambda levels: fixed_held_out(dataset, levels).images[:8].numpy()


@pytest.fixture(scope="module")
def naive_gated_samples(shipped):
    """Samples 0-1 of seed 11 by the naive reference loop (one full forward per pixel): the ground truth."""
    return shipped("gated_pixelcnn_mnist").model.sample(2, 11, 1.0).numpy()


def as_array(t: pb.Tensor) -> np.ndarray:
    dtype = {pb.DATA_TYPE_UINT8: np.uint8, pb.DATA_TYPE_INT64: np.int64, pb.DATA_TYPE_FLOAT32: np.float32}[t.dtype]
    return np.frombuffer(t.data, dtype=dtype).reshape(tuple(t.shape))


# ---- discovery -----------------------------------------------------------------------------------
def test_list_models_names_every_model_with_its_family_capabilities(api):
    models = {m.name: m for m in api.stub.ListModels(pb.ListModelsRequest()).models}
    C = pb.Capability
    assert {n: (m.family, [C.Name(c) for c in m.capabilities]) for n, m in models.items()} == {
        "dcgan_mnist": ("dcgan", ["CAPABILITY_SAMPLE", "CAPABILITY_DECODE", "CAPABILITY_SCORE"]),
        "gated_pixelcnn_mnist": ("gated_pixelcnn", ["CAPABILITY_SAMPLE", "CAPABILITY_SCORE"]),
        "flow_gan_mnist": ("flow_gan", ["CAPABILITY_SAMPLE", "CAPABILITY_ENCODE", "CAPABILITY_DECODE",
                                        "CAPABILITY_SCORE"]),
        "vae_gan_mnist": ("vae_gan", ["CAPABILITY_SAMPLE", "CAPABILITY_ENCODE", "CAPABILITY_DECODE",
                                      "CAPABILITY_SCORE"]),
        "aae_mnist": ("aae", ["CAPABILITY_SAMPLE", "CAPABILITY_ENCODE", "CAPABILITY_DECODE", "CAPABILITY_SCORE"]),
        "iaf_vae_mnist": ("iaf_vae", ["CAPABILITY_SAMPLE", "CAPABILITY_ENCODE", "CAPABILITY_DECODE",
                                      "CAPABILITY_SCORE"]),
        "pixelcnn_mnist": ("pixelcnn", ["CAPABILITY_SAMPLE", "CAPABILITY_SCORE"]),
        "realnvp_mnist": ("realnvp", ["CAPABILITY_SAMPLE", "CAPABILITY_ENCODE", "CAPABILITY_DECODE",
                                      "CAPABILITY_SCORE"]),
        "vae_mnist": ("vae", ["CAPABILITY_SAMPLE", "CAPABILITY_ENCODE", "CAPABILITY_DECODE", "CAPABILITY_SCORE"]),
        "pixel_vae_mnist": ("pixel_vae", ["CAPABILITY_SAMPLE", "CAPABILITY_ENCODE", "CAPABILITY_DECODE",
                                          "CAPABILITY_SCORE"]),
        "maf_mnist": ("maf", ["CAPABILITY_SAMPLE", "CAPABILITY_ENCODE", "CAPABILITY_DECODE", "CAPABILITY_SCORE"]),
        "pixelcnn_pp_mnist": ("pixelcnn_pp", ["CAPABILITY_SAMPLE", "CAPABILITY_SCORE"]),
        "wavenet_speech": ("wavenet", ["CAPABILITY_SAMPLE", "CAPABILITY_SCORE"]),
    }
    assert all(m.ready for m in models.values())
    vae = api.stub.GetModel(pb.GetModelRequest(model="vae_mnist"))
    assert (list(vae.image_shape), vae.pixel_levels, list(vae.latent_shape), vae.HasField("num_classes")) == \
        ([1, 28, 28], 2, [16], False)
    dcgan = api.stub.GetModel(pb.GetModelRequest(model="dcgan_mnist"))
    assert (dcgan.num_classes, list(dcgan.latent_shape)) == (10, [64])


# ---- sampling ------------------------------------------------------------------------------------
def test_gated_pixelcnn_samples_equal_the_naive_reference_loop(api, naive_gated_samples):
    response = api.stub.Sample(pb.SampleRequest(model="gated_pixelcnn_mnist", num_samples=2, seed=11))
    assert response.seed == 11
    np.testing.assert_array_equal(images_of(response), naive_gated_samples)


def test_pixelcnn_pp_samples_equal_the_eager_engines(api, shipped):
    # Naive sampling of the shipped 256-level model is 784 full passes per image (a minute here); the
    # served images (ONNX or TorchScript step graphs) are checked against the same step program run
    # eagerly, and that program against naive sampling in tests/unit (exactly, on tiny models; within
    # rounding, teacher-forced, on this one).
    response = api.stub.Sample(pb.SampleRequest(model="pixelcnn_pp_mnist", num_samples=2, seed=5, temperature=0.9))
    expected = cached_sample(shipped("pixelcnn_pp_mnist").model, 2, 5, 0.9)
    np.testing.assert_array_equal(images_of(response), expected.numpy())


@pytest.mark.parametrize("model, temperature, labels", [
    ("pixelcnn_mnist", 0.8, []), ("vae_mnist", 1.0, []), ("vae_mnist", 0.5, []), ("dcgan_mnist", 0.7, [3, 1, 4]),
    ("realnvp_mnist", 0.6, []), ("iaf_vae_mnist", 0.8, []), ("aae_mnist", 1.0, []),
    ("vae_gan_mnist", 0.9, []), ("flow_gan_mnist", 0.7, []), ("pixel_vae_mnist", 0.8, []),
    ("maf_mnist", 0.7, []),
])
def test_samples_equal_the_models_own(api, shipped, model, temperature, labels):
    response = api.stub.Sample(pb.SampleRequest(model=model, num_samples=3, seed=5, temperature=temperature,
                                                labels=labels))
    expected = shipped(model).model.sample(3, 5, temperature, torch.tensor(labels) if labels else None)
    np.testing.assert_array_equal(images_of(response), expected.numpy())
    assert list(response.labels) == labels


def test_a_sample_is_the_same_alone_as_inside_a_bigger_request(api):
    whole = images_of(api.stub.Sample(pb.SampleRequest(model="pixelcnn_mnist", num_samples=4, seed=3)))
    alone = images_of(api.stub.Sample(pb.SampleRequest(model="pixelcnn_mnist", num_samples=1, seed=3, start_index=2)))
    np.testing.assert_array_equal(alone[0], whole[2])


def test_an_unseeded_request_reports_its_seed_and_the_seed_reproduces_it(api):
    first = api.stub.Sample(pb.SampleRequest(model="vae_mnist", num_samples=2))
    again = api.stub.Sample(pb.SampleRequest(model="vae_mnist", num_samples=2, seed=first.seed))
    np.testing.assert_array_equal(images_of(first), images_of(again))


def test_a_conditional_model_cycles_labels_when_none_are_given(api, shipped):
    response = api.stub.Sample(pb.SampleRequest(model="dcgan_mnist", num_samples=12, seed=2))
    assert list(response.labels) == [k % 10 for k in range(12)]
    expected = shipped("dcgan_mnist").model.sample(12, 2, 1.0, torch.arange(12) % 10)
    np.testing.assert_array_equal(images_of(response), expected.numpy())


def test_png_bytes_decode_to_the_images(api):
    from io import BytesIO

    from PIL import Image

    response = api.stub.Sample(pb.SampleRequest(model="vae_mnist", num_samples=2, seed=4, return_png=True))
    images = images_of(response)
    assert len(response.png) == 2
    for png, image in zip(response.png, images):
        np.testing.assert_array_equal(np.asarray(Image.open(BytesIO(png))), image[0] * 255)


def test_sample_stream_reports_rows_then_the_same_images_as_sample(api):
    request = pb.SampleRequest(model="gated_pixelcnn_mnist", num_samples=2, seed=11)
    messages = list(api.stub.SampleStream(request))
    assert messages[-1].WhichOneof("event") == "result"
    final = images_of(messages[-1].result)
    np.testing.assert_array_equal(final, images_of(api.stub.Sample(request)))
    progress = [m.progress for m in messages[:-1]]
    assert all(m.WhichOneof("event") == "progress" for m in messages[:-1])
    for p in progress:  # completed rows are final; the rest are still zeros
        rows, partial = list(p.rows_done), as_array(p.partial_images)
        assert p.rows_total == 28
        for k, r in enumerate(rows):
            np.testing.assert_array_equal(partial[k, :, :r], final[k, :, :r])
            assert not partial[k, :, r:].any()
    done = [min(p.rows_done) for p in progress]
    assert done == sorted(done)
    assert len(progress) >= 2 and done[-1] == 28  # rows arrive as they finish (streamed from Triton's sampler too)


def test_sample_stream_of_a_one_pass_model_sends_only_the_result(api):
    messages = list(api.stub.SampleStream(pb.SampleRequest(model="realnvp_mnist", num_samples=2, seed=1)))
    assert [m.WhichOneof("event") for m in messages] == ["result"]


# ---- encode / decode / score ---------------------------------------------------------------------
def test_vae_encode_and_decode_equal_the_models_own(api, shipped, digits):
    model = shipped("vae_mnist").model
    x = digits(2)
    response = api.stub.Encode(pb.EncodeRequest(model="vae_mnist", images=tensor(x)))
    with torch.inference_mode():
        mean, log_var = model.encode(torch.from_numpy(x))
        probs = model.decode(mean).numpy()
    sigma_mean, sigma_log_var = rounding_sigma(model.encode, [torch.from_numpy(x)])
    assert_within_rounding(as_array(response.latents), mean.numpy(), sigma_mean, "latents")
    assert_within_rounding(as_array(response.log_var), log_var.numpy(), sigma_log_var, "log_var")
    assert not response.HasField("log_det")
    decoded = api.stub.Decode(pb.DecodeRequest(model="vae_mnist", latents=response.latents))
    (sigma_probs,) = rounding_sigma(model.decode, [torch.from_numpy(as_array(response.latents).copy())])
    assert_within_rounding(as_array(decoded.probabilities), probs, sigma_probs, "probabilities")
    np.testing.assert_array_equal(images_of(decoded), (probs > 0.5).astype(np.uint8))


def test_pixel_vae_encodes_then_decodes_pixel_by_pixel_from_the_given_latents_and_seed(api, shipped, digits):
    # Encode is the VAE's posterior; Decode runs the sampling engine over the PixelCNN decoder with
    # the given z, drawing pixels from the request's seed: the model's own naive decode of that z.
    model = shipped("pixel_vae_mnist").model
    x = digits(2)[:3]
    response = api.stub.Encode(pb.EncodeRequest(model="pixel_vae_mnist", images=tensor(x)))
    with torch.inference_mode():
        mean, _ = model.encode(torch.from_numpy(x))
    (sigma_mean, _) = rounding_sigma(model.encode, [torch.from_numpy(x)])
    assert_within_rounding(as_array(response.latents), mean.numpy(), sigma_mean, "latents")
    latents = as_array(response.latents).copy()
    decoded = api.stub.Decode(pb.DecodeRequest(model="pixel_vae_mnist", latents=response.latents, seed=8))
    assert not decoded.HasField("probabilities")
    np.testing.assert_array_equal(images_of(decoded), model.decode(torch.from_numpy(latents), seed=8).numpy())
    again = api.stub.Decode(pb.DecodeRequest(model="pixel_vae_mnist", latents=response.latents, seed=9))
    assert not np.array_equal(images_of(again), images_of(decoded))  # another seed, other pixel draws
    # z carries the digit: reconstructions agree with their inputs far more than with other digits
    same = (images_of(decoded) == x).mean()
    shuffled = (images_of(decoded) == x[[1, 2, 0]]).mean()
    assert same > shuffled, (same, shuffled)


def test_iaf_vae_encode_gives_the_flowed_code_and_its_log_density(api, shipped, digits):
    model = shipped("iaf_vae_mnist").model
    x = digits(2)
    response = api.stub.Encode(pb.EncodeRequest(model="iaf_vae_mnist", images=tensor(x)))
    with torch.inference_mode():
        z, log_q = model.encode(torch.from_numpy(x))
    sigma_z, sigma_log_q = rounding_sigma(model.encode, [torch.from_numpy(x)])
    assert_within_rounding(as_array(response.latents), z.numpy(), sigma_z, "latents")
    assert_within_rounding(as_array(response.log_density), log_q.numpy(), sigma_log_q, "log_density")
    assert not response.HasField("log_var") and not response.HasField("log_det")


def test_aae_encode_gives_the_code_and_decode_its_pixel_probabilities(api, shipped, digits):
    model = shipped("aae_mnist").model
    x = digits(2)
    response = api.stub.Encode(pb.EncodeRequest(model="aae_mnist", images=tensor(x)))
    with torch.inference_mode():
        z = model.encode(torch.from_numpy(x))
    (sigma_z,) = rounding_sigma(lambda images: [model.encode(images)], [torch.from_numpy(x)])
    assert_within_rounding(as_array(response.latents), z.numpy(), sigma_z, "latents")
    assert not any(response.HasField(f) for f in ("log_var", "log_det", "log_density"))
    decoded = api.stub.Decode(pb.DecodeRequest(model="aae_mnist", latents=response.latents))
    latents = torch.from_numpy(as_array(response.latents).copy())
    with torch.inference_mode():
        probs = model.decode(latents).numpy()
    (sigma_probs,) = rounding_sigma(lambda z: [model.decode(z)], [latents])
    assert_within_rounding(as_array(decoded.probabilities), probs, sigma_probs, "probabilities")


@pytest.mark.parametrize("name", ["realnvp_mnist", "flow_gan_mnist", "maf_mnist"])  # MAF: Decode in the engine
def test_flow_encode_decode_round_trips_real_digits(api, shipped, digits, name):
    model = shipped(name).model
    x = digits(256)
    response = api.stub.Encode(pb.EncodeRequest(model=name, images=tensor(x)))
    with torch.inference_mode():
        z, log_det = model.encode(torch.from_numpy(x))
    sigma_z, sigma_log_det = rounding_sigma(model.encode, [torch.from_numpy(x)])
    assert_within_rounding(as_array(response.latents), z.numpy(), sigma_z, "latents")
    assert_within_rounding(as_array(response.log_det), log_det.numpy(), sigma_log_det, "log_det")
    decoded = api.stub.Decode(pb.DecodeRequest(model=name, latents=response.latents))
    np.testing.assert_array_equal(images_of(decoded), x)  # bin centres invert exactly to the pixels


def test_a_request_over_the_max_batch_size_is_split_and_answered_whole(api, shipped):
    # 100 latents: over the entry point's max batch of 64 (Triton refuses such a batch; genserve splits it)
    model = shipped("vae_mnist").model
    z = np.random.default_rng(4).standard_normal((100, 16)).astype(np.float32)
    decoded = api.stub.Decode(pb.DecodeRequest(model="vae_mnist", latents=tensor(z)))
    with torch.inference_mode():
        probs = model.decode(torch.from_numpy(z)).numpy()
    (sigma,) = rounding_sigma(model.decode, [torch.from_numpy(z)])
    assert_within_rounding(as_array(decoded.probabilities), probs, sigma, "probabilities")


def test_dcgan_decode_is_the_generator_on_given_latents(api, shipped):
    z = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    response = api.stub.Decode(pb.DecodeRequest(model="dcgan_mnist", latents=tensor(z), labels=[7]))
    with torch.inference_mode():
        expected = shipped("dcgan_mnist").model.decode(torch.from_numpy(z), torch.tensor([7, 7, 7]))
    np.testing.assert_array_equal(images_of(response), expected.numpy())


@pytest.fixture(scope="module")
def eager_scores(shipped, digits):
    """name → (8 digits, their labels, the model's own scores of them, each score's rounding σ): once per
    model for both runtimes (the σ alone is 17 runs of the model's scoring)."""

    @functools.cache
    def reference(name: str):
        m = shipped(name).model
        x = digits(m.config.pixel_levels)
        labels = [int(v) for v in np.arange(8) % 10] if m.config.num_classes else []

        def scores(images):
            return m.scores(images, torch.tensor(labels) if labels else None, seed=3)

        with torch.inference_mode():
            expected = scores(torch.from_numpy(x))
        return x, labels, expected, rounding_sigma(lambda images: [s.values for s in scores(images)],
                                                   [torch.from_numpy(x)])

    return reference


@pytest.mark.parametrize("model", ["pixelcnn_mnist", "gated_pixelcnn_mnist", "vae_mnist", "realnvp_mnist",
                                   "dcgan_mnist", "iaf_vae_mnist", "aae_mnist", "vae_gan_mnist",
                                   "flow_gan_mnist", "maf_mnist", "pixelcnn_pp_mnist"])  # pixel_vae_mnist: below
def test_scores_equal_the_models_own_with_methods_named(api, eager_scores, model):
    x, labels, expected, sigmas = eager_scores(model)
    response = api.stub.Score(pb.ScoreRequest(model=model, images=tensor(x), labels=labels, seed=3))
    assert [s.method for s in response.scores] == [e.method for e in expected]
    for got, want, sigma in zip(response.scores, expected, sigmas):
        assert_within_rounding(got.values, want.values.numpy(), sigma, want.method)
        if want.is_likelihood:
            kind = "SCORE_KIND_LOWER_BOUND" if want.is_bound else "SCORE_KIND_EXACT"
            np.testing.assert_allclose(got.bits_per_dim, -np.asarray(got.values) / (math.log(2) * 784))
        else:
            kind = "SCORE_KIND_NOT_A_LIKELIHOOD"
            assert list(got.bits_per_dim) == []
        assert pb.ScoreKind.Name(got.kind) == kind


@pytest.fixture(scope="module")
def eager_bounds(shipped, digits):
    """name → (3 digits, the model's ELBO and IWAE at K = 7 of them, their rounding σ), once per model.

    (The PixelVAE's default K = 100 costs 100 PixelCNN passes per image, times the rounding model's
    16 perturbed runs: its Score is checked here, at K = 7.)"""

    @functools.cache
    def reference(name: str):
        x = digits(2)[:3]
        model = shipped(name).model
        with torch.inference_mode():
            elbo, iwae = model.bounds(torch.from_numpy(x), 7, seed=0)
        sigmas = rounding_sigma(lambda images: [b.values for b in model.bounds(images, 7, seed=0)],
                                [torch.from_numpy(x)])
        return x, elbo.values.numpy(), iwae.values.numpy(), sigmas

    return reference


@pytest.mark.parametrize("name", ["vae_mnist", "iaf_vae_mnist", "vae_gan_mnist", "pixel_vae_mnist"])
def test_vae_score_takes_the_number_of_importance_samples(api, eager_bounds, name):
    x, elbo, iwae, (sigma_elbo, sigma) = eager_bounds(name)
    response = api.stub.Score(pb.ScoreRequest(model=name, images=tensor(x), importance_samples=7))
    assert [s.method for s in response.scores][:2] == ["elbo", "iwae-7"]
    assert_within_rounding(response.scores[0].values, elbo, sigma_elbo, "elbo")
    assert_within_rounding(response.scores[1].values, iwae, sigma, "iwae-7")


# ---- client mistakes: one test per branch, and the server keeps serving ---------------------------
def _u8(shape, value=0):
    return tensor(np.full(shape, value, dtype=np.uint8))


BAD_REQUESTS = {
    "unknown model": ("Sample", pb.SampleRequest(model="nope", num_samples=1), "NOT_FOUND", "'nope'"),
    "no model named": ("Sample", pb.SampleRequest(num_samples=1), "INVALID_ARGUMENT", "model"),
    "missing capability": ("Encode", pb.EncodeRequest(model="gated_pixelcnn_mnist", images=_u8((1, 1, 28, 28))),
                           "NOT_FOUND", "'encode'"),
    "zero samples": ("Sample", pb.SampleRequest(model="vae_mnist", num_samples=0), "INVALID_ARGUMENT", "num_samples"),
    "negative samples": ("Sample", pb.SampleRequest(model="vae_mnist", num_samples=-3), "INVALID_ARGUMENT",
                         "num_samples"),
    "too many samples": ("Sample", pb.SampleRequest(model="vae_mnist", num_samples=5000), "RESOURCE_EXHAUSTED",
                         "num_samples"),
    "negative temperature": ("Sample", pb.SampleRequest(model="vae_mnist", num_samples=1, temperature=-1),
                             "INVALID_ARGUMENT", "temperature"),
    "NaN temperature": ("Sample", pb.SampleRequest(model="vae_mnist", num_samples=1, temperature=float("nan")),
                        "INVALID_ARGUMENT", "temperature"),
    "infinite temperature": ("Sample", pb.SampleRequest(model="vae_mnist", num_samples=1, temperature=float("inf")),
                             "INVALID_ARGUMENT", "temperature"),
    "start_index overflowing 2**63": ("Sample", pb.SampleRequest(model="vae_mnist", num_samples=2,
                                                                 start_index=2**63 - 1), "INVALID_ARGUMENT",
                                      "start_index"),
    "score seed too large": ("Score", pb.ScoreRequest(model="vae_mnist", images=_u8((1, 1, 28, 28)), seed=2**63),
                             "INVALID_ARGUMENT", "seed"),
    "seed too large": ("Sample", pb.SampleRequest(model="vae_mnist", num_samples=1, seed=2**63), "INVALID_ARGUMENT",
                       "seed"),
    "label out of range": ("Sample", pb.SampleRequest(model="dcgan_mnist", num_samples=2, labels=[3, 10]),
                           "INVALID_ARGUMENT", "labels"),
    "wrong number of labels": ("Sample", pb.SampleRequest(model="dcgan_mnist", num_samples=3, labels=[1, 2]),
                               "INVALID_ARGUMENT", "labels"),
    "labels for an unconditional model": ("Sample", pb.SampleRequest(model="vae_mnist", num_samples=1, labels=[1]),
                                          "INVALID_ARGUMENT", "labels"),
    "missing labels to score": ("Score", pb.ScoreRequest(model="dcgan_mnist", images=_u8((2, 1, 28, 28))),
                                "INVALID_ARGUMENT", "labels"),
    "wrong dtype": ("Score", pb.ScoreRequest(model="vae_mnist", images=tensor(np.zeros((1, 1, 28, 28), np.float32))),
                    "INVALID_ARGUMENT", "images.dtype"),
    "wrong shape": ("Score", pb.ScoreRequest(model="vae_mnist", images=_u8((1, 1, 27, 28))), "INVALID_ARGUMENT",
                    "images.shape"),
    "empty batch": ("Score", pb.ScoreRequest(model="vae_mnist", images=pb.Tensor(
        shape=[0, 1, 28, 28], dtype=pb.DATA_TYPE_UINT8)), "INVALID_ARGUMENT", "images.shape"),
    "wrong byte length": ("Score", pb.ScoreRequest(model="vae_mnist", images=pb.Tensor(
        shape=[1, 1, 28, 28], dtype=pb.DATA_TYPE_UINT8, data=b"\0" * 783)), "INVALID_ARGUMENT", "images.data"),
    "pixel out of range": ("Score", pb.ScoreRequest(model="vae_mnist", images=_u8((1, 1, 28, 28), 2)),
                           "INVALID_ARGUMENT", "images.data"),
    "no images": ("Encode", pb.EncodeRequest(model="vae_mnist"), "INVALID_ARGUMENT", "images.dtype"),
    "NaN latents": ("Decode", pb.DecodeRequest(model="vae_mnist", latents=tensor(np.full((1, 16), np.nan, np.float32))),
                    "INVALID_ARGUMENT", "latents.data"),
    "infinite latents": ("Decode", pb.DecodeRequest(model="realnvp_mnist", latents=tensor(
        np.full((1, 1, 28, 28), np.inf, np.float32))), "INVALID_ARGUMENT", "latents.data"),
    "decode seed too large": ("Decode", pb.DecodeRequest(model="pixel_vae_mnist", seed=2**63, latents=tensor(
        np.zeros((1, 16), np.float32))), "INVALID_ARGUMENT", "seed"),
    "pixel_vae latents of the wrong size": ("Decode", pb.DecodeRequest(model="pixel_vae_mnist", latents=tensor(
        np.zeros((2, 8), np.float32))), "INVALID_ARGUMENT", "latents.shape"),
    "wrong latent size": ("Decode", pb.DecodeRequest(model="vae_mnist", latents=tensor(np.zeros((1, 15), np.float32))),
                          "INVALID_ARGUMENT", "latents.shape"),
    "too many images": ("Score", pb.ScoreRequest(model="vae_mnist", images=_u8((1025, 1, 28, 28))),
                        "RESOURCE_EXHAUSTED", "images.shape[0]"),
    "importance samples for a non-VAE": ("Score", pb.ScoreRequest(model="realnvp_mnist", images=_u8((1, 1, 28, 28)),
                                                                  importance_samples=5),
                                         "INVALID_ARGUMENT", "importance_samples"),
    "zero importance samples": ("Score", pb.ScoreRequest(model="vae_mnist", images=_u8((1, 1, 28, 28)),
                                                         importance_samples=0), "INVALID_ARGUMENT",
                                "importance_samples"),
    "too many importance samples": ("Score", pb.ScoreRequest(model="vae_mnist", images=_u8((1, 1, 28, 28)),
                                                             importance_samples=1001), "INVALID_ARGUMENT",
                                    "importance_samples"),
    "images x importance samples over the budget": (
        "Score", pb.ScoreRequest(model="vae_mnist", images=_u8((66, 1, 28, 28)), importance_samples=1000),
        "RESOURCE_EXHAUSTED", "--max-importance-work"),
    "too many samples names its flag": ("Sample", pb.SampleRequest(model="vae_mnist", num_samples=5000),
                                        "RESOURCE_EXHAUSTED", "--max-samples-per-request"),
    # shapes whose element count overflows 64 bits, with no data: refused, not a numpy error
    "score images shape overflowing int64": ("Score", pb.ScoreRequest(model="vae_mnist", images=pb.Tensor(
        shape=[2**60, 1, 28, 28], dtype=pb.DATA_TYPE_UINT8)), "INVALID_ARGUMENT", "images.data"),
    "encode images shape overflowing int64": ("Encode", pb.EncodeRequest(model="realnvp_mnist", images=pb.Tensor(
        shape=[2**60, 1, 28, 28], dtype=pb.DATA_TYPE_UINT8)), "INVALID_ARGUMENT", "images.data"),
    "decode latents shape overflowing int64": ("Decode", pb.DecodeRequest(model="vae_mnist", latents=pb.Tensor(
        shape=[2**62, 16], dtype=pb.DATA_TYPE_FLOAT32)), "INVALID_ARGUMENT", "latents.data"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_client_mistake_gets_its_status_naming_the_field_and_the_server_keeps_serving(api, case):
    method, request, code, named = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as caught:
        getattr(api.stub, method)(request)
    assert caught.value.code().name == code, caught.value.details()
    assert named in caught.value.details()
    assert images_of(api.stub.Sample(pb.SampleRequest(model="vae_mnist", num_samples=1, seed=0))).shape == \
        (1, 1, 28, 28)


@pytest.mark.parametrize("method", ["ListModels", "GetModel", "Sample", "SampleStream", "Encode", "Decode", "Score"])
def test_bytes_that_are_not_the_request_message_are_an_invalid_argument(api, method):
    # b"\xff": a field tag with no value. gRPC itself would answer UNKNOWN with a Python class name.
    raw = api.channel.unary_stream if method == "SampleStream" else api.channel.unary_unary
    call = raw(f"/genserve.v1.Generative/{method}", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        result = call(b"\xff", timeout=10)
        list(result) if method == "SampleStream" else result
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("request: the bytes do not parse as a genserve.v1.")
    assert "Error" not in caught.value.details()  # no Python exception names
    assert api.stub.GetModel(pb.GetModelRequest(model="vae_mnist")).name == "vae_mnist"


def test_a_deadline_shorter_than_the_work_ends_deadline_exceeded(api):
    # 128 Gated PixelCNN images: ~0.4 s of work on a 2-core CPU even for the fused operators, 8 times the deadline
    with pytest.raises(grpc.RpcError) as caught:
        api.stub.Sample(pb.SampleRequest(model="gated_pixelcnn_mnist", num_samples=128, seed=1), timeout=0.05)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert api.stub.Sample(pb.SampleRequest(model="pixelcnn_mnist", num_samples=1, seed=1)).images.shape[0] == 1
