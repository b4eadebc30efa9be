"""A small convolutional image discriminator, shared by the families that train one on pixels."""

from __future__ import annotations

import torch
from torch import nn

from .base import ImageConfig


class PixelDiscriminator(nn.Module):
    """Images as values in [0, 1] (N, C, H, W) → hidden features (N, F) and a logit (N,).

    Two stride-2 convolutions with LeakyReLU (DCGAN's discriminator without batch norm, so a
    sample's logit does not depend on the rest of its batch).
    """

    def __init__(self, config: ImageConfig, channels: int) -> None:
        super().__init__()
        s = config.image_size // 4
        self.features = nn.Sequential(
            nn.Conv2d(config.channels, channels, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(channels, 2 * channels, 4, 2, 1), nn.LeakyReLU(0.2), nn.Flatten(),
        )
        self.logit = nn.Linear(2 * channels * s * s, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return features, self.logit(features).squeeze(-1)
