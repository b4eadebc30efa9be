"""Sample quality: the Fréchet distance is exact, and the shipped classifier's FID has a scale."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from genserve.export.checkpoint import load_checkpoint, save_checkpoint
from genserve.export.data import EVAL_BINARISATION_SEED, load_dataset, quantise
from genserve.export.quality.classifier import accuracy, load_classifier
from genserve.export.quality.fid import FIDConfig, features_of, frechet_distance, sample_fid

from ..conftest import make_model
from .test_cli import genserve


def _features(n: int = 400, d: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)


def test_identical_sets_are_at_distance_zero():
    a = _features()
    # The eigen-decompositions in float64 leave ~1e-15 relative error on traces of order 10-100.
    assert abs(frechet_distance(a, a)) < 1e-9 * float(torch.cov(a.T).trace())


def test_scaled_and_shifted_features_match_the_closed_form():
    # b = c a + t: mu_b = c mu_a + t and S_b = c² S_a, so tr((S_a S_b)^½) = c tr(S_a) and
    # d² = |(c - 1) mu_a + t|² + (1 - c)² tr(S_a).
    a = _features()
    c, t = 2.5, 0.75
    shift = ((c - 1) * a.mean(0) + t).square().sum()
    expected = float(shift) + (1 - c) ** 2 * float(torch.cov(a.T).trace())
    assert frechet_distance(a, c * a + t) == pytest.approx(expected, rel=1e-10)


def test_distance_matches_an_independent_matrix_square_root():
    a, b = _features(seed=1), _features(seed=2) + 0.3
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


@pytest.fixture(scope="module")
def digits():
    dataset = load_dataset("mnist5k")
    return dataset.train.images[:500], dataset.held_out


@pytest.mark.parametrize("levels", [256, 2])
def test_real_training_images_are_close_and_noise_is_far(digits, levels):
    train, held_out = digits
    classifier = load_classifier()
    binarise = torch.Generator().manual_seed(EVAL_BINARISATION_SEED)
    reference = features_of(classifier, quantise(held_out.images, levels, binarise), levels)
    real = features_of(classifier, quantise(train, levels, binarise), levels)
    noise = torch.randint(0, levels, held_out.images.shape, generator=torch.Generator().manual_seed(3))
    real_distance = frechet_distance(real, reference)
    noise_distance = frechet_distance(features_of(classifier, noise, levels), reference)
    assert noise_distance > 20 * real_distance
    # Held-out digits and training digits: the same distribution, so only finite-sample error remains.
    assert real_distance < 20


def test_shipped_classifier_reads_digits(digits):
    _, held_out = digits
    classifier = load_classifier()
    assert accuracy(classifier, held_out.images.long(), held_out.labels, 256) > 0.95
    binarised = quantise(held_out.images, 2, torch.Generator().manual_seed(EVAL_BINARISATION_SEED))
    assert accuracy(classifier, binarised, held_out.labels, 2) > 0.95


def test_a_trained_model_scores_far_better_than_an_untrained_one(shipped):
    config = FIDConfig(samples=300, seed=1)
    trained = sample_fid(shipped("vae_mnist"), config, progress=False)["fid"]
    untrained = load_checkpoint(shipped("vae_mnist").path)
    torch.manual_seed(0)
    untrained.model = type(untrained.model)(untrained.model.config).eval()
    assert untrained.model.decoder_conv[0].weight.ne(shipped("vae_mnist").model.decoder_conv[0].weight).any()
    assert sample_fid(untrained, config, progress=False)["fid"] > 3 * trained


def test_fid_refuses_images_the_classifier_cannot_read(tmp_path):
    save_checkpoint(tmp_path / "tiny", make_model("vae"), training={"data": "mnist5k"})
    with pytest.raises(ValueError, match=r"28x28 digit classifier; tiny makes samples of shape \(1, 8, 8\)"):
        sample_fid(load_checkpoint(tmp_path / "tiny"), progress=False)
    result = genserve("evaluate", str(tmp_path / "tiny"), "--data", "digits8", "--fid", "--samples", "")
    assert result.returncode == 2 and "28x28 digit classifier" in result.stderr


def test_train_classifier_writes_weights_and_a_card_with_its_accuracy(tmp_path, digits):
    result = genserve("train-classifier", "--epochs", "1", "--out", str(tmp_path), "--no-progress")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "config.json").read_text())
    _, held_out = digits
    measured = accuracy(load_classifier(tmp_path), held_out.images.long(), held_out.labels, 256)
    assert record["figures"]["held_out_accuracy_8bit"] == round(measured, 4)
    assert f"{measured:.2%}" in (tmp_path / "MODEL_CARD.md").read_text()
