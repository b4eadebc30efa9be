"""Adversarial autoencoder: a deterministic code whose distribution is matched to the prior by a GAN.

Makhzani, Shlens, Jaitly, Goodfellow & Frey, "Adversarial Autoencoders", ICLR 2016 workshop.
The encoder gives one code z = E(x) per image; the decoder gives Bernoulli logits p(x | z). Each
training batch runs the paper's two phases: reconstruction (encoder and decoder minimise
-log p(x | E(x))), then regularisation (a discriminator on codes learns to tell prior draws
z ~ N(0, I) from E(x), and the encoder learns to fool it), so that decoding prior draws
gives digits.

There is no tractable likelihood: the scores are the reconstruction log-likelihood
log p(x | E(x)) (how well the code describes x, not log p(x)) and the latent discriminator's logit
D(E(x)) (how prior-like the code looks), both labelled not a likelihood.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .autoencoder import AutoencoderConfig, ConvAutoencoder, bernoulli_log_likelihood
from .base import DECODE, ENCODE, SAMPLE, SCORE, Score


@dataclass(frozen=True)
class AAEConfig(AutoencoderConfig):
    latent_dim: int = 8
    discriminator_units: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.discriminator_units < 1:
            raise ValueError(f"discriminator_units must be >= 1, got {self.discriminator_units}")


class AAE(ConvAutoencoder):
    family = "aae"
    config_class = AAEConfig
    capabilities = frozenset({SAMPLE, ENCODE, DECODE, SCORE})

    def __init__(self, config: AAEConfig) -> None:
        super().__init__(config, encoder_outputs=config.latent_dim)
        units = config.discriminator_units
        self.latent_discriminator = nn.Sequential(
            nn.Linear(config.latent_dim, units), nn.LeakyReLU(0.2),
            nn.Linear(units, units), nn.LeakyReLU(0.2),
            nn.Linear(units, 1),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel values (N, C, H, W) → codes z = E(x), (N, D)."""
        return self.encoder_outputs(self.check_pixels(x))

    def code_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unvalidated pixel values (also the exported graph) → log p(x | E(x)) and D(E(x)), each (N,)."""
        z = self.encoder_outputs(x)
        reconstruction = bernoulli_log_likelihood(self.decoder_logits(z), x)
        return reconstruction, self.latent_discriminator(z).squeeze(-1)

    def scores(self, x, labels=None, seed: int = 0) -> list[Score]:
        self.check_labels(labels, x.shape[0])
        reconstruction, logit = self.code_scores(self.check_pixels(x))
        return [
            Score(reconstruction, method="reconstruction", is_likelihood=False),
            Score(logit, method="latent_discriminator", is_likelihood=False, unit="logit"),
        ]

    # ---- the two training phases --------------------------------------------------------
    def configure_optimizers(self, learning_rate: float) -> list[torch.optim.Optimizer]:
        autoencoder = [*self.encoder.parameters(), *self.decoder_dense.parameters(), *self.decoder_conv.parameters()]
        betas = (0.5, 0.999)  # the adversarial phases, as for GANs
        return [
            torch.optim.Adam(autoencoder, lr=learning_rate),
            torch.optim.Adam(self.latent_discriminator.parameters(), lr=learning_rate, betas=betas),
            torch.optim.Adam(self.encoder.parameters(), lr=learning_rate, betas=betas),
        ]

    def train_step(self, x, labels, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, float]:
        ae_opt, d_opt, e_opt = optimizers
        # Reconstruction phase.
        ae_opt.zero_grad(set_to_none=True)
        z = self.encoder_outputs(x)
        reconstruction = -bernoulli_log_likelihood(self.decoder_logits(z), x).mean()
        reconstruction.backward()
        ae_opt.step()
        # Regularisation phase: D tells prior draws (real) from codes (fake), then E fools D.
        codes = self.encoder_outputs(x)
        prior = torch.randn_like(codes)
        d_opt.zero_grad(set_to_none=True)
        d_loss = (F.softplus(-self.latent_discriminator(prior)).mean()
                  + F.softplus(self.latent_discriminator(codes.detach())).mean())
        d_loss.backward()
        d_opt.step()
        e_opt.zero_grad(set_to_none=True)
        e_loss = F.softplus(-self.latent_discriminator(codes)).mean()
        e_loss.backward()
        e_opt.step()
        return {"reconstruction_nats": reconstruction.item(), "d_loss": d_loss.item(), "e_loss": e_loss.item()}

    def training_loss(self, x, labels):
        raise NotImplementedError("the AAE trains in phases through train_step")
