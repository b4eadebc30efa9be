"""What the autoencoder families share: a convolutional encoder, a Bernoulli decoder, sampling.

The encoder maps binarised images (N, C, H, W) through two stride-2 convolutions and a hidden
layer to `encoder_outputs` numbers per image (what they mean is the family's: a Gaussian's
mean and log-variance, a flow's context, a deterministic code); the decoder maps latents
(N, D) back to Bernoulli logits per pixel. Sampling draws z ~ N(0, I), then each pixel by
inverse CDF on per-sample noise, so sample i depends only on (seed, i).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genserve.serving.kernels.sampling import choose_pixels, gaussian_noise, uniform_noise

from .base import GenerativeModel, ImageConfig


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x | logits) summed over pixels: logits (..., N, C, H, W), x (N, C, H, W) binary → (..., N).

    Written out as x*l - softplus(l): the ONNX exporter lowers binary_cross_entropy_with_logits
    to log(1 - sigmoid(l)), which is -inf for large l.
    """
    return (x.to(logits.dtype) * logits - F.softplus(logits)).flatten(-3).sum(-1)


@dataclass(frozen=True)
class AutoencoderConfig(ImageConfig):
    latent_dim: int = 16
    hidden_channels: int = 32
    hidden_units: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__.removesuffix("Config")
        if self.pixel_levels != 2:
            raise ValueError(f"the {name} has a Bernoulli likelihood: pixel_levels must be 2, got {self.pixel_levels}")
        if self.num_classes is not None:
            raise ValueError(f"the {name} is unconditional; num_classes must be None")
        if self.image_size % 4:
            raise ValueError(f"image_size must be divisible by 4 (two stride-2 layers), got {self.image_size}")
        if min(self.latent_dim, self.hidden_channels, self.hidden_units) < 1:
            raise ValueError(
                f"sizes must be >= 1: latent_dim={self.latent_dim} hidden_channels={self.hidden_channels} "
                f"hidden_units={self.hidden_units}"
            )


class ConvAutoencoder(GenerativeModel):
    """Encoder and Bernoulli decoder; subclasses say what the encoder's outputs mean."""

    def __init__(self, config: AutoencoderConfig, encoder_outputs: int, decoder_outputs: int | None = None) -> None:
        """decoder_outputs: channels of the decoder's output map; default the image's (Bernoulli logits)."""
        super().__init__(config)
        c, s = config.hidden_channels, config.image_size // 4
        self._bottleneck = (2 * c, s, s)
        flat = 2 * c * s * s
        self.encoder = nn.Sequential(
            nn.Conv2d(config.channels, c, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.ReLU(), nn.Flatten(),
            nn.Linear(flat, config.hidden_units), nn.ReLU(),
            nn.Linear(config.hidden_units, encoder_outputs),
        )
        self.decoder_dense = nn.Sequential(
            nn.Linear(config.latent_dim, config.hidden_units), nn.ReLU(),
            nn.Linear(config.hidden_units, flat), nn.ReLU(),
        )
        self.decoder_conv = nn.Sequential(
            nn.ConvTranspose2d(2 * c, c, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(c, decoder_outputs or config.channels, 4, 2, 1),
        )

    def encoder_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel values (N, C, H, W) (not validated here: also the exported graphs) → (N, outputs)."""
        return self.encoder(x.to(self.encoder[0].weight.dtype))

    def decoder_maps(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, D) → the decoder's output map (N, decoder_outputs, H, W)."""
        return self.decoder_conv(self.decoder_dense(z).view(-1, *self._bottleneck))

    def decoder_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, D) → Bernoulli logits (N, C, H, W)."""
        return self.decoder_maps(z)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (N, D) → pixel probabilities p(x_ij = 1 | z), (N, C, H, W) float."""
        self.check_labels(labels, z.shape[0])
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"z must have shape (N, {self.config.latent_dim}), got {tuple(z.shape)}")
        return torch.sigmoid(self.decoder_logits(z))

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
