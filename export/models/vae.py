"""Variational autoencoder with a diagonal Gaussian posterior and Bernoulli likelihood.

Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014; the importance-weighted
bound follows Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
A convolutional encoder gives q(z|x) = N(mean, diag(exp(log_var))); a transposed-
convolutional decoder gives Bernoulli logits for each pixel of a binarised image.

Both figures it reports are lower bounds on log p(x), computed from the same K posterior
samples z_k with log-weights w_k = log p(x, z_k) - log q(z_k | x):
  ELBO   = mean_k w_k            (a Monte Carlo estimate of the evidence lower bound)
  IWAE-K = log mean_k exp(w_k)   (tighter: ELBO <= IWAE-K by Jensen, for the same samples)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from genserve.serving.kernels.sampling import gaussian_noise

from .autoencoder import AutoencoderConfig, ConvAutoencoder, bernoulli_log_likelihood
from .base import DECODE, ENCODE, SAMPLE, SCORE, Score

_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class VAEConfig(AutoencoderConfig):
    score_samples: int = 100  # K of the IWAE bound reported by log_prob and scores

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score_samples < 1:
            raise ValueError(f"score_samples must be >= 1, got {self.score_samples}")


def gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis of log N(z; mean, exp(log_var))."""
    return -0.5 * (_LOG_2PI + log_var + (z - mean) ** 2 / log_var.exp()).sum(-1)


def bounds_from_log_weights(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, N) log-weights → ELBO (N,) and IWAE-K (N,).

    K is read from the tensor, not from Python, so a traced graph keeps it dynamic.
    """
    num_samples = torch.ones_like(log_w).sum(0)  # (N,) all equal to K
    return log_w.mean(0), torch.logsumexp(log_w, 0) - torch.log(num_samples)


class VAE(ConvAutoencoder):
    family = "vae"
    config_class = VAEConfig
    capabilities = frozenset({SAMPLE, ENCODE, DECODE, SCORE})

    def __init__(self, config: VAEConfig, encoder_outputs: int | None = None, decoder_outputs: int | None = None
                 ) -> None:
        super().__init__(config, encoder_outputs or 2 * config.latent_dim, decoder_outputs)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel values (N, C, H, W) → posterior mean and log-variance, each (N, D)."""
        mean, log_var = self.encoder_outputs(self.check_pixels(x)).chunk(2, dim=1)
        return mean, log_var

    def posterior(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel values (N, C, H, W) (not validated here: also the exported graph), eps (..., N, D)
        standard normal → z = mean + std * eps (..., N, D) and log q(z | x) (...)."""
        mean, log_var = self.encoder_outputs(x).chunk(2, dim=1)  # (N, D) each
        z = mean + (0.5 * log_var).exp() * eps
        return z, gaussian_log_density(z, mean, log_var)

    def importance_log_weights(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """log p(x, z_k) - log q(z_k | x) for the posterior's z_k from eps_k.

        Args:
            x: (N, C, H, W) binary pixel values (not validated here: also the exported graph).
            eps: (K, N, D) standard normal noise (an input: graphs stay deterministic).

        Returns:
            (K, N) log-weights in nats.
        """
        z, log_q = self.posterior(x, eps)  # (K, N, D), (K, N)
        log_px_given_z = self.reconstruction_log_likelihood(z, x)
        log_prior = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
        return log_px_given_z + log_prior - log_q

    def reconstruction_log_likelihood(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z_k) in nats: z (K, N, D), x (N, C, H, W) → (K, N)."""
        k, n, d = z.shape
        logits = self.decoder_logits(z.reshape(k * n, d)).view(k, n, *x.shape[1:])
        return bernoulli_log_likelihood(logits, x)  # x broadcasts over K

    def bounds(self, x: torch.Tensor, num_samples: int, seed: int = 0) -> tuple[Score, Score]:
        """The ELBO and IWAE-K bounds from the same K samples per image (see module doc)."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        x = self.check_pixels(x)
        # noise for image i is keyed by (seed, i): a figure does not depend on batch size.
        eps = gaussian_noise(seed, range(x.shape[0]), (num_samples, self.config.latent_dim)).transpose(0, 1)
        elbo, iwae = bounds_from_log_weights(self.importance_log_weights(x, eps))
        return (
            Score(elbo, method="elbo", is_bound=True),
            Score(iwae, method=f"iwae-{num_samples}", is_bound=True),
        )

    def log_prob(self, x, labels=None, seed: int = 0) -> torch.Tensor:
        """The IWAE bound with K = config.score_samples: a lower bound on log p(x)."""
        self.check_labels(labels, x.shape[0])
        return self.bounds(x, self.config.score_samples, seed)[1].values

    def scores(self, x, labels=None, seed: int = 0) -> list[Score]:
        self.check_labels(labels, x.shape[0])
        return list(self.bounds(x, self.config.score_samples, seed))

    def training_loss(self, x, labels):
        loss, figures, _ = self.elbo_loss(x)
        return loss, figures

    def elbo_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """Single-sample reparameterised negative ELBO with the analytic KL term (lower variance):
        the loss, figures for the progress bar, and the reconstruction's Bernoulli logits."""
        mean, log_var = self.encode(x)
        z = mean + (0.5 * log_var).exp() * torch.randn_like(mean)
        logits = self.decoder_logits(z)
        recon = F.binary_cross_entropy_with_logits(logits, x.float(), reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mean**2 + log_var.exp() - 1 - log_var).sum(1)
        loss = (recon + kl).mean()
        return loss, {"neg_elbo": loss.item(), "kl": kl.mean().item()}, logits
