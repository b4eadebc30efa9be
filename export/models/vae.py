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
from torch import nn

from genserve.serving.kernels.sampling import choose_pixels, gaussian_noise, uniform_noise

from .base import DECODE, ENCODE, SAMPLE, SCORE, GenerativeModel, ImageConfig, Score

_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class VAEConfig(ImageConfig):
    latent_dim: int = 16
    hidden_channels: int = 32
    hidden_units: int = 128
    score_samples: int = 100  # K of the IWAE bound reported by log_prob and scores

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pixel_levels != 2:
            raise ValueError(f"the VAE has a Bernoulli likelihood: pixel_levels must be 2, got {self.pixel_levels}")
        if self.num_classes is not None:
            raise ValueError("the VAE is unconditional; num_classes must be None")
        if self.image_size % 4:
            raise ValueError(f"image_size must be divisible by 4 (two stride-2 layers), got {self.image_size}")
        if min(self.latent_dim, self.hidden_channels, self.hidden_units, self.score_samples) < 1:
            raise ValueError(
                f"sizes must be >= 1: latent_dim={self.latent_dim} hidden_channels={self.hidden_channels} "
                f"hidden_units={self.hidden_units} score_samples={self.score_samples}"
            )


def gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis of log N(z; mean, exp(log_var))."""
    return -0.5 * (_LOG_2PI + log_var + (z - mean) ** 2 / log_var.exp()).sum(-1)


def bounds_from_log_weights(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, N) log-weights → ELBO (N,) and IWAE-K (N,).

    K is read from the tensor, not from Python, so a traced graph keeps it dynamic.
    """
    num_samples = torch.ones_like(log_w).sum(0)  # (N,) all equal to K
    return log_w.mean(0), torch.logsumexp(log_w, 0) - torch.log(num_samples)


class VAE(GenerativeModel):
    family = "vae"
    config_class = VAEConfig
    capabilities = frozenset({SAMPLE, ENCODE, DECODE, SCORE})

    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config)
        c, s = config.hidden_channels, config.image_size // 4
        self._bottleneck = (2 * c, s, s)
        flat = 2 * c * s * s
        self.encoder = nn.Sequential(
            nn.Conv2d(config.channels, c, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.ReLU(), nn.Flatten(),
            nn.Linear(flat, config.hidden_units), nn.ReLU(),
            nn.Linear(config.hidden_units, 2 * config.latent_dim),
        )
        self.decoder_dense = nn.Sequential(
            nn.Linear(config.latent_dim, config.hidden_units), nn.ReLU(),
            nn.Linear(config.hidden_units, flat), nn.ReLU(),
        )
        self.decoder_conv = nn.Sequential(
            nn.ConvTranspose2d(2 * c, c, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(c, config.channels, 4, 2, 1),
        )

    # ---- the two networks ---------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel values (N, C, H, W) → posterior mean and log-variance, each (N, D)."""
        x = self.check_pixels(x)
        mean, log_var = self.encoder(x.float()).chunk(2, dim=1)
        return mean, log_var

    def decoder_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, D) → Bernoulli logits (N, C, H, W)."""
        return self.decoder_conv(self.decoder_dense(z).view(-1, *self._bottleneck))

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (N, D) → pixel probabilities p(x_ij = 1 | z), (N, C, H, W) float."""
        self.check_labels(labels, z.shape[0])
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"z must have shape (N, {self.config.latent_dim}), got {tuple(z.shape)}")
        return torch.sigmoid(self.decoder_logits(z))

    # ---- capabilities -------------------------------------------------------------------
    @torch.inference_mode()
    def sample(self, n: int, seed: int, temperature: float = 1.0, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z ~ N(0, I), then each pixel ~ Bernoulli(p) by inverse CDF on per-sample noise."""
        self.check_sample_args(n, seed, temperature, labels)
        c = self.config
        z = gaussian_noise(seed, range(n), (c.latent_dim,))
        pixel_noise = uniform_noise(seed, range(n), (c.channels, c.image_size, c.image_size), stream=1)
        logit = self.decoder_logits(z)  # (N, C, H, W)
        two_class = torch.stack([torch.zeros_like(logit), logit], dim=1)  # (N, 2, C, H, W)
        return choose_pixels(two_class, pixel_noise, temperature)

    def importance_log_weights(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """log p(x, z_k) - log q(z_k | x) for z_k = mean + std * eps_k.

        Args:
            x: (N, C, H, W) binary pixel values (not validated here: also the exported graph).
            eps: (K, N, D) standard normal noise (an input: graphs stay deterministic).

        Returns:
            (K, N) log-weights in nats.
        """
        mean, log_var = self.encoder(x.float()).chunk(2, dim=1)  # (N, D) each
        z = mean + (0.5 * log_var).exp() * eps  # (K, N, D)
        k, n, d = z.shape
        logits = self.decoder_logits(z.reshape(k * n, d)).view(k, n, -1)
        target = x.float().flatten(1)  # (N, C*H*W), broadcast over K
        # Bernoulli log-likelihood x*l - softplus(l), written out: the ONNX exporter lowers
        # binary_cross_entropy_with_logits to log(1 - sigmoid(l)), which is -inf for large l.
        log_px_given_z = (target * logits - F.softplus(logits)).sum(-1)
        log_prior = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
        return log_px_given_z + log_prior - gaussian_log_density(z, mean, log_var)

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
        # Single-sample reparameterised ELBO with the analytic KL term (lower variance).
        mean, log_var = self.encode(x)
        z = mean + (0.5 * log_var).exp() * torch.randn_like(mean)
        logits = self.decoder_logits(z)
        recon = F.binary_cross_entropy_with_logits(logits, x.float(), reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mean**2 + log_var.exp() - 1 - log_var).sum(1)
        loss = (recon + kl).mean()
        return loss, {"neg_elbo": loss.item(), "kl": kl.mean().item()}
