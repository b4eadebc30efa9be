"""RealNVP-style normalizing flow: affine couplings with checkerboard and channel masks.

Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017. On the
dequantised logit-space pixels of logit_flow.py, the flow is
  checkerboard couplings at (C, H, W) → squeeze to (4C, H/2, W/2) → channel-wise couplings →
  checkerboard couplings → unsqueeze,
with a standard normal prior on z.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .logit_flow import LogitFlow, LogitFlowConfig, sum_per_image


@dataclass(frozen=True)
class RealNVPConfig(LogitFlowConfig):
    hidden_channels: int = 32
    num_checkerboard: int = 3  # couplings before the squeeze, and again after the channel-wise ones
    num_channelwise: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % 2:
            raise ValueError(f"image_size must be even (the flow squeezes 2x2 blocks), got {self.image_size}")
        if self.hidden_channels < 1 or self.num_checkerboard < 1 or self.num_channelwise < 0:
            raise ValueError(
                f"bad sizes: hidden_channels={self.hidden_channels} num_checkerboard={self.num_checkerboard} "
                f"num_channelwise={self.num_channelwise}"
            )


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


class RealNVP(LogitFlow):
    family = "realnvp"
    config_class = RealNVPConfig

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
