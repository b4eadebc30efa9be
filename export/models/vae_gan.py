"""VAE/GAN: a VAE whose reconstructions are also judged by a discriminator's features.

Larsen, Sønderby, Larochelle & Winther, "Autoencoding beyond pixels using a learned similarity
metric", ICML 2016. Encoder, decoder and prior are the VAE's (vae.py); a convolutional
discriminator D sees real images, reconstructions and decoded prior draws (as pixel
probabilities). Per batch:
- encoder and decoder minimise the VAE's negative ELBO (Bernoulli pixels, analytic KL), plus
  `feature_weight` times the squared distance between D's hidden features of x and of its
  reconstruction (the paper's learned similarity), plus `adversarial_weight` times the
  non-saturating GAN loss on reconstructions and prior draws;
- D learns to tell real images from both kinds of generated ones.
The pixel ELBO term is kept (the paper replaces it) so that the model still has a proper
Bernoulli decoder: its ELBO and IWAE-K are true bounds on log p(x), reported as such, beside
D's logit, reported as not a likelihood.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Score
from .discriminator import PixelDiscriminator
from .vae import VAE, VAEConfig


@dataclass(frozen=True)
class VAEGANConfig(VAEConfig):
    discriminator_channels: int = 32
    feature_weight: float = 1.0
    adversarial_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.discriminator_channels < 1 or self.feature_weight < 0 or self.adversarial_weight < 0:
            raise ValueError(
                f"discriminator_channels must be >= 1 and the weights >= 0: {self.discriminator_channels}, "
                f"{self.feature_weight}, {self.adversarial_weight}"
            )


class VAEGAN(VAE):
    family = "vae_gan"
    config_class = VAEGANConfig

    def __init__(self, config: VAEGANConfig) -> None:
        super().__init__(config)
        self.discriminator = PixelDiscriminator(config, config.discriminator_channels)

    def discriminate(self, x: torch.Tensor) -> torch.Tensor:
        """Unvalidated pixel values (also the exported graph) → D's logit (N,). Not a likelihood."""
        return self.discriminator(x.to(self.discriminator.logit.weight.dtype))[1]

    def scores(self, x, labels=None, seed: int = 0) -> list[Score]:
        bounds = super().scores(x, labels, seed)
        logit = self.discriminate(self.check_pixels(x))
        return [*bounds, Score(logit, method="discriminator", is_likelihood=False, unit="logit")]

    # ---- training -----------------------------------------------------------------------
    def configure_optimizers(self, learning_rate: float) -> list[torch.optim.Optimizer]:
        vae = [*self.encoder.parameters(), *self.decoder_dense.parameters(), *self.decoder_conv.parameters()]
        return [
            torch.optim.Adam(vae, lr=learning_rate),
            torch.optim.Adam(self.discriminator.parameters(), lr=learning_rate, betas=(0.5, 0.999)),
        ]

    def train_step(self, x, labels, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, float]:
        vae_opt, d_opt = optimizers
        c = self.config
        neg_elbo, figures, logits = self.elbo_loss(x)
        reconstruction = torch.sigmoid(logits)
        prior_draws = torch.sigmoid(self.decoder_logits(torch.randn(x.shape[0], c.latent_dim)))
        real = x.to(reconstruction.dtype)
        # D: real → 1, reconstructions and prior draws → 0.
        d_opt.zero_grad(set_to_none=True)
        d_loss = (F.softplus(-self.discriminator(real)[1]).mean()
                  + F.softplus(self.discriminator(reconstruction.detach())[1]).mean()
                  + F.softplus(self.discriminator(prior_draws.detach())[1]).mean())
        d_loss.backward()
        d_opt.step()
        # Encoder and decoder: ELBO + feature similarity + fooling D.
        vae_opt.zero_grad(set_to_none=True)
        real_features = self.discriminator(real)[0].detach()
        fake_features, fake_logit = self.discriminator(reconstruction)
        feature_loss = (fake_features - real_features).square().sum(1).mean()
        gan_loss = F.softplus(-fake_logit).mean() + F.softplus(-self.discriminator(prior_draws)[1]).mean()
        loss = neg_elbo + c.feature_weight * feature_loss + c.adversarial_weight * gan_loss
        loss.backward()
        vae_opt.step()
        return {**figures, "feature": feature_loss.item(), "d_loss": d_loss.item(), "g_loss": gan_loss.item()}
