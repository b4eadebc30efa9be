"""PixelVAE: an exactly normalised, causal decoder conditioned on z; bounds from it; z reaches the pixels."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from genserve.export.models import PixelVAEConfig
from genserve.export.models.pixel_vae import prior_latents
from genserve.export.models.vae import gaussian_log_density
from tests.conftest import make_model


def all_binary_images(size: int) -> torch.Tensor:
    """Every binary size x size image, (2**(size*size), 1, size, size)."""
    bits = torch.tensor(list(itertools.product((0, 1), repeat=size * size)))
    return bits.view(-1, 1, size, size)


def test_the_decoder_is_a_normalised_distribution_over_images_for_every_z():
    # Exactness of the autoregressive factorisation with the conditioning map: summed over all
    # 2**16 binary 4x4 images, p(x | z) is 1 (only if no logit sees its own or a later pixel).
    model = make_model("pixel_vae", image_size=4, decoder_layers=3, first_kernel_size=5)
    images = all_binary_images(4)
    with torch.no_grad():
        for z in torch.randn(3, 1, model.config.latent_dim).double():
            log_p = model.double().reconstruction_log_likelihood(z.expand(len(images), -1).unsqueeze(0), images)[0]
            # float64: the sum of 65,536 probabilities is 1 to ~1e-12 if the model is exactly normalised
            assert abs(torch.logsumexp(log_p, 0).item()) < 1e-9


def test_no_logit_depends_on_its_own_or_a_later_pixel():
    model = make_model("pixel_vae")
    c = model.config
    x = torch.randint(0, 2, (2, 1, c.image_size, c.image_size))
    z = torch.randn(2, c.latent_dim)
    base = model.pixel_logits(x, z)
    for position in (0, 13, 40, 63):
        i, j = divmod(position, c.image_size)
        later = x.clone().view(2, -1)
        later[:, position:] = 1 - later[:, position:]  # flip this pixel and every one after it
        changed = model.pixel_logits(later.view_as(x), z)
        assert torch.equal(changed.flatten(2)[..., : position + 1], base.flatten(2)[..., : position + 1]), position


def test_bounds_use_the_decoders_exact_likelihood_and_elbo_stays_below_iwae():
    model = make_model("pixel_vae").double()
    x = torch.randint(0, 2, (4, 1, 8, 8))
    eps = torch.randn(5, 4, model.config.latent_dim, dtype=torch.float64)
    log_w = model.importance_log_weights(x, eps)  # (K, N)
    # The same log-weights written out independently: posterior, prior, and the chain rule by cross-entropy.
    mean, log_var = model.encode(x)
    z = mean + (0.5 * log_var).exp() * eps
    for k in range(5):
        logits = model.pixel_logits(x, z[k])
        log_px = -torch.nn.functional.cross_entropy(logits, x, reduction="none").flatten(1).sum(1)
        expected = log_px + gaussian_log_density(z[k], torch.zeros_like(z[k]), torch.zeros_like(z[k])) \
            - gaussian_log_density(z[k], mean, log_var)
        torch.testing.assert_close(log_w[k], expected, rtol=1e-12, atol=1e-9)  # float64, same operations
    for k in (1, 3, 10):
        elbo, iwae = model.bounds(x.long(), k, seed=2)
        assert elbo.is_bound and iwae.method == f"iwae-{k}" and torch.all(elbo.values <= iwae.values + 1e-9)


def test_sampling_draws_z_from_stream_one_and_decodes_it_with_stream_zero():
    model = make_model("pixel_vae")
    with torch.no_grad():
        for layer in model.pixelcnn.layers:  # conditioning strong enough that z shows in the pixels
            layer.condition.weight.mul_(30.0)
    z = prior_latents(model, 6, range(3))
    assert torch.equal(model.sample(3, seed=6), model.decode(z, seed=6))
    assert not torch.equal(model.decode(z, seed=6), model.decode(-z, seed=6))
    assert torch.equal(model.decode(z[1:], seed=6, indices=range(1, 3)), model.decode(z, seed=6)[1:])


def test_training_penalises_the_kl_only_above_the_free_bits():
    model = make_model("pixel_vae", free_bits=1e6)  # every dimension below its allowance: KL not penalised
    x = torch.randint(0, 2, (4, 1, 8, 8))
    torch.manual_seed(0)
    loss, figures = model.training_loss(x, None)
    assert math.isclose(loss.item() - figures["neg_elbo"], 1e6 * model.config.latent_dim - figures["kl"], rel_tol=1e-6)
    with pytest.raises(ValueError, match="free_bits must be >= 0"):
        PixelVAEConfig(free_bits=-1.0)
    with pytest.raises(ValueError, match="decoder_layers must be >= 2"):
        PixelVAEConfig(decoder_layers=1)
    with pytest.raises(TypeError, match="autoregressive"):
        model.decoder_logits(torch.zeros(1, model.config.latent_dim))
