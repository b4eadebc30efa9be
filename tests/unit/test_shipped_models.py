"""The shipped checkpoints: they load, their cards tell the truth, and they are good enough."""

from __future__ import annotations

import pytest
import torch

from genserve.export.checkpoint import SHIPPED_DIR
from genserve.export.data import fixed_held_out, load_dataset, load_mnist5k
from genserve.export.evaluation import AUDIO_CARD_SAMPLES, evaluate
from genserve.export.quality.fid import FIDConfig, sample_fid
from tests.conftest import SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_is_weights_only_with_a_card(name, shipped):
    folder = SHIPPED_DIR / name
    checkpoint = shipped(name)
    audio = checkpoint.model.config.modality == "audio"
    wavs = [f"samples-{k}.wav" for k in range(AUDIO_CARD_SAMPLES)] if audio else []
    expected = sorted(["MODEL_CARD.md", "config.json", "model.safetensors", "samples.png", *wavs])
    assert sorted(p.name for p in folder.iterdir()) == expected
    assert checkpoint.training["data"] == ("spoken_digits" if audio else "mnist5k")
    assert checkpoint.training["command"].startswith("genserve train")
    assert checkpoint.metrics, "evaluate --card was not run"
    if not audio:  # FID compares digit images
        assert checkpoint.metrics["fid"]["samples"] == 1000, "evaluate --card --fid was not run"


@pytest.mark.parametrize("name", ["pixelcnn_mnist", "gated_pixelcnn_mnist", "realnvp_mnist", "dcgan_mnist",
                                  "wavenet_speech"])
def test_recorded_held_out_figures_are_reproduced(name, shipped):
    # The VAE is left out only for time (its IWAE-100 takes ~20 s); its bounds are tested elsewhere.
    checkpoint = shipped(name)
    recorded = {k: v for k, v in checkpoint.metrics.items() if k != "fid"}
    assert evaluate(checkpoint, progress=False) == recorded


@pytest.mark.parametrize("name", ["dcgan_mnist", "gated_pixelcnn_mnist"])
def test_recorded_fid_is_reproduced(name, shipped):
    checkpoint = shipped(name)
    recorded = checkpoint.metrics["fid"]
    measured = sample_fid(checkpoint, FIDConfig(samples=recorded["samples"], seed=recorded["seed"]), progress=False)
    # Samples are float32 network outputs rounded to pixels: CPUs whose float32 kernels round differently
    # can flip a few pixels (4 pixels of the 64-image DCGAN grid differed between two machines), which
    # moves the distance far less than 1%.
    assert measured["fid"] == pytest.approx(recorded["fid"], rel=0.01)


def test_iaf_posterior_tightens_both_bounds_of_the_plain_vae(shipped):
    held_out = fixed_held_out(load_mnist5k(), 2).images[:100]
    with torch.inference_mode():
        vae = [s.values.mean() for s in shipped("vae_mnist").model.bounds(held_out, 20, seed=0)]
        iaf = [s.values.mean() for s in shipped("iaf_vae_mnist").model.bounds(held_out, 20, seed=0)]
    assert iaf[0] > vae[0] and iaf[1] > vae[1]  # ELBO and IWAE-20, nats: higher is tighter
    recorded = [shipped(name).metrics["iwae-100"]["nll_nats"] for name in ("iaf_vae_mnist", "vae_mnist")]
    assert recorded[0] < recorded[1]


def test_gated_pixelcnn_beats_pixelcnn_on_held_out_digits(shipped):
    gated = shipped("gated_pixelcnn_mnist").metrics["exact"]["nll_nats"]
    plain = shipped("pixelcnn_mnist").metrics["exact"]["nll_nats"]
    assert gated < plain < 120


def test_wavenet_predicts_held_out_speech_far_better_than_its_code_frequencies(shipped):
    # The baseline: the entropy of the training clips' mu-law code frequencies (4.86 bits), what a model
    # that ignores the past achieves at best. WaveNet's context must beat it by a wide margin: 1.5 bits
    # per sample is a likelihood 2.8 times higher at every sample.
    codes = load_dataset("spoken_digits").train.images.flatten().long()
    frequencies = torch.bincount(codes, minlength=256).double() / len(codes)
    entropy = -(frequencies[frequencies > 0] * frequencies[frequencies > 0].log2()).sum().item()
    measured = shipped("wavenet_speech").metrics["exact"]["bits_per_dim"]
    assert measured < entropy - 1.5, (measured, entropy)
