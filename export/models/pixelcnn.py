"""PixelCNN: masked convolutions of types A and B.

van den Oord, Kalchbrenner, Kavukcuoglu, "Pixel Recurrent Neural Networks", ICML 2016
(section 3.5). A 7x7 type-A masked convolution (excludes the centre pixel), residual blocks
of 3x3 type-B masked convolutions (include the centre), and 1x1 output layers giving a
categorical distribution over pixel levels. Single-channel images only: the channel-wise
masks for RGB are not implemented. The receptive field has the known blind spot up and to
the right; Gated PixelCNN removes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .autoregressive import AutoregressiveModel
from .base import ImageConfig


@dataclass(frozen=True)
class PixelCNNConfig(ImageConfig):
    hidden_channels: int = 32
    num_residual_blocks: int = 5
    first_kernel_size: int = 7
    kernel_size: int = 3
    output_channels: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.channels != 1:
            raise ValueError(f"PixelCNN here supports single-channel images, got channels={self.channels}")
        if self.num_classes is not None:
            raise ValueError("PixelCNN is unconditional here; use gated_pixelcnn for class conditioning")
        for name in ("first_kernel_size", "kernel_size"):
            k = getattr(self, name)
            if k < 1 or k % 2 == 0:
                raise ValueError(f"{name} must be odd and positive, got {k}")
        if self.hidden_channels < 1 or self.num_residual_blocks < 0 or self.output_channels < 1:
            raise ValueError(
                f"bad sizes: hidden_channels={self.hidden_channels} "
                f"num_residual_blocks={self.num_residual_blocks} output_channels={self.output_channels}"
            )


class MaskedConv2d(nn.Conv2d):
    """A 'same'-padded convolution whose kernel sees only pixels before the centre in raster order.

    Type A also hides the centre (first layer: the pixel being predicted); type B shows it
    (later layers: features at the centre already depend only on earlier pixels).
    """

    def __init__(self, mask_type: str, in_channels: int, out_channels: int, kernel_size: int) -> None:
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        mask = torch.ones_like(self.weight)
        centre = kernel_size // 2
        mask[:, :, centre, centre + (mask_type == "B") :] = 0
        mask[:, :, centre + 1 :, :] = 0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(2 * channels, channels, 1)
        self.masked = MaskedConv2d("B", channels, channels, kernel_size)
        self.expand = nn.Conv2d(channels, 2 * channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.reduce(F.relu(x))
        h = self.masked(F.relu(h))
        return x + self.expand(F.relu(h))


class PixelCNN(AutoregressiveModel):
    family = "pixelcnn"
    config_class = PixelCNNConfig

    def __init__(self, config: PixelCNNConfig) -> None:
        super().__init__(config)
        h = config.hidden_channels
        self.input_conv = MaskedConv2d("A", config.channels, 2 * h, config.first_kernel_size)
        self.blocks = nn.ModuleList(ResidualBlock(h, config.kernel_size) for _ in range(config.num_residual_blocks))
        self.output_hidden = nn.Conv2d(2 * h, config.output_channels, 1)
        self.output_logits = nn.Conv2d(config.output_channels, config.channels * config.pixel_levels, 1)

    def logits(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        n, c, height, width = x.shape
        h = self.input_conv(self.scale_input(x))  # (N, 2h, H, W)
        for block in self.blocks:
            h = block(h)
        out = self.output_logits(F.relu(self.output_hidden(F.relu(h))))  # (N, C*L, H, W)
        return out.view(n, self.config.pixel_levels, c, height, width)
