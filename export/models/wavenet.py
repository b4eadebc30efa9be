"""WaveNet: dilated causal convolutions over mu-law audio, gated units, residual and skip connections.

van den Oord, Dieleman, Zen, Simonyan, Vinyals, Graves, Kalchbrenner, Senior, Kavukcuoglu,
"WaveNet: A Generative Model for Raw Audio", arXiv:1609.03499 (2016). The waveform is a
sequence of 8-bit mu-law codes (256 levels) and p(x) = prod_t p(x_t | x_<t) a softmax over them.
- The input (codes scaled to [-1, 1]) is shifted one step right, so position t sees x_<t
  only, then a causal convolution of width 2 lifts it to the residual channels.
- Each layer is a width-2 convolution with dilation d (1, 2, 4, ... max_dilation, repeated
  `dilation_cycles` times), padded on the left so output t reads inputs t - d and t; a gated
  unit tanh(W_f * h) * sigmoid(W_g * h), with a per-class bias when the model is globally
  conditioned on a label (the paper's V^T h); a 1x1 residual back into the stack and a 1x1 skip.
- The skips are summed, then ReLU, 1x1, ReLU, 1x1 give the logits.
The receptive field is 2 + sum of the dilations. Cached sampling (fast-wavenet, Paine et al.
2016) keeps, per layer, a queue of its last d inputs: see export/wavenet_steps.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .autoregressive import AutoregressiveModel
from .base import AudioConfig
from .gated_pixelcnn import gate


@dataclass(frozen=True)
class WaveNetConfig(AudioConfig):
    residual_channels: int = 32
    skip_channels: int = 64
    output_channels: int = 128
    max_dilation: int = 256  # each cycle runs dilations 1, 2, 4, ..., max_dilation
    dilation_cycles: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.channels != 1:
            raise ValueError(f"WaveNet here models mono audio, got channels={self.channels}")
        d = self.max_dilation
        if d < 1 or d & (d - 1):
            raise ValueError(f"max_dilation must be a power of two >= 1, got {d}")
        if min(self.residual_channels, self.skip_channels, self.output_channels, self.dilation_cycles) < 1:
            raise ValueError(
                f"bad sizes: residual_channels={self.residual_channels} skip_channels={self.skip_channels} "
                f"output_channels={self.output_channels} dilation_cycles={self.dilation_cycles}"
            )

    @property
    def dilations(self) -> tuple[int, ...]:
        per_cycle = tuple(2**k for k in range(self.max_dilation.bit_length()))
        return per_cycle * self.dilation_cycles

    @property
    def receptive_field(self) -> int:
        """Samples of the past a prediction sees: 2 (the input convolution) + the dilations."""
        return 1 + 1 + sum(self.dilations)


class ResidualLayer(nn.Module):
    def __init__(self, channels: int, skip_channels: int, dilation: int, num_classes: int | None) -> None:
        super().__init__()
        self.dilation = dilation
        self.dilated = nn.Conv1d(channels, 2 * channels, 2, dilation=dilation)
        self.class_bias = nn.Embedding(num_classes, 2 * channels) if num_classes else None
        self.residual = nn.Conv1d(channels, channels, 1)
        self.skip = nn.Conv1d(channels, skip_channels, 1)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.dilated(F.pad(h, (self.dilation, 0)))  # (N, 2R, T): inputs t - d and t
        if self.class_bias is not None:
            z = z + self.class_bias(labels)[:, :, None]
        g = gate(z)
        return h + self.residual(g), self.skip(g)


class WaveNet(AutoregressiveModel):
    family = "wavenet"
    config_class = WaveNetConfig

    def __init__(self, config: WaveNetConfig) -> None:
        super().__init__(config)
        r = config.residual_channels
        self.input_conv = nn.Conv1d(config.channels, r, 2)
        self.layers = nn.ModuleList(
            ResidualLayer(r, config.skip_channels, d, config.num_classes) for d in config.dilations
        )
        self.output_hidden = nn.Conv1d(config.skip_channels, config.output_channels, 1)
        self.output_logits = nn.Conv1d(config.output_channels, config.channels * config.pixel_levels, 1)

    def logits(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        n, c, length = x.shape
        shifted = F.pad(self.scale_input(x), (1, 0))[:, :, :-1]  # position t holds x_{t-1}, zero at t = 0
        h = self.input_conv(F.pad(shifted, (1, 0)))  # (N, R, T): x_{t-2}, x_{t-1}
        skips = 0
        for layer in self.layers:
            h, skip = layer(h, labels)
            skips = skips + skip
        out = self.output_logits(F.relu(self.output_hidden(F.relu(skips))))  # (N, C*L, T)
        return out.view(n, self.config.pixel_levels, c, length)
