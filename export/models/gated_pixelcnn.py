"""Gated PixelCNN: vertical and horizontal stacks without the blind spot, gated units.

van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves, Kavukcuoglu, "Conditional Image
Generation with PixelCNN Decoders", NeurIPS 2016. Each layer has
- a vertical stack whose feature at (i, j) sees every pixel in rows < i within its width;
- a horizontal stack whose feature at (i, j) sees pixels (i, < j), plus the vertical stack
  at (i, j) through a 1x1 link;
- gated units tanh(W_f * x) * sigmoid(W_g * x), with an optional per-class bias (the
  conditional model h = one-hot label), residual connections on the horizontal stack and
  skip connections summed into the output layers.

Causality is built with padding and shifts rather than masks: the vertical convolution of
kernel (k//2 + 1, k) is padded on top so it sees rows i-k//2..i of its input; the first layer
shifts it down one row, so it sees only rows < i of the image. The horizontal convolution of
kernel (1, k//2 + 1) is padded on the left; the first layer shifts it right one column (mask
type A). This layout is what the cached incremental sampler (Ramachandran et al. 2017)
slices: the vertical stack of row i is ready once row i-1 is known.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .autoregressive import AutoregressiveModel
from .base import ImageConfig


@dataclass(frozen=True)
class GatedPixelCNNConfig(ImageConfig):
    hidden_channels: int = 32
    num_layers: int = 8
    kernel_size: int = 5
    first_kernel_size: int = 7
    output_channels: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.channels != 1:
            raise ValueError(f"Gated PixelCNN here supports single-channel images, got channels={self.channels}")
        for name in ("first_kernel_size", "kernel_size"):
            k = getattr(self, name)
            if k < 3 or k % 2 == 0:
                raise ValueError(f"{name} must be odd and >= 3, got {k}")
        if self.hidden_channels < 1 or self.num_layers < 1 or self.output_channels < 1:
            raise ValueError(
                f"bad sizes: hidden_channels={self.hidden_channels} num_layers={self.num_layers} "
                f"output_channels={self.output_channels}"
            )


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → the same with every row moved down one; row 0 becomes zeros."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → the same with every column moved right one; column 0 becomes zeros."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


def gate(x: torch.Tensor) -> torch.Tensor:
    """tanh(first half) * sigmoid(second half) over channels: (N, 2C, ...) → (N, C, ...)."""
    content, gate_logits = x.chunk(2, dim=1)
    return torch.tanh(content) * torch.sigmoid(gate_logits)


class GatedLayer(nn.Module):
    def __init__(self, in_channels: int, channels: int, kernel_size: int, first: bool, num_classes: int | None,
                 condition_channels: int | None = None) -> None:
        super().__init__()
        self.first = first
        self.kernel_size = kernel_size
        k = kernel_size
        self.vertical = nn.Conv2d(in_channels, 2 * channels, (k // 2 + 1, k))
        self.horizontal = nn.Conv2d(in_channels, 2 * channels, (1, k // 2 + 1))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)
        self.skip = nn.Conv2d(channels, channels, 1)
        # Per-class biases of both stacks' gates (the paper's V^T h with h one-hot).
        self.class_bias = nn.Embedding(num_classes, 4 * channels) if num_classes else None
        # Per-position biases from a conditioning feature map (the paper's V * s with s spatial; PixelVAE's z).
        self.condition = nn.Conv2d(condition_channels, 4 * channels, 1) if condition_channels else None

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, labels: torch.Tensor | None, condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = self.kernel_size
        v_pre = self.vertical(F.pad(v, (k // 2, k // 2, k // 2, 0)))  # (N, 2C, H, W): input rows i-k//2..i
        h_pre = self.horizontal(F.pad(h, (k // 2, 0, 0, 0)))  # (N, 2C, H, W): input cols j-k//2..j
        if self.first:  # type A: the image itself must not see row i (vertical) or pixel j (horizontal)
            v_pre = shift_down(v_pre)
            h_pre = shift_right(h_pre)
        h_pre = h_pre + self.vertical_to_horizontal(v_pre)
        if self.class_bias is not None:
            v_bias, h_bias = self.class_bias(labels)[:, :, None, None].chunk(2, dim=1)
            v_pre, h_pre = v_pre + v_bias, h_pre + h_bias
        if self.condition is not None:
            v_bias, h_bias = self.condition(condition).chunk(2, dim=1)
            v_pre, h_pre = v_pre + v_bias, h_pre + h_bias
        v_out = gate(v_pre)
        h_gated = gate(h_pre)
        h_out = self.horizontal_out(h_gated)
        if not self.first:
            h_out = h_out + h
        return v_out, h_out, self.skip(h_gated)


class GatedPixelCNN(AutoregressiveModel):
    family = "gated_pixelcnn"
    config_class = GatedPixelCNNConfig

    def __init__(self, config: GatedPixelCNNConfig, condition_channels: int | None = None) -> None:
        """condition_channels: the channels of a conditioning feature map (N, Cc, H, W) every layer
        adds to its gates (`logits(..., condition=)`); None for the family's own models."""
        super().__init__(config)
        c = config.hidden_channels
        self.layers = nn.ModuleList(
            GatedLayer(
                config.channels if i == 0 else c,
                c,
                config.first_kernel_size if i == 0 else config.kernel_size,
                first=i == 0,
                num_classes=config.num_classes,
                condition_channels=condition_channels,
            )
            for i in range(config.num_layers)
        )
        self.output_hidden = nn.Conv2d(c, config.output_channels, 1)
        self.output_logits = nn.Conv2d(config.output_channels, config.channels * config.pixel_levels, 1)

    def logits(self, x: torch.Tensor, labels: torch.Tensor | None = None,
               condition: torch.Tensor | None = None) -> torch.Tensor:
        n, c, height, width = x.shape
        v = h = self.scale_input(x)  # (N, C, H, W)
        skips = 0
        for layer in self.layers:
            v, h, skip = layer(v, h, labels, condition)
            skips = skips + skip
        out = self.output_logits(F.relu(self.output_hidden(F.relu(skips))))  # (N, C*L, H, W)
        return out.view(n, self.config.pixel_levels, c, height, width)
