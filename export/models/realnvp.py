"""RealNVP-style normalizing flow: affine couplings with checkerboard and channel masks.

Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017. Pixels are
uniformly dequantised, x = (pixel + u) / 256 with u ~ U[0, 1), and mapped to logit space
y = logit(alpha + (1 - 2 alpha) x) as in the paper's section 4.1. The flow is
  checkerboard couplings at (C, H, W) → squeeze to (4C, H/2, W/2) → channel-wise couplings →
  checkerboard couplings → unsqueeze,
with a standard normal prior on z. The change of variables gives the exact density of the
dequantised point:
  log p(pixel + u) = log N(z; 0, I) + log|det dz/dy| + log|det dy/dx| - D log 256,
whose expectation over u is a lower bound on the discrete log P(pixel); the reported score
says so (method "dequantised", a bound) and bits/dim follows the literature's convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from genserve.serving.kernels.sampling import gaussian_noise, uniform_noise

from .base import DECODE, ENCODE, SAMPLE, SCORE, GenerativeModel, ImageConfig, Score


@dataclass(frozen=True)
class RealNVPConfig(ImageConfig):
    pixel_levels: int = 256
    hidden_channels: int = 32
    num_checkerboard: int = 3  # couplings before the squeeze, and again after the channel-wise ones
    num_channelwise: int = 3
    alpha: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % 2:
            raise ValueError(f"image_size must be even (the flow squeezes 2x2 blocks), got {self.image_size}")
        if self.hidden_channels < 1 or self.num_checkerboard < 1 or self.num_channelwise < 0:
            raise ValueError(
                f"bad sizes: hidden_channels={self.hidden_channels} num_checkerboard={self.num_checkerboard} "
                f"num_channelwise={self.num_channelwise}"
            )
        if not 0 <= self.alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), got {self.alpha}")


def checkerboard(channels: int, size: int, parity: int) -> torch.Tensor:
    """(1, C, S, S) mask, 1 where (i + j) % 2 == parity: those entries pass through unchanged."""
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((i + j) % 2 == parity).float().expand(1, channels, size, size).clone()


def channel_mask(channels: int, parity: int) -> torch.Tensor:
    """(1, C, 1, 1) mask, 1 on the first (parity 0) or second (parity 1) half of the channels."""
    mask = torch.zeros(1, channels, 1, 1)
    half = channels // 2
    mask[:, :half] = 1.0
    return mask if parity == 0 else 1.0 - mask


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (N, 4C, H/2, W/2), each 2x2 block into channels."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, 4 * c, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `squeeze`."""
    n, c4, h, w = x.shape
    c = c4 // 4
    x = x.view(n, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c, 2 * h, 2 * w)


def sum_per_image(t: torch.Tensor) -> torch.Tensor:
    """(N, ...) → (N,) sums accumulated in float64.

    A log-det sums hundreds of per-dimension terms of a few nats each; float32 summation
    order alone then moves the total by ~1e-3 between runtimes. float64 accumulation keeps
    ONNX Runtime, TorchScript and eager within 1e-4 of each other.
    """
    return t.flatten(1).double().sum(1)


class AffineCoupling(nn.Module):
    """y = mask * x + (1 - mask) * (x * exp(s(mask * x)) + t(mask * x)); log|det| = sum(s)."""

    def __init__(self, mask: torch.Tensor, hidden: int) -> None:
        super().__init__()
        channels = mask.shape[1]
        self.register_buffer("mask", mask)
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, 2 * channels, 3, padding=1),
        )
        # Start as the identity map: stable early training.
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))

    def _scale_shift(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw_s, t = self.net(kept).chunk(2, dim=1)
        free = 1.0 - self.mask
        return self.scale * torch.tanh(raw_s) * free, t * free

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self._scale_shift(x * self.mask)
        return x * s.exp() + t, sum_per_image(s)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        s, t = self._scale_shift(y * self.mask)  # the kept entries are unchanged, so s, t are too
        return (y - t) * (-s).exp()


class RealNVP(GenerativeModel):
    family = "realnvp"
    config_class = RealNVPConfig
    capabilities = frozenset({SAMPLE, ENCODE, DECODE, SCORE})

    def __init__(self, config: RealNVPConfig) -> None:
        super().__init__(config)
        c, s, hid = config.channels, config.image_size, config.hidden_channels
        self.before_squeeze = nn.ModuleList(
            AffineCoupling(checkerboard(c, s, k % 2), hid) for k in range(config.num_checkerboard)
        )
        self.squeezed = nn.ModuleList(
            [AffineCoupling(channel_mask(4 * c, k % 2), hid) for k in range(config.num_channelwise)]
            + [AffineCoupling(checkerboard(4 * c, s // 2, k % 2), hid) for k in range(config.num_checkerboard)]
        )

    # ---- the bijection y ↔ z ------------------------------------------------------------
    def flow_forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logit-space data y (N, C, H, W) → latents z (same shape) and log|det dz/dy| (N,) float64."""
        # The first coupling starts the sum (there is always one): no zeros of a traced batch size.
        log_det = 0
        for coupling in self.before_squeeze:
            y, ld = coupling(y)
            log_det = log_det + ld
        y = squeeze(y)
        for coupling in self.squeezed:
            y, ld = coupling(y)
            log_det = log_det + ld
        return unsqueeze(y), log_det

    def flow_inverse(self, z: torch.Tensor) -> torch.Tensor:
        z = squeeze(z)
        for coupling in reversed(self.squeezed):
            z = coupling.inverse(z)
        z = unsqueeze(z)
        for coupling in reversed(self.before_squeeze):
            z = coupling.inverse(z)
        return z

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

    @torch.inference_mode()
    def sample(self, n: int, seed: int, temperature: float = 1.0, labels: torch.Tensor | None = None) -> torch.Tensor:
        """z ~ N(0, temperature^2 I) per sample, then the inverse flow."""
        self.check_sample_args(n, seed, temperature, labels)
        c = self.config
        z = gaussian_noise(seed, range(n), (c.channels, c.image_size, c.image_size)) * temperature
        return self.decode(z, labels)

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
