"""The VAE's bounds and the DCGAN's labelled non-likelihood score."""

from __future__ import annotations

import pytest
import torch

from genserve.export.data import fixed_held_out, load_mnist5k
from tests.conftest import make_model
from tests.rounding import assert_within_rounding, rounding_sigma


@pytest.fixture(scope="module")
def binarised_digits():
    return fixed_held_out(load_mnist5k(), levels=2).images[:8].long()


def test_elbo_never_exceeds_iwae_for_the_same_samples():
    model = make_model("vae")
    x = torch.randint(0, 2, (6, 1, 8, 8))
    for k in (1, 2, 10):
        elbo, iwae = model.bounds(x, num_samples=k, seed=4)
        assert elbo.is_bound and iwae.is_bound and iwae.method == f"iwae-{k}"
        assert torch.all(elbo.values <= iwae.values + 1e-5)
        if k == 1:  # one sample: both are the same single log-weight
            assert torch.allclose(elbo.values, iwae.values)


def test_iwae_bound_rises_with_k_on_real_digits(shipped, binarised_digits):
    model = shipped("vae_mnist").model
    means = []
    with torch.no_grad():
        for k in (1, 10, 100):
            # Expectation over 20 independent draws per image: the bound is monotone in K
            # in expectation (Burda et al. 2016, theorem 1), not draw by draw.
            draws = torch.stack([model.bounds(binarised_digits, k, seed=s)[1].values for s in range(20)])
            means.append(draws.mean().item())
    assert means[0] < means[1] < means[2], means
    # and every bound is a log-probability of a binary image: negative
    assert means[2] < 0


def test_vae_score_is_a_bound_and_repeatable(shipped, binarised_digits):
    model = shipped("vae_mnist").model
    with torch.no_grad():
        first = model.scores(binarised_digits, seed=9)
        again = model.scores(binarised_digits, seed=9)
    assert [s.method for s in first] == ["elbo", f"iwae-{model.config.score_samples}"]
    assert all(s.is_bound and s.is_likelihood for s in first)
    assert all(torch.equal(a.values, b.values) for a, b in zip(first, again))


def test_vae_scores_do_not_depend_on_batch_composition(shipped, binarised_digits):
    model = shipped("vae_mnist").model
    with torch.no_grad():
        together = model.bounds(binarised_digits, 5, seed=2)[1].values
        alone = model.bounds(binarised_digits[:1], 5, seed=2)[1].values
        other_seed = model.bounds(binarised_digits[:1], 5, seed=3)[1].values
    # The noise is identical (keyed by image index); only BLAS rounding differs with batch size.
    (_, sigma) = rounding_sigma(lambda x: [b.values for b in model.bounds(x, 5, seed=2)], [binarised_digits[:1]])
    assert_within_rounding(together[:1].numpy(), alone.numpy(), sigma, "iwae-5")
    with pytest.raises(AssertionError, match="over the float32 rounding tolerance"):
        assert_within_rounding(other_seed.numpy(), alone.numpy(), sigma, "iwae-5, another seed")


def test_vae_encode_and_decode_shapes(shipped, binarised_digits):
    model = shipped("vae_mnist").model
    with torch.no_grad():
        mean, log_var = model.encode(binarised_digits)
        probs = model.decode(mean)
    assert mean.shape == log_var.shape == (8, model.config.latent_dim)
    assert probs.shape == binarised_digits.shape and 0 <= probs.min() and probs.max() <= 1
    # the trained decoder reconstructs the digits better than chance
    accuracy = ((probs > 0.5).long() == binarised_digits).float().mean().item()
    assert accuracy > 0.9


def test_dcgan_score_is_labelled_not_a_likelihood():
    model = make_model("dcgan", num_classes=3)
    x = torch.randint(0, 256, (4, 1, 8, 8))
    (score,) = model.scores(x, torch.tensor([0, 1, 2, 0]))
    assert score.method == "discriminator" and not score.is_likelihood
    with pytest.raises(ValueError, match="not a likelihood"):
        score.bits_per_dim(64)
    with pytest.raises(NotImplementedError, match="dcgan models cannot compute log p"):
        model.log_prob(x)


def test_dcgan_labels_change_the_image():
    model = make_model("dcgan", num_classes=3)
    a = model.sample(2, seed=1, labels=torch.tensor([0, 0]))
    b = model.sample(2, seed=1, labels=torch.tensor([1, 1]))
    assert a.shape == (2, 1, 8, 8) and a.dtype == torch.long
    assert not torch.equal(a, b)
