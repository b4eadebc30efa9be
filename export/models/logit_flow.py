"""What the normalizing flows on dequantised images share (RealNVP, FlowGAN, MAF).

Pixels are uniformly dequantised, x = (pixel + u) / 256 with u ~ U[0, 1), and mapped to logit
space y = logit(alpha + (1 - 2 alpha) x) (Dinh et al. 2017, section 4.1); a subclass supplies
the bijection y ↔ z (`flow_forward`, `flow_inverse`) with a standard normal prior on z. The
change of variables gives the exact density of the dequantised point:
  log p(pixel + u) = log N(z; 0, I) + log|det dz/dy| + log|det dy/dx| - D log 256,
whose expectation over u is a lower bound on the discrete log P(pixel); the reported score
says so (method "dequantised", a bound) and bits/dim follows the literature's convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from genserve.serving.kernels.sampling import gaussian_noise, uniform_noise

from .base import DECODE, ENCODE, SAMPLE, SCORE, GenerativeModel, ImageConfig, Score


@dataclass(frozen=True)
class LogitFlowConfig(ImageConfig):
    pixel_levels: int = 256
    alpha: float = 0.05  # logit squashing: pixels map into [alpha, 1 - alpha] before the logit

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), got {self.alpha}")


def sum_per_image(t: torch.Tensor) -> torch.Tensor:
    """(N, ...) → (N,) sums accumulated in float64.

    A log-det sums hundreds of per-dimension terms of a few nats each; float32 summation
    order alone then moves the total by ~1e-3 between runtimes. float64 accumulation keeps
    ONNX Runtime, TorchScript and eager within 1e-4 of each other.
    """
    return t.flatten(1).double().sum(1)


class LogitFlow(GenerativeModel):
    """A flow on logit-space dequantised pixels; subclasses define `flow_forward` and `flow_inverse`."""

    capabilities = frozenset({SAMPLE, ENCODE, DECODE, SCORE})

    def flow_forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logit-space data y (N, C, H, W) → latents z (same shape) and log|det dz/dy| (N,) float64."""
        raise NotImplementedError

    def flow_inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Latents z (N, C, H, W) → logit-space data y."""
        raise NotImplementedError

    # ---- pixels ↔ logit space -----------------------------------------------------------
    def dequantise(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels + uniform noise → logit space y and log|det dy/d(pixel + u)| (N,) float64.

        The D log 256 term of x = (pixel + u) / 256 is included, so the result is a density
        over the dequantised pixel values themselves.
        """
        a = self.config.alpha
        # float64 here: these 784 logs are summed into the log-det, and runtimes' float32 log
        # implementations round differently enough to move the total by ~1e-4 nats.
        unit = (x.double() + noise.double()) / self.config.pixel_levels  # (0, 1)
        squashed = a + (1 - 2 * a) * unit
        log_odds = torch.log(squashed) - torch.log1p(-squashed)
        per_dim = math.log(1 - 2 * a) - torch.log(squashed) - torch.log1p(-squashed)
        log_det = sum_per_image(per_dim) - self.config.dims * math.log(self.config.pixel_levels)
        return log_odds.to(noise.dtype), log_det

    def to_pixels(self, y: torch.Tensor) -> torch.Tensor:
        a, levels = self.config.alpha, self.config.pixel_levels
        unit = (torch.sigmoid(y) - a) / (1 - 2 * a)
        return (unit * levels).floor().clamp(0, levels - 1).long()

    def log_density(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """log p(pixel + u) in nats per image for pixels x (N, C, H, W) and noise u (same shape)."""
        y, log_det_pre = self.dequantise(x, noise)
        z, log_det_flow = self.flow_forward(y)
        log_prior = -0.5 * sum_per_image(z**2 + math.log(2 * math.pi))
        return (log_prior + log_det_flow + log_det_pre).float()

    # ---- capabilities -------------------------------------------------------------------
    def encode(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels → (z, log|det dz/d(pixel + u)|); noise None dequantises at the bin centres (u = 0.5)."""
        x = self.check_pixels(x)
        if noise is None:
            noise = torch.full(x.shape, 0.5)
        y, log_det_pre = self.dequantise(x, noise)
        z, log_det_flow = self.flow_forward(y)
        return z, (log_det_pre + log_det_flow).float()

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (N, C, H, W) → pixel values (N, C, H, W) int64."""
        c = self.config
        if tuple(z.shape[1:]) != (c.channels, c.image_size, c.image_size):
            raise ValueError(
                f"z must have shape (N, {c.channels}, {c.image_size}, {c.image_size}), got {tuple(z.shape)}"
            )
        self.check_labels(labels, z.shape[0])
        return self.to_pixels(self.flow_inverse(z))

    def prior_latents(self, seed: int, indices, temperature: float = 1.0) -> torch.Tensor:
        """z ~ N(0, temperature^2 I) of samples `indices` of `seed`, (N, C, H, W): Sample's draws in every path."""
        c = self.config
        return gaussian_noise(seed, indices, (c.channels, c.image_size, c.image_size)) * temperature

    @torch.inference_mode()
    def sample(self, n: int, seed: int, temperature: float = 1.0, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z ~ N(0, temperature^2 I) per sample, then the inverse flow."""
        self.check_sample_args(n, seed, temperature, labels)
        return self.decode(self.prior_latents(seed, range(n), temperature), labels)

    def log_prob(self, x, labels=None, seed: int = 0) -> torch.Tensor:
        """log p(pixel + u) with u drawn per image from (seed, image index)."""
        x = self.check_pixels(x)
        self.check_labels(labels, x.shape[0])
        noise = uniform_noise(seed, range(x.shape[0]), x.shape[1:])
        return self.log_density(x, noise)

    def scores(self, x, labels=None, seed: int = 0) -> list[Score]:
        return [Score(self.log_prob(x, labels, seed), method="dequantised", is_bound=True)]

    def training_loss(self, x, labels):
        nll = -self.log_density(x, torch.rand(x.shape)).mean()
        return nll, {"nll": nll.item(), "bpd": nll.item() / (self.config.dims * math.log(2))}
