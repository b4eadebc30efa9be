"""VAE/GAN: bounds from its pixel decoder, its discriminator labelled, every part trained."""

from __future__ import annotations

import torch

from genserve.export.models.vae import VAE
from tests.conftest import make_model


def _images(n: int = 6) -> torch.Tensor:
    return torch.randint(0, 2, (n, 1, 8, 8), generator=torch.Generator().manual_seed(4))


def test_scores_are_the_vae_bounds_then_the_discriminator():
    model = make_model("vae_gan")
    x = _images()
    elbo, iwae, logit = model.scores(x, seed=2)
    # The bounds are exactly the plain VAE's computation on the same encoder and decoder.
    expected = VAE.scores(model, x, seed=2)
    assert torch.equal(elbo.values, expected[0].values) and torch.equal(iwae.values, expected[1].values)
    assert elbo.is_bound and iwae.is_bound and iwae.method == "iwae-8"
    assert torch.equal(logit.values, model.discriminator(x.float())[1])
    assert (logit.method, logit.is_likelihood, logit.unit) == ("discriminator", False, "logit")


def test_a_train_step_moves_encoder_decoder_and_discriminator():
    model = make_model("vae_gan").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    figures = model.train_step(_images(16), None, model.configure_optimizers(1e-2))
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"encoder", "decoder_dense", "decoder_conv", "discriminator"}
    assert set(figures) == {"neg_elbo", "kl", "feature", "d_loss", "g_loss"}
