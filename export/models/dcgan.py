"""DCGAN: a convolutional generator and discriminator, optionally class-conditional.

Radford, Metz & Chintala, "Unsupervised Representation Learning with Deep Convolutional
Generative Adversarial Networks", ICLR 2016 (strided (transposed) convolutions, batch norm,
ReLU in G, LeakyReLU in D, Adam with beta1 = 0.5). Conditioning follows the projection
discriminator (Miyato & Koyama, ICLR 2018) in D and a label embedding concatenated to z in G.

A GAN has no likelihood: its score is the discriminator's logit D(x), reported with method
"discriminator" and `is_likelihood=False` so nobody mistakes it for log p(x).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genserve.serving.kernels.sampling import gaussian_noise

from .base import DECODE, SAMPLE, SCORE, GenerativeModel, ImageConfig, Score


@dataclass(frozen=True)
class DCGANConfig(ImageConfig):
    pixel_levels: int = 256
    latent_dim: int = 64
    generator_channels: int = 64
    discriminator_channels: int = 64
    label_embedding_dim: int = 16
    learning_rate_ratio_d: float = 1.0  # D learning rate / G learning rate

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pixel_levels != 256:
            raise ValueError(f"the DCGAN generates 8-bit images: pixel_levels must be 256, got {self.pixel_levels}")
        if self.image_size % 4:
            raise ValueError(f"image_size must be divisible by 4 (two stride-2 layers), got {self.image_size}")
        if min(self.latent_dim, self.generator_channels, self.discriminator_channels, self.label_embedding_dim) < 1:
            raise ValueError(
                f"sizes must be >= 1: latent_dim={self.latent_dim} generator_channels={self.generator_channels} "
                f"discriminator_channels={self.discriminator_channels} label_embedding_dim={self.label_embedding_dim}"
            )
        if not self.learning_rate_ratio_d > 0:
            raise ValueError(f"learning_rate_ratio_d must be > 0, got {self.learning_rate_ratio_d}")


class Generator(nn.Module):
    def __init__(self, c: DCGANConfig) -> None:
        super().__init__()
        s, g = c.image_size // 4, c.generator_channels
        conditional_dim = c.label_embedding_dim if c.num_classes else 0
        self.label_embedding = nn.Embedding(c.num_classes, c.label_embedding_dim) if c.num_classes else None
        self.project = nn.Sequential(
            nn.Linear(c.latent_dim + conditional_dim, 2 * g * s * s), nn.BatchNorm1d(2 * g * s * s), nn.ReLU()
        )
        self.shape = (2 * g, s, s)
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(2 * g, g, 4, 2, 1), nn.BatchNorm2d(g), nn.ReLU(),
            nn.ConvTranspose2d(g, c.channels, 4, 2, 1), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.label_embedding is not None:
            z = torch.cat([z, self.label_embedding(labels)], dim=1)
        return self.upsample(self.project(z).view(-1, *self.shape))  # (N, C, H, W) in [-1, 1]


class Discriminator(nn.Module):
    def __init__(self, c: DCGANConfig) -> None:
        super().__init__()
        d, s = c.discriminator_channels, c.image_size // 4
        self.features = nn.Sequential(
            nn.Conv2d(c.channels, d, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(d, 2 * d, 4, 2, 1), nn.BatchNorm2d(2 * d), nn.LeakyReLU(0.2), nn.Flatten(),
        )
        self.logit = nn.Linear(2 * d * s * s, 1)
        self.label_projection = nn.Embedding(c.num_classes, 2 * d * s * s) if c.num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        features = self.features(x)  # (N, F)
        logit = self.logit(features).squeeze(1)
        if self.label_projection is not None:
            logit = logit + (self.label_projection(labels) * features).sum(1)
        return logit  # (N,)


def _dcgan_init(module: nn.Module) -> None:
    """The DCGAN paper's initialisation: weights ~ N(0, 0.02), batch-norm scales ~ N(1, 0.02).

    Small label projections matter most: with PyTorch's N(0, 1) embedding default the
    projection term swamps D's logit and the generator never recovers.
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DCGAN(GenerativeModel):
    family = "dcgan"
    config_class = DCGANConfig
    capabilities = frozenset({SAMPLE, DECODE, SCORE})

    def __init__(self, config: DCGANConfig) -> None:
        super().__init__(config)
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)
        self.apply(_dcgan_init)

    @staticmethod
    def to_unit_range(x: torch.Tensor) -> torch.Tensor:
        return x.float() / 127.5 - 1.0

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """G(z): latents (N, D) → images in [-1, 1], (N, C, H, W) float."""
        return self.generator(z, labels)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """G(z) for given latents, as 8-bit pixel values (N, C, H, W) int64."""
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"z must have shape (N, {self.config.latent_dim}), got {tuple(z.shape)}")
        labels = self.check_labels(labels, z.shape[0])
        return ((self.generate(z, labels) + 1.0) * 127.5).round().clamp(0, 255).long()

    @torch.inference_mode()
    def sample(self, n: int, seed: int, temperature: float = 1.0, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z ~ N(0, temperature^2 I) per sample (the truncation-free 'temperature' of GANs), then G(z)."""
        self.check_sample_args(n, seed, temperature, labels)
        return self.decode(gaussian_noise(seed, range(n), (self.config.latent_dim,)) * temperature, labels)

    def discriminate(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """D(x): the discriminator's logit per image, (N,). Not a likelihood."""
        x = self.check_pixels(x)
        labels = self.check_labels(labels, x.shape[0])
        return self.discriminator(self.to_unit_range(x), labels)

    def scores(self, x, labels=None, seed: int = 0) -> list[Score]:
        return [Score(self.discriminate(x, labels), method="discriminator", is_likelihood=False, unit="logit")]

    # ---- adversarial training -----------------------------------------------------------
    def configure_optimizers(self, learning_rate: float) -> list[torch.optim.Optimizer]:
        betas = (0.5, 0.999)
        return [
            torch.optim.Adam(self.generator.parameters(), lr=learning_rate, betas=betas),
            torch.optim.Adam(
                self.discriminator.parameters(), lr=learning_rate * self.config.learning_rate_ratio_d, betas=betas
            ),
        ]

    def train_step(self, x, labels, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, float]:
        g_opt, d_opt = optimizers
        n = x.shape[0]
        z = torch.randn(n, self.config.latent_dim)
        fake = self.generator(z, labels)
        real = self.to_unit_range(x)
        # D: real → 1, fake → 0 (non-saturating GAN loss, Goodfellow et al. 2014).
        d_opt.zero_grad(set_to_none=True)
        d_loss = F.softplus(-self.discriminator(real, labels)).mean() + F.softplus(
            self.discriminator(fake.detach(), labels)
        ).mean()
        d_loss.backward()
        d_opt.step()
        # G: make D call the fakes real.
        g_opt.zero_grad(set_to_none=True)
        g_loss = F.softplus(-self.discriminator(fake, labels)).mean()
        g_loss.backward()
        g_opt.step()
        return {"d_loss": d_loss.item(), "g_loss": g_loss.item()}

    def training_loss(self, x, labels):
        raise NotImplementedError("DCGAN trains adversarially through train_step")
