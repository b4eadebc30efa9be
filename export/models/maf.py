"""Masked autoregressive flow (MAF) on dequantised, logit-transformed images.

Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density Estimation", NeurIPS
2017. Each of K layers is a MADE (Germain et al. 2015, one masked hidden layer) giving, for
dimension i of its input a, a shift mu_i(a_<i) and a log-scale s_i(a_<i):
  b_i = (a_i - mu_i) * exp(-s_i),   log|det db/da| = -sum_i s_i,
so density evaluation (Score, Encode) is one parallel pass, and sampling inverts each layer one
dimension at a time, a_i = b_i * exp(s_i) + mu_i.

Every layer uses the same raster order (the paper reverses or permutes it between layers). A
stack of layers that are all triangular in one order is triangular in that order, so a pixel's
value at every layer follows from the latent's entry i and the values before it: the sampling
engine inverts the whole stack one pixel per step, keeping each layer's hidden pre-activations
as a cache (a new value adds one column of the first weight matrix). The price is expressiveness
that a reordering would add; the card says so.

Sampling computes in float64 (the inverse pass here and the engine's step graphs alike): the
last step quantises each value to one of 256 bins, and float32 rounding differences between a
full pass and the cached one would move a value across a bin edge in a few percent of images.
Dequantisation, the bijection's log-determinant and the bound are logit_flow.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .iaf_vae import MaskedLinear
from .logit_flow import LogitFlow, LogitFlowConfig, sum_per_image

# s = 0.6 tanh(raw / 0.6): each layer scales by at most e^0.6, the stack by e^3, about what the
# background's narrow dequantised bins need. Unbounded (or at 4 per layer), pixels that never vary
# in the 4,500 training digits got scales so small that one such pixel varying in a held-out digit
# cost thousands of nats: held-out mean 5.8 bits/dim at 4 per layer (30 epochs), 4.1 at 0.6 (20 epochs);
# medians 3.2 / 3.4.
LOG_SCALE_BOUND = 0.6


@dataclass(frozen=True)
class MAFConfig(LogitFlowConfig):
    num_layers: int = 5
    hidden_units: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_layers < 1 or self.hidden_units < 1:
            raise ValueError(f"sizes must be >= 1: num_layers={self.num_layers} hidden_units={self.hidden_units}")
        if self.dims < 2:
            raise ValueError(f"an autoregressive flow needs at least 2 dimensions, got {self.dims}")


class MADELayer(nn.Module):
    """One MAF layer: a MADE over D inputs in raster order, one masked hidden layer of H ReLU units."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        inputs = torch.arange(1, dim + 1)  # degree of input i is i + 1
        # Degrees spread evenly over [1, dim - 1]: with fewer hidden units than pixels, cycling
        # through 1..H instead would leave every pixel past the H-th conditioned on the first H only.
        hidden_degrees = 1 + torch.arange(hidden) * (dim - 1) // hidden
        self.hidden = MaskedLinear(dim, hidden, hidden_degrees[:, None] >= inputs[None, :])
        out_mask = inputs[:, None] > hidden_degrees[None, :]  # output i sees hidden units of degree <= i
        self.shift = MaskedLinear(hidden, dim, out_mask)
        self.log_scale = MaskedLinear(hidden, dim, out_mask)
        for layer in (self.shift, self.log_scale):  # start as the identity map: stable early training
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def shift_and_log_scale(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs a (N, D) → mu (N, D) and s (N, D); entry i depends on a_<i only."""
        h = F.relu(self.hidden(a))
        return self.shift(h), bounded_log_scale(self.log_scale(h))

    def forward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a → b = (a - mu) exp(-s) and log|det db/da| (N,) float64."""
        mu, s = self.shift_and_log_scale(a)
        return (a - mu) * (-s).exp(), -sum_per_image(s)

    def float64_weights(self) -> tuple[torch.Tensor, ...]:
        """The masked weights in float64, as sampling uses them: W1 (H, D), b1 (H,), W_mu (D, H), b_mu (D,),
        W_s (D, H), b_s (D,)."""
        return tuple(t.detach().double() for layer in (self.hidden, self.shift, self.log_scale)
                     for t in (layer.weight * layer.mask, layer.bias))

    def inverse(self, b: torch.Tensor) -> torch.Tensor:
        """b (N, D) → a (N, D) in float64, one dimension at a time: D passes of the hidden layer (the
        reference the engine's cached inverse is tested against)."""
        w1, b1, w_mu, b_mu, w_s, b_s = self.float64_weights()
        b = b.double()
        a = torch.zeros_like(b)
        for i in range(b.shape[1]):
            h = F.relu(F.linear(a, w1, b1))  # (N, H): a_j for j >= i are still zero, and masked anyway
            mu, s = h @ w_mu[i] + b_mu[i], bounded_log_scale(h @ w_s[i] + b_s[i])
            a[:, i] = b[:, i] * s.exp() + mu
        return a


def bounded_log_scale(raw: torch.Tensor) -> torch.Tensor:
    return LOG_SCALE_BOUND * torch.tanh(raw / LOG_SCALE_BOUND)


class MAF(LogitFlow):
    family = "maf"
    config_class = MAFConfig

    def __init__(self, config: MAFConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(MADELayer(config.dims, config.hidden_units) for _ in range(config.num_layers))

    def flow_forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, log_det = y.flatten(1), 0
        for layer in self.layers:
            a, ld = layer(a)
            log_det = log_det + ld
        return a.view_as(y), log_det

    def flow_inverse(self, z: torch.Tensor) -> torch.Tensor:
        """z → y in float64 (see the module docstring): `decode` quantises it to pixels in float64 too."""
        b = z.flatten(1)
        with torch.no_grad():
            for layer in reversed(self.layers):
                b = layer.inverse(b)
        return b.view(z.shape)
